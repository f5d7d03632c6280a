"""``replab eval``: evaluate the encoder of a finished (or running) run or of a checkpoint folder."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from replab.config import RunConfig
from replab.methods.base import Method
from replab.platform import tracking
from replab.platform.train.checkpoints import load_checkpoint
from replab.platform.train.encoder_init import checkpoint_for
from replab.platform.train.loop import build_method
from replab.validate import from_dict

_checkpoint_for = checkpoint_for  # the resolution shared with model.init (encoder_init)


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


