"""``replab eval``: evaluate the encoder of a finished (or running) run or of a checkpoint folder."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from replab.config import ConfigError, RunConfig
from replab.methods.base import Method
from replab.platform import tracking
from replab.platform.train import checkpoints
from replab.platform.train.checkpoints import CHECKPOINT_FILE, load_checkpoint
from replab.platform.train.loop import build_method
from replab.validate import from_dict


def _checkpoint_for(target: str, cfg: RunConfig) -> tuple[str, str | None]:
    """(local checkpoint folder, MLflow run id or None) for a folder, a run id or a run name."""
    if Path(target, CHECKPOINT_FILE).is_file():
        return target, None
    as_run = checkpoints.latest_checkpoint(target)
    if as_run:
        return checkpoints.fetch(as_run), None
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    client = tracking.client(uri)
    run = None
    try:
        run = client.get_run(target)
    except Exception:
        run = _run_by_name(uri, cfg.tracking.experiment, target)
    if run is None:
        raise ConfigError(f"{target}: not a checkpoint folder, a run folder, an MLflow run id or a run name in {uri}")
    storage = run.data.params.get("train.storage_path", "")
    name = run.data.tags.get(tracking.RUN_TAG, "")
    found = checkpoints.latest_checkpoint(f"{storage.rstrip('/')}/{name}") if storage and name else None
    if not found:
        raise ConfigError(f"{target}: run {run.info.run_id} has no checkpoint under {storage}/{name}")
    return checkpoints.fetch(found), run.info.run_id


def _run_by_name(uri: str, experiment: str, name: str) -> Any | None:
    """The run called ``name`` in ``experiment``, else in whichever single experiment has one; two or more
    experiments with that name is a one-line error listing them (choose with --set tracking.experiment=...)."""
    run = tracking.find_run(uri, experiment, name)
    if run is not None:
        return run
    found = tracking.find_run_anywhere(uri, name)
    if len(found) > 1:
        client = tracking.client(uri)
        names = sorted(client.get_experiment(r.info.experiment_id).name for r in found)
        raise ConfigError(f"{name}: a run of this name is in {len(found)} experiments ({', '.join(names)}); "
                          "choose one with --set tracking.experiment=NAME or pass the MLflow run id")
    return found[0] if found else None


@dataclass
class LoadedRun:
    """A run's trained method restored from its latest checkpoint, with the config to evaluate it under."""

    cfg: RunConfig
    """The run's own config, with the eval / tracking sections and the data root of the command line."""
    method: Method
    device: torch.device
    folder: str
    run_id: str | None
    epoch: int
    step: int

    def log(self, cli_cfg: RunConfig, results: dict[str, Any]) -> None:
        """Log the finite float ``results`` to the run's MLflow run as ``eval_cli/<name>`` (no run: nothing)."""
        if not (self.run_id and cli_cfg.tracking.enabled):
            return
        logger = tracking.RunLogger(tracking.resolve_tracking_uri(cli_cfg.tracking.uri), self.run_id)
        logger.metrics({f"eval_cli/{k.removeprefix('eval/')}": v for k, v in results.items()
                        if isinstance(v, float) and math.isfinite(v)}, step=self.step)


def load_run(target: str, cfg: RunConfig) -> LoadedRun:
    """The method of ``target`` (a checkpoint folder, run folder, MLflow run id or run name) on the local device.

    The run's model, method, data and resolution are kept; the eval section, tracking and data root come from
    ``cfg`` (the command line's).
    """
    from replab.platform.train.ray_train import resolve_paths

    folder, run_id = _checkpoint_for(target, cfg)
    state = load_checkpoint(folder)
    run_cfg = from_dict(state["config"])
    run_cfg = replace(run_cfg, eval=cfg.eval, tracking=cfg.tracking,
                      data=replace(run_cfg.data, root=cfg.data.root or run_cfg.data.root))
    run_cfg = resolve_paths(run_cfg)
    method = build_method(run_cfg)
    method.load_state_dict(state["method"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method.to(device)
    return LoadedRun(run_cfg, method, device, folder, run_id, int(state["epoch"]), int(state["step"]))


