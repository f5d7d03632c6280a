"""``replab sweep``: a grid of training runs (optionally with Optuna search and ASHA per grid cell) on Ray Tune.

A plain grid is one ``Tuner`` over ``grid_search(cells)`` (cells run concurrently up to ``max_concurrent``);
with search, ``grid_search`` cannot combine with Optuna, so each cell gets its own ``Tuner`` (its trials run
concurrently).

Names are deterministic: the trial name is the cell id (plus a hash of the searched values), so an
interrupted sweep resumes by re-running the same command (or ``--resume``): ``Tuner.restore`` skips finished
trials, and an unfinished trial's ``TorchTrainer`` finds its own checkpoints under
``<sweep dir>/train/<trial name>``. State lives in ``<train.storage_path>/sweeps/<sweep name>/``. Trials cut
off by an interrupted sweep are marked KILLED (on the next start when the driver died without a chance to
mark them).

Before Tune starts, the driver decodes the training images of the direct cells that can hold them in memory once
per group of cells reading the same decode, and hands them to the trials through the plan
(:mod:`replab.platform.sweep.shared`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replab.config import ConfigError, read_raw
from replab.platform.sweep import callbacks
from replab.platform.sweep.callbacks import TrialPrinter, status_callback, trial_dirname
from replab.platform.sweep.grid import Cell, cell_raw, expand, jsonable, run_labels, runner_of, sweep_dir
from replab.platform.sweep.runs import mark_stale_children, open_parent, retry, trial_table
from replab.platform.sweep.shared import share_data
from replab.platform.sweep.spec import SweepSpec, parse_spec
from replab.platform.sweep.trial import _trial, json_write


def _space(dist: dict[str, Any]):
    from ray import tune

    kind = dist["type"]
    if kind == "uniform":
        return tune.uniform(dist["low"], dist["high"])
    if kind == "loguniform":
        return tune.loguniform(dist["low"], dist["high"])
    if kind == "randint":
        return tune.randint(int(dist["low"]), int(dist["high"]) + 1)
    if kind == "lograndint":
        return tune.lograndint(int(dist["low"]), int(dist["high"]) + 1)
    return tune.choice(list(dist["values"]))


def _searcher(spec: SweepSpec, seed: int):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class PatientOptunaSearch(OptunaSearch):
        """Optuna that ignores epochs without the metric (evaluation may run only at the end)."""

        def on_trial_result(self, trial_id, result):
            if self.metric in result:
                super().on_trial_result(trial_id, result)

    return PatientOptunaSearch(metric=spec.search.metric, mode=spec.search.mode,
                               sampler=optuna.samplers.TPESampler(seed=seed))


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    tracking_uri: str
    directory: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0
    interrupted: bool = False
    failed: int = 0
    report: dict[str, Any] | None = None


def plan_sweep(config_path, overrides=()) -> tuple[dict, SweepSpec, list[Cell]]:
    """Read and validate a sweep: the raw mapping, the spec and the grid (no Ray, no MLflow)."""
    raw, source = read_raw(config_path, overrides)
    spec = parse_spec(raw, source)
    cells = expand(raw, spec)
    return raw, spec, cells


def trial_resources(config: dict[str, Any], resources: dict[str, dict[str, float]]) -> dict[str, float]:
    """A trial's Ray resources (``tune.with_resources``): a direct trial trains in its own process and asks for
    its worker's CPUs (and GPU); a Ray Train trial only for ``sweep.trial_cpus``, its workers ask for theirs."""
    return resources[config["cell"]]


def _cell_resources(spec: SweepSpec, cells: list[Cell]) -> dict[str, dict[str, float]]:
    out = {}
    for cell in cells:
        train = cell.config.train
        if runner_of(spec.trial_runner, cell.config) == "direct":
            out[cell.id] = {"CPU": max(train.cpus_per_worker, spec.trial_cpus), **({"GPU": 1} if train.use_gpu else {})}
        else:
            out[cell.id] = {"CPU": spec.trial_cpus}
    return out


def run_sweep(config_path, overrides=(), resume: bool = False, report: bool = True, echo=print,
              verbose: bool = False) -> SweepResult:
    """Run (or resume) the sweep described by ``config_path`` + ``overrides``; returns what happened.

    Quiet unless ``verbose``: one line per trial as it starts and ends and a progress bar; Ray's, Tune's and
    MLflow's own logging only from warnings up (errors in full)."""
    from ray import tune

    from replab.platform.train.ray_train import check_tracking_reachable, ensure_ray, quiet_logs

    quiet_logs(verbose)
    raw, spec, cells = plan_sweep(config_path, overrides)
    base = cells[0].config
    folder = sweep_dir(base, spec.name)
    plan_file = Path(folder) / "plan.json"
    grid = {"cells": [c.plan() for c in cells], "search": spec.search.__dict__ if spec.search else None}
    exists = plan_file.exists()
    _check_before_ray(spec, cells, folder, grid, resume)
    if exists and not _pending_jobs(spec, cells, folder):
        return _already_done(spec, base.tracking.uri, folder, json.loads(plan_file.read_text()), echo)

    # a local instance gets the cores plus what concurrent trials' train workers ask for (Ray Data needs CPUs too)
    per_trial = max(max(c.config.train.num_workers, 1) * c.config.train.cpus_per_worker for c in cells)
    ensure_ray(per_trial * spec.max_concurrent + spec.trial_cpus * spec.max_concurrent, quiet=not verbose)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # evaluation may run only at the last epoch
    uri = base.tracking.uri
    check_tracking_reachable(uri)
    shared, shared_s = share_data(spec, cells)
    Path(folder).mkdir(parents=True, exist_ok=True)
    parent_run_id = open_parent(base, spec, cells, folder, raw)
    if not exists:
        json_write(plan_file, {"name": spec.name, "parent_run_id": parent_run_id, "grid": grid})
    stale = mark_stale_children(uri, parent_run_id)
    labels = run_labels(cells)
    plan = {
        "name": spec.name, "dir": folder, "parent_run_id": parent_run_id, "experiment": base.tracking.experiment,
        "save_encoders": spec.save_encoders, "trial_runner": spec.trial_runner,
        "cells": {c.id: {"config": cell_raw(c.config), "axes": c.axes, "labels": c.labels, "run_label": labels[c.id],
                         "shared": shared.get(c.id)}
                  for c in cells},
    }
    samples = spec.search.num_samples if spec.search else 1
    echo(f"sweep {spec.name}: {len(cells)} cells x {samples} trial(s), at most {spec.max_concurrent} at once"
         + (f"; {len(shared)} cell(s) train on {len({s.ref for s in shared.values()})} decode(s) held in memory "
            f"({shared_s:.1f} s)" if shared else ""))
    echo(f"  state: {folder}")
    echo(f"  MLflow parent run: {parent_run_id} ({uri})" + (f"; {stale} interrupted trial run(s) marked KILLED"
                                                             if stale else ""))

    trainable = tune.with_resources(tune.with_parameters(_trial, plan=plan),
                                    functools.partial(trial_resources, resources=_cell_resources(spec, cells)))
    callback = status_callback(uri, plan)
    finished = {p.parent.name for p in (Path(folder) / "trials").glob("*/done.json")}
    callbacks.printer = TrialPrinter(len(cells) * samples, finished, labels, spec.metric,
                                     echo=None if echo is print else echo)
    start = time.time()
    interrupted = False
    try:
        with _outside_job_working_dir(folder):
            interrupted = _fit_tune_jobs(spec, cells, folder, trainable, callback, verbose)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        wall = time.time() - start
        callbacks.printer.close()
        callbacks.printer = None
        if interrupted:
            mark_stale_children(uri, parent_run_id)

    result = SweepResult(spec.name, parent_run_id, uri, folder, wall_time_s=wall, interrupted=interrupted)
    return _conclude(result, spec, report, echo)


def _check_before_ray(spec: SweepSpec, cells: list[Cell], folder: str, grid: dict[str, Any], resume: bool) -> None:
    """What can fail before any Ray work, in one line each: a missing dataset, a URI as the sweep folder, a sweep
    name already used by another grid, ``--resume`` of a sweep that never started."""
    from replab.platform.data import sources

    seen_data = set()
    for cell in cells:
        key = (cell.config.data.dataset, cell.config.data.root, cell.config.data.split)
        if key not in seen_data:
            sources.resolve_config(cell.config.data)
            seen_data.add(key)
    if "://" in folder:
        raise ConfigError("train.storage_path: replab sweep keeps its state in a local or shared folder; "
                          "URIs are not supported for sweeps yet")
    plan_file = Path(folder) / "plan.json"
    if plan_file.exists() and json.loads(plan_file.read_text()).get("grid") != jsonable(grid):
        raise ConfigError(f"sweep.name: {spec.name!r} already exists at {folder} with a different grid; "
                          "choose a new sweep.name or remove that folder")
    if resume and not plan_file.exists():
        raise ConfigError(f"--resume: no sweep {spec.name!r} at {folder} to resume; run without --resume to start it")


def _conclude(result: SweepResult, spec: SweepSpec, report: bool, echo) -> SweepResult:
    """Record the finished (or interrupted) sweep on its parent run, then fit and log its scaling report."""
    uri, parent_run_id = result.tracking_uri, result.parent_run_id
    result.trials = trial_table(uri, parent_run_id)
    result.failed = sum(1 for t in result.trials if t["status"] == "FAILED")
    _finish_parent(uri, parent_run_id, result, spec)
    if result.interrupted:
        echo("sweep interrupted; re-run the same command (or add --resume) to continue it")
        return result
    if report:
        from replab.platform.sweep import report as report_lib

        try:
            result.report = report_lib.build_report(uri, parent_run_id, metric=spec.metric,
                                                    bootstrap=spec.bootstrap, echo=echo)
        except Exception as exc:  # noqa: BLE001 - the sweep itself succeeded; say why there is no report
            echo(f"no scaling report: {type(exc).__name__}: {exc}")
    return result


def _tune_jobs(spec: SweepSpec, cells: list[Cell]) -> list[tuple]:
    """The sweep's Tune experiments: (name, param space, metric, mode, samples, concurrency[, cell]) of the one
    grid, or of each searched cell."""
    from ray import tune

    if spec.search is None:
        return [("grid", {"cell": tune.grid_search([c.id for c in cells])}, None, None, 1, spec.max_concurrent)]
    jobs = []
    for cell in cells:
        space = {"cell": cell.id, **{k: _space(d) for k, d in spec.search.space.items()}}
        jobs.append((f"cell-{cell.id}", space, spec.search.metric, spec.search.mode, spec.search.num_samples,
                     min(spec.max_concurrent, spec.search.num_samples), cell))
    return jobs


def _pending_jobs(spec: SweepSpec, cells: list[Cell], folder: str) -> list[tuple]:
    """The Tune experiments not finished yet (a finished one leaves ``tune/<name>.done``)."""
    return [job for job in _tune_jobs(spec, cells) if not (Path(folder) / "tune" / f"{job[0]}.done").exists()]


def _already_done(spec: SweepSpec, uri: str, folder: str, plan: dict[str, Any], echo) -> SweepResult:
    """A re-run of a finished sweep: nothing runs and nothing recorded changes; returns what it recorded."""
    parent_run_id = plan["parent_run_id"]
    result = SweepResult(spec.name, parent_run_id, uri, folder)
    result.trials = trial_table(uri, parent_run_id)
    result.failed = sum(1 for t in result.trials if t["status"] == "FAILED")
    from replab.platform import tracking

    result.wall_time_s = retry(tracking.client(uri).get_run, parent_run_id).data.metrics.get("sweep/wall_time_s", 0.0)
    echo(f"sweep {spec.name}: already finished ({len(result.trials)} trials); nothing to run. "
         f"`replab report {spec.name}` re-fits it.")
    return result


def _fit_tune_jobs(spec: SweepSpec, cells: list[Cell], folder: str, trainable, callback, verbose: bool) -> bool:
    """Fit (or restore and finish) the sweep's pending Tune experiments; True when one was interrupted."""
    from ray import tune

    for job in _pending_jobs(spec, cells, folder):
        exp_name, space, metric, mode, num_samples, concurrency = job[:6]
        path = f"{folder}/tune/{exp_name}"
        if tune.Tuner.can_restore(path):
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        else:
            scheduler = None
            search_alg = None
            if spec.search is not None:
                search_alg = _searcher(spec, seed=job[6].index + 1000 * job[6].config.train.seed)
            if spec.scheduler is not None:
                from ray.tune.schedulers import ASHAScheduler

                # stop_last_trials=False: a trial at its last epoch finishes its run (and its bookkeeping)
                scheduler = ASHAScheduler(
                    time_attr="epoch", metric=metric, mode=mode, grace_period=spec.scheduler.grace_period,
                    reduction_factor=spec.scheduler.reduction_factor, stop_last_trials=False,
                    max_t=spec.scheduler.max_t or job[6].config.train.epochs)
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    num_samples=num_samples, max_concurrent_trials=concurrency, search_alg=search_alg,
                    scheduler=scheduler, trial_name_creator=trial_dirname, trial_dirname_creator=trial_dirname,
                    reuse_actors=False,
                ),
                run_config=tune.RunConfig(
                    name=exp_name, storage_path=f"{folder}/tune", callbacks=[callback], verbose=1 if verbose else 0,
                    failure_config=tune.FailureConfig(max_failures=0),
                ),
            )
        results = tuner.fit()
        states = _trial_states(results)
        if any(s not in ("TERMINATED", "ERROR") for s in states):
            return True
        if not all(s == "TERMINATED" for s in states):
            continue  # a failed trial: the sweep ends, and a re-run retries it
        expected = num_samples * (len(cells) if spec.search is None else 1)
        if len(states) < expected:
            return True  # interrupted before every trial started (Tune reports only the trials it created)
        if spec.search is None and _finished_cells(folder, cells) < expected:
            return True  # a trial stopped by the interrupt can read TERMINATED; every grid cell must finish
        (Path(folder) / "tune" / f"{exp_name}.done").touch()
    return False


def _finished_cells(folder: str, cells: list[Cell]) -> int:
    """How many of the grid's cells finished (``trials/<cell>/done.json``). Searched cells are not counted this
    way: ASHA stops trials before their end, and two samples with the same values share one folder."""
    return sum(1 for cell in cells if (Path(folder) / "trials" / cell.id / "done.json").exists())


@contextlib.contextmanager
def _outside_job_working_dir(folder: str):
    """Run Tune from the sweep's own folder rather than from wherever the driver started; restore the old cwd
    after if it still exists.

    Tune's result analysis calls ``os.getcwd()``. Under ``ray job submit`` the driver starts in the job's unpacked
    ``--working-dir`` package, which Ray shares between jobs with the same content and may delete when an earlier,
    stopped job with that package releases it: a re-submitted sweep then loses its cwd halfway. Every path replab
    hands to Ray is absolute by now (:func:`replab.platform.train.resolve_paths`), so the cwd is free to change.
    """
    try:
        before = os.getcwd()
    except FileNotFoundError:
        before = None
    os.chdir(folder)
    try:
        yield
    finally:
        if before is not None and os.path.isdir(before):
            os.chdir(before)


def _trial_states(results) -> list[str]:
    """The status of every trial of a finished ``Tuner.fit`` (TERMINATED, ERROR, or unfinished ones)."""
    try:
        return [str(t.status) for t in results._experiment_analysis.trials]
    except AttributeError:  # no trial objects in this Ray version: a result without error is a finished trial
        return ["ERROR" if r.error else "TERMINATED" for r in results]


def _finish_parent(uri: str, parent_run_id: str, result: SweepResult, spec: SweepSpec) -> None:
    from replab.platform import tracking

    c = tracking.client(uri)
    done = [t for t in result.trials if t["status"] == "FINISHED"]
    train_time = sum(t["metrics"].get("compute/train_time_s", 0.0) for t in done)
    trial_wall = sum(t["metrics"].get("compute/wall_time_s", 0.0) for t in done)
    metrics = {"sweep/wall_time_s": result.wall_time_s, "sweep/trials_finished": len(done),
               "sweep/trials_failed": result.failed, "sweep/sum_trial_train_time_s": train_time,
               "sweep/sum_trial_wall_time_s": trial_wall,
               "sweep/total_train_flops": sum(t["metrics"].get("compute/train_flops", 0.0) for t in done)}
    retry(tracking.RunLogger(uri, parent_run_id).metrics, metrics, step=len(done))
    status = "KILLED" if result.interrupted else ("FAILED" if result.failed else "FINISHED")
    retry(c.set_terminated, parent_run_id, status=status)
