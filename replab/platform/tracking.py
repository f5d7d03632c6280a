"""MLflow tracking: where runs go, how a run is opened (or re-opened on resume), and logging by run id.

- The tracking URI is ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow 3's own default, a
  SQLite file ``mlflow.db`` in the working directory, made absolute here so every Ray process (whose working
  directory is a session folder) writes to the same file.
- The driver creates the run (params, tags, config file) and hands its id to the workers; rank 0 logs
  metrics with an :class:`MlflowClient` bound to that id, so nothing depends on a process-global active run
  and it works from any node that can reach the URI.
- A run is identified by its replab run name (tag ``replab.run``): re-running the same command finds the
  unfinished run and continues it instead of opening a new one.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

MAX_PARAM_CHARS = 6000
RUN_TAG = "replab.run"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""MLflow 3's UI opens an experiment on its GenAI pages unless this tag says otherwise (read in the 3.17 UI bundle
and its onboarding skill); ``custom_model_development`` opens the runs view of model training."""
NOTE_TAG = "mlflow.note.content"
"""The description the MLflow UI shows (and edits) for an experiment or a run."""
EXPERIMENT_NOTE = ("Runs of replab (representation learning on Ray): one run per `replab train`, one parent run per "
                   "`replab sweep` with a child run per trial (axis values as numeric `sweep.*` params and metrics).")


def resolve_tracking_uri(uri: str = "") -> str:
    """``uri`` or $MLFLOW_TRACKING_URI or ``sqlite:///<cwd>/mlflow.db``; relative local paths made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///"):]
        return f"sqlite:///{Path(rel).resolve()}"
    if "://" not in uri:  # a bare path: a folder of runs is the deprecated file store; use a db in it
        path = Path(uri).resolve()
        if path.suffix == ".db":
            return f"sqlite:///{path}"
        path.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path / 'mlflow.db'}"
    return uri


def is_local_store(uri: str) -> bool:
    """True for stores only reachable from this machine (SQLite or files)."""
    return uri.startswith("sqlite:") or uri.startswith("file:")


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return c.create_experiment(name, tags={EXPERIMENT_KIND_TAG: "custom_model_development",
                                               NOTE_TAG: EXPERIMENT_NOTE})
    except Exception:  # created concurrently by another process
        return c.get_experiment_by_name(name).experiment_id


def find_run(uri: str, experiment: str, run_name: str) -> Any | None:
    """The newest run tagged with this replab run name, or None."""
    c = client(uri)
    runs = c.search_runs(
        [experiment_id(uri, experiment)],
        filter_string=f"tags.`{RUN_TAG}` = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def find_run_anywhere(uri: str, run_name: str) -> list[Any]:
    """The newest run tagged with this replab run name in each experiment that has one (newest first)."""
    c = client(uri)
    ids = [e.experiment_id for e in c.search_experiments()]
    if not ids:
        return []
    runs = c.search_runs(ids, filter_string=f"tags.`{RUN_TAG}` = '{run_name}'",
                         order_by=["attributes.start_time DESC"], max_results=1000)
    newest: dict[str, Any] = {}
    for run in runs:
        newest.setdefault(run.info.experiment_id, run)
    return list(newest.values())


def open_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    parent_run_id: str | None = None,
) -> tuple[str, bool]:
    """Create the run for ``run_name`` or re-open its unfinished one; returns (run_id, resumed)."""
    c = client(uri)
    existing = find_run(uri, experiment, run_name)
    if existing is not None and existing.info.status != "FINISHED":
        c.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id, True
    all_tags = {RUN_TAG: run_name, "mlflow.runName": run_name, **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id(uri, experiment), tags=all_tags, run_name=run_name)
    log_params(uri, run.info.run_id, params)
    return run.info.run_id, False


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
    c = client(uri)
    for start in range(0, len(items), 100):
        c.log_batch(run_id, params=items[start : start + 100])


def tidy(value: Any) -> Any:
    """A non-integral float rounded to 7 significant digits (float32's precision: ``0.14000000059604645`` ->
    ``0.14``); integral floats (counts) and anything else as is."""
    if isinstance(value, bool) or not isinstance(value, float) or not math.isfinite(value) or value.is_integer():
        return value
    return float(f"{value:.7g}")


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(tidy(value))
    return text[:MAX_PARAM_CHARS]


class RunLogger:
    """Logs metrics and artifacts to one MLflow run by id (safe in any process that reaches the URI)."""

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id
        self._client = client(uri)

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, tidy(float(v)), now, step) for k, v in values.items() if v is not None]
        for attempt in range(5):  # SQLite may be busy for a moment when another process writes
            try:
                self._client.log_batch(self.run_id, metrics=batch)
                return
            except Exception:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def text(self, text: str, name: str) -> None:
        self._client.log_text(self.run_id, text, name)

    def dict(self, data: dict, name: str) -> None:
        self._client.log_dict(self.run_id, data, name)

    def tag(self, key: str, value: str) -> None:
        self._client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)


def ui_hint(uri: str) -> str:
    """How to look at the runs in the MLflow UI."""
    if uri.startswith("sqlite:") or uri.startswith("file:"):
        return f"mlflow ui --backend-store-uri {uri}"
    return f"open {uri} in a browser"
