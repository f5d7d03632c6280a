"""The driver's Tune callback that settles each child run's MLflow status when Tune settles its trial: trials
stopped early by ASHA are marked FINISHED with ``replab.early_stopped``, failed trials FAILED.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from replab.platform.sweep.grid import trial_name
from replab.platform.sweep.runs import retry


def status_callback(uri: str, plan: dict[str, Any]):
    """A Tune callback on the driver that settles each child run's status when Tune settles its trial.

    A trial that finishes its run marks its child FINISHED itself; one that Tune stopped early (ASHA) was killed
    mid-run, so its child is still RUNNING here: it is tagged ``replab.early_stopped``, given the compute of the
    steps it ran, and marked FINISHED. An errored trial's child is marked FAILED. Never raises (an exception in a
    Tune callback would turn the trial into an error). The class lives at module level (built on first use,
    see :func:`__getattr__`): ``Tuner.restore`` unpickles the first attempt's callbacks, and a class pickled
    by reference runs the current code.
    """
    cls = globals().get("_StatusCallback") or __getattr__("_StatusCallback")
    return cls(uri, {k: v for k, v in plan.items() if k != "cells"})


def _make_status_callback_class():
    from ray.tune import Callback

    class _StatusCallback(Callback):
        def __init__(self, uri: str, plan: dict[str, Any]):
            self.uri = uri
            self.plan = plan

        def on_trial_complete(self, iteration, trials, trial, **info):
            try:
                _settle_early_stopped(self.uri, self.plan, trial)
            except Exception as exc:  # noqa: BLE001
                _log.warning("could not settle the MLflow run of %s: %s", _name_of(trial), exc)

        def on_trial_error(self, iteration, trials, trial, **info):
            try:
                _settle_errored(self.uri, self.plan, trial)
            except Exception as exc:  # noqa: BLE001
                _log.warning("could not mark the MLflow run of %s failed: %s", _name_of(trial), exc)

    _StatusCallback.__module__ = __name__
    _StatusCallback.__qualname__ = "_StatusCallback"
    return _StatusCallback


def __getattr__(name: str):
    """Build the Tune callback class on first use (importing Ray Tune only when a sweep runs)."""
    if name == "_StatusCallback":
        cls = _make_status_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_log = logging.getLogger(__name__)


def _name_of(trial) -> str:
    cfg = trial.config or {}
    return trial_name(str(cfg.get("cell", "")), {k: v for k, v in cfg.items() if k != "cell"})


def _child_of(uri: str, plan: dict[str, Any], trial):
    from replab.platform import tracking

    return retry(tracking.find_run, uri, plan["experiment"], f"{plan['name']}.{_name_of(trial)}")


def _settle_early_stopped(uri: str, plan: dict[str, Any], trial) -> None:
    from replab.platform import tracking

    run = _child_of(uri, plan, trial)
    if run is None or run.info.status != "RUNNING":
        return
    c = tracking.client(uri)
    last = trial.last_result or {}
    retry(c.set_tag, run.info.run_id, "replab.early_stopped", "true")
    compute_file = Path(plan["dir"]) / "trials" / _name_of(trial) / "compute.json"
    logged = retry(c.get_metric_history, run.info.run_id, "epoch")  # rank 0 may have run past Tune's last result
    steps = max([int(last.get("step", 0))] + [m.step for m in logged])
    if compute_file.exists() and steps:
        compute = json.loads(compute_file.read_text())
        retry(tracking.RunLogger(uri, run.info.run_id).metrics, {
            "compute/params": compute["params"], "compute/params_total": compute["params_total"],
            "compute/flops_per_step": compute["flops_per_step"],
            "compute/train_flops": compute["flops_per_step"] * steps, "compute/steps": steps,
            "compute/images_seen": steps * compute.get("batch_size", 0)}, step=steps)
    retry(c.set_terminated, run.info.run_id, status="FINISHED")


def _settle_errored(uri: str, plan: dict[str, Any], trial) -> None:
    from replab.platform import tracking

    run = _child_of(uri, plan, trial)
    if run is not None and run.info.status == "RUNNING":
        retry(tracking.client(uri).set_terminated, run.info.run_id, status="FAILED")


def trial_dirname(trial) -> str:
    cfg = trial.config or {}
    searched = {k: v for k, v in cfg.items() if k != "cell"}
    return trial_name(str(cfg.get("cell", trial.trial_id)), searched)
