"""The sweep's MLflow runs: one parent run per sweep (created on the driver; tag ``replab.sweep``) and one nested
child run per trial (opened by the trial with the parent's id). On a child, each axis is a numeric ``sweep.<axis>``
param and ``sweep/<axis>`` metric (encoder parameters, images, resolution, epochs; a config key's own value) and its
label a ``sweep.<axis>`` tag. The parent carries only what every cell shares, the axes as lists, and a description
(``mlflow.note.content``). SQLite under concurrent writers: every MLflow write here is retried (:func:`retry`).
"""

from __future__ import annotations

import json
import time
from typing import Any

from replab.config import RunConfig
from replab.platform.sweep.grid import Cell
from replab.platform.sweep.spec import SweepSpec

SWEEP_TAG = "replab.sweep"


ROLE_TAG = "replab.role"


TRIAL_TAG = "replab.trial"


CELL_TAG = "replab.cell"


def retry(fn, *args, attempts: int = 8, **kwargs):
    """Call ``fn``, retrying on errors (SQLite answers "database is locked" under concurrent writers)."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001
            if attempt == attempts - 1:
                raise
            time.sleep(0.25 * (attempt + 1))


def _search_runs(uri: str, experiment_ids: list[str], filter_string: str, max_results: int = 5000):
    from replab.platform import tracking

    return retry(tracking.client(uri).search_runs, experiment_ids, filter_string=filter_string,
                 max_results=max_results)


def find_parent(uri: str, experiment: str, name: str):
    from replab.platform import tracking

    exp = retry(tracking.experiment_id, uri, experiment)
    runs = _search_runs(uri, [exp], f"tags.`{SWEEP_TAG}` = '{name}' and tags.`{ROLE_TAG}` = 'sweep'")
    runs = sorted(runs, key=lambda r: r.info.start_time or 0)
    return runs[-1] if runs else None


def children(uri: str, parent) -> list:
    return _search_runs(uri, [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")


def open_parent(cfg: RunConfig, spec: SweepSpec, cells: list[Cell], folder: str, raw: dict) -> str:
    """Create the sweep's parent run, or re-open the one of an earlier (interrupted) attempt."""
    from replab.platform import tracking

    uri, c = cfg.tracking.uri, tracking.client(cfg.tracking.uri)
    existing = find_parent(uri, cfg.tracking.experiment, spec.name)
    if existing is not None:
        retry(c.update_run, existing.info.run_id, status="RUNNING")
        return existing.info.run_id
    tags = {SWEEP_TAG: spec.name, ROLE_TAG: "sweep", "mlflow.runName": spec.name, "replab.sweep_dir": folder,
            tracking.RUN_TAG: f"sweep:{spec.name}", tracking.NOTE_TAG: parent_note(spec, cells)}
    run = retry(c.create_run, retry(tracking.experiment_id, uri, cfg.tracking.experiment), tags=tags,
                run_name=spec.name)
    run_id = run.info.run_id
    retry(tracking.log_params, uri, run_id, parent_params(spec, cells))
    retry(c.log_dict, run_id, {k: v for k, v in raw.items()}, "sweep_config.yaml")
    return run_id


def parent_params(spec: SweepSpec, cells: list[Cell]) -> dict[str, Any]:
    """The parent's params: the sweep's settings, each axis as the list of its labels (``sweep.axis.<axis>``), and
    the config keys whose value every cell shares (a key that differs between cells is an axis, not a param)."""
    params: dict[str, Any] = {
        "sweep.name": spec.name, "sweep.cells": len(cells), "sweep.axes": json.dumps(spec.axes),
        "sweep.metric": spec.metric, "sweep.max_concurrent": spec.max_concurrent,
        "sweep.trial_runner": spec.trial_runner, "sweep.bootstrap": spec.bootstrap,
        "sweep.search": json.dumps(spec.search.__dict__) if spec.search else "none",
        "sweep.scheduler": json.dumps(spec.scheduler.__dict__) if spec.scheduler else "none"}
    params.update({f"sweep.axis.{a}": [c for c in dict.fromkeys(cell.labels[a] for cell in cells)] for a in spec.axes})
    flats = [c.config.flat() for c in cells]
    params.update({k: v for k, v in flats[0].items()
                   if not k.startswith("tracking.") and all(f.get(k) == v for f in flats[1:])})
    return params


def parent_note(spec: SweepSpec, cells: list[Cell]) -> str:
    """The parent run's description: what the sweep varies and measures (the report adds its findings)."""
    axes = "; ".join(f"**{a}**: {', '.join(dict.fromkeys(c.labels[a] for c in cells))}" for a in spec.axes)
    return (f"Scaling sweep `{spec.name}`: {len(cells)} cells, {axes}. Metric `{spec.metric}` "
            f"(error = 1 - top-1 for accuracies). One child run per trial; config in `sweep_config.yaml`.")


def update_parent(uri: str, parent_run_id: str, metrics: dict[str, float] | None = None,
                  note: str | None = None, step: int = 0) -> None:
    """Add summary metrics to the parent run (logged once, at ``step``) and/or append ``note`` (markdown) to its
    description, replacing an earlier appended section that starts with the same first line."""
    from replab.platform import tracking

    if metrics:
        retry(tracking.RunLogger(uri, parent_run_id).metrics, metrics, step=step)
    if note:
        c = tracking.client(uri)
        text = retry(c.get_run, parent_run_id).data.tags.get(tracking.NOTE_TAG, "")
        head = note.strip().splitlines()[0]
        kept = [part for part in text.split("\n\n---\n\n") if not part.strip().startswith(head)]
        retry(c.set_tag, parent_run_id, tracking.NOTE_TAG, "\n\n---\n\n".join(kept + [note.strip()]))


def mark_stale_children(uri: str, parent_run_id: str, status: str = "KILLED") -> int:
    """Children left RUNNING by a driver that died: mark them (their trials resume into the same run)."""
    from replab.platform import tracking

    c = tracking.client(uri)
    parent = retry(c.get_run, parent_run_id)
    n = 0
    for run in children(uri, parent):
        if run.info.status in ("RUNNING", "SCHEDULED"):
            retry(c.set_terminated, run.info.run_id, status=status)
            n += 1
    return n


def open_child(cfg: RunConfig, parent_run_id: str, run_label: str, params: dict, tags: dict) -> str:
    """The trial's child run: created with the parent's id, or re-opened when the trial resumes."""
    from replab.platform import tracking

    uri, c = cfg.tracking.uri, tracking.client(cfg.tracking.uri)
    existing = retry(tracking.find_run, uri, cfg.tracking.experiment, run_label)
    if existing is not None and existing.info.status != "FINISHED":
        retry(c.update_run, existing.info.run_id, status="RUNNING")
        return existing.info.run_id
    all_tags = {tracking.RUN_TAG: run_label, "mlflow.runName": run_label, "mlflow.parentRunId": parent_run_id, **tags}
    exp = retry(tracking.experiment_id, uri, cfg.tracking.experiment)
    run = retry(c.create_run, exp, tags=all_tags, run_name=run_label)
    retry(tracking.log_params, uri, run.info.run_id, params)
    return run.info.run_id


def find_child(uri: str, parent_run_id: str, trial: str):
    """The child run of trial ``trial`` (tag ``replab.trial``) under the parent, or None."""
    from replab.platform import tracking

    parent = retry(tracking.client(uri).get_run, parent_run_id)
    runs = _search_runs(uri, [parent.info.experiment_id],
                        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial}'")
    return max(runs, key=lambda r: r.info.start_time or 0) if runs else None


def axis_labels(run) -> dict[str, str]:
    """Axis -> label of a child run: its ``sweep.<axis>`` tags (the params hold the numbers), or, for runs of
    sweeps recorded before axes became numeric params, its ``sweep.<axis>`` params."""
    def labels(items) -> dict[str, str]:
        return {k[len("sweep."):]: v for k, v in items if k.startswith("sweep.") and not k.startswith("sweep.search.")}

    return labels(run.data.tags.items()) or labels(run.data.params.items())


def trial_table(uri: str, parent_run_id: str) -> list[dict[str, Any]]:
    """One row per child run: trial name, status, axis labels and the final metrics."""
    from replab.platform import tracking

    parent = retry(tracking.client(uri).get_run, parent_run_id)
    rows = []
    for run in children(uri, parent):
        rows.append({
            "trial": run.data.tags.get(TRIAL_TAG, run.info.run_name),
            "cell": run.data.tags.get(CELL_TAG, ""),
            "run_id": run.info.run_id,
            "status": run.info.status,
            "early_stopped": run.data.tags.get("replab.early_stopped") == "true",
            "axes": axis_labels(run),
            "params": dict(run.data.params),
            "metrics": dict(run.data.metrics),
        })
    return sorted(rows, key=lambda r: r["trial"])
