"""The driver's Tune callback: it settles each child run's MLflow status when Tune settles its trial (trials
stopped early by ASHA are marked FINISHED with ``replab.early_stopped``, failed trials FAILED), and tells the
sweep's :class:`TrialPrinter` (one line per trial as it starts and ends, a progress bar) what happened.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from replab.platform.sweep.grid import trial_name
from replab.platform.sweep.runs import find_child, retry


class TrialPrinter:
    """The sweep's terminal: ``start``/``done``/``stopped``/``FAILED`` lines, one per trial event, written above a
    tqdm bar over the sweep's trials (the bar only on a terminal); a failed trial's error is printed in full."""

    def __init__(self, total: int, finished: set[str], labels: dict[str, str], metric: str,
                 echo: Callable[[str], None] | None = None):
        from tqdm.auto import tqdm

        self.labels, self.metric, self.finished = labels, metric, set(finished)
        self.started: dict[str, float] = {}
        self.count = len(self.finished)
        self.bar = tqdm(total=total, initial=len(self.finished), unit="trial", desc="sweep", disable=None,
                        leave=False, dynamic_ncols=True)
        self.echo = echo or self.bar.write

    def _label(self, name: str) -> str:
        """The trial's short run label (its cell's axis values, plus the searched values' hash)."""
        cell = max((c for c in self.labels if name.startswith(c)), key=len, default=None)
        return self.labels[cell] + name[len(cell):] if cell else name

    def _line(self, status: str, name: str, text: str = "") -> None:
        self.echo(f"  {status:<8}{self._label(name):<24}{text}".rstrip())

    def start(self, name: str) -> None:
        self.started[name] = time.time()
        self._line("start", name)

    def end(self, name: str, result: dict[str, Any], early_stopped: bool = False) -> None:
        seconds = time.time() - self.started.get(name, time.time())
        value = result.get(self.metric)
        shown = f"{self.metric} {value:.4f}" if isinstance(value, (int, float)) else f"{self.metric} -"
        self._line("stopped" if early_stopped else "done", name, f"{shown}  {seconds:.0f} s")
        if name not in self.finished:
            self.finished.add(name)
            self.count += 1
            self.bar.update(1)

    def error(self, name: str, error_text: str) -> None:
        seconds = time.time() - self.started.get(name, time.time())
        self._line("FAILED", name, f"after {seconds:.0f} s")
        self.echo(error_text.rstrip())
        self.count += 1
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


printer: TrialPrinter | None = None
"""The running sweep's printer (set by the driver): callbacks restored from an earlier attempt's pickle use it too."""


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

        def on_trial_start(self, iteration, trials, trial, **info):
            if printer is not None:
                printer.start(_name_of(trial))

        def on_trial_complete(self, iteration, trials, trial, **info):
            early = False
            try:
                early = _settle_early_stopped(self.uri, self.plan, trial)
            except Exception as exc:  # noqa: BLE001
                _log.warning("could not settle the MLflow run of %s: %s", _name_of(trial), exc)
            if printer is not None:
                printer.end(_name_of(trial), trial.last_result or {}, early)

        def on_trial_error(self, iteration, trials, trial, **info):
            try:
                _settle_errored(self.uri, self.plan, trial)
            except Exception as exc:  # noqa: BLE001
                _log.warning("could not mark the MLflow run of %s failed: %s", _name_of(trial), exc)
            if printer is not None:
                printer.error(_name_of(trial), _error_text(trial))

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


def _error_text(trial) -> str:
    """The trial's error in full (Tune's error file: the trial's traceback), or where to find it."""
    path = getattr(trial, "error_file", None)
    try:
        return Path(path).read_text() if path else "(no error file)"
    except OSError:
        return f"(error file {path} unreadable)"


def _child_of(uri: str, plan: dict[str, Any], trial):
    return find_child(uri, plan["parent_run_id"], _name_of(trial))


def _settle_early_stopped(uri: str, plan: dict[str, Any], trial) -> bool:
    """Settle a child that Tune stopped mid-run; True when there was one (the trial was stopped early)."""
    from replab.platform import tracking

    run = _child_of(uri, plan, trial)
    if run is None or run.info.status != "RUNNING":
        return False
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
            "compute/images_seen": steps * compute.get("batch_size", 0)}, step=0)
    retry(c.set_terminated, run.info.run_id, status="FINISHED")
    return True


def _settle_errored(uri: str, plan: dict[str, Any], trial) -> None:
    from replab.platform import tracking

    run = _child_of(uri, plan, trial)
    if run is not None and run.info.status == "RUNNING":
        retry(tracking.client(uri).set_terminated, run.info.run_id, status="FAILED")


def trial_dirname(trial) -> str:
    cfg = trial.config or {}
    searched = {k: v for k, v in cfg.items() if k != "cell"}
    return trial_name(str(cfg.get("cell", trial.trial_id)), searched)
