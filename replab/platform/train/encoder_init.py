"""``model.init``: start a run from the encoder of another run, and find a finished run's checkpoint.

A target is an MLflow run id or run name, a run folder (``<storage>/<run name>``), a checkpoint folder (holding
``state.pt``), or an exported encoder file: ``encoder.safetensors`` (the ``model/`` artifact every run logs)
or a ``.pt`` holding a plain state dict of the encoder (keys with or without a ``backbone.`` prefix, or a whole
replab checkpoint). Only the encoder's weights are taken (the source method's ``encoder``: heads, teachers,
queues and the optimizer are not); they are loaded into the new run's backbone *before* its method is built,
so a method's momentum / EMA copies of the backbone start from them too. Shapes and backbones must agree:
otherwise one line names the first mismatching key and both shapes (or both backbones).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from replab.config import ConfigError, RunConfig
from replab.platform import tracking
from replab.platform.train import checkpoints
from replab.platform.train.checkpoints import CHECKPOINT_FILE, load_checkpoint
from replab.validate import from_dict

ENCODER_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
INIT_TAG = "replab.init_from"


def checkpoint_for(target: str, cfg: RunConfig) -> tuple[str, str | None]:
    """(local checkpoint folder, MLflow run id or None) for a checkpoint folder, run folder, run id or run name."""
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
        run = run_by_name(uri, cfg.tracking.experiment, target)
    if run is None:
        raise ConfigError(f"{target}: not a checkpoint folder, a run folder, an MLflow run id or a run name in {uri}")
    storage = run.data.params.get("train.storage_path", "")
    name = run.data.tags.get(tracking.RUN_TAG, "")
    found = checkpoints.latest_checkpoint(f"{storage.rstrip('/')}/{name}") if storage and name else None
    if not found:
        raise ConfigError(f"{target}: run {run.info.run_id} has no checkpoint under {storage}/{name}")
    return checkpoints.fetch(found), run.info.run_id


def run_by_name(uri: str, experiment: str, name: str) -> Any | None:
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
class InitSource:
    """Where ``model.init`` points: a checkpoint folder or an encoder file, and the MLflow run when known."""

    target: str
    path: str
    run_id: str | None
    is_file: bool

    @property
    def lineage(self) -> str:
        """The ``replab.init_from`` tag: the source run id, else the resolved path."""
        return self.run_id or self.path


def resolve(cfg: RunConfig) -> InitSource | None:
    """The source of ``cfg.model.init`` (None when unset); a ConfigError names ``model.init`` when not found."""
    target = cfg.model.init
    if not target:
        return None
    if Path(target).is_file():
        if not target.endswith(ENCODER_FILE_SUFFIXES):
            raise ConfigError(f"model.init: {target} is a file but not an encoder export "
                              f"({', '.join(ENCODER_FILE_SUFFIXES)})")
        return InitSource(target, str(Path(target).resolve()), None, True)
    try:
        folder, run_id = checkpoint_for(target, cfg)
    except ConfigError as exc:
        raise ConfigError(f"model.init: {exc}") from None
    return InitSource(target, folder, run_id, False)


def _strip(state: dict, prefix: str = "backbone.") -> dict:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def encoder_state(source: InitSource, build_method) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(the encoder's state dict, the source's ``model`` config section or None when the file has none);
    ``build_method(cfg)`` rebuilds a checkpoint's method to read its ``encoder``."""
    if source.is_file and source.path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(source.path, "pt") as f:
            meta = f.metadata() or {}
        model = json.loads(meta["backbone"]) if "backbone" in meta else None
        return _strip(load_file(source.path)), model
    if source.is_file:
        state = torch.load(source.path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ConfigError(f"model.init: {source.target} does not hold a state dict")
        if "method" in state and "config" in state:
            return _checkpoint_encoder(state, build_method)
        return _strip(state), None
    return _checkpoint_encoder(load_checkpoint(source.path), build_method)


def _checkpoint_encoder(state: dict, build_method) -> tuple[dict[str, torch.Tensor], dict]:
    """The source method's ``encoder`` weights out of a replab checkpoint (its own config rebuilds it)."""
    src_cfg = from_dict(state["config"])
    method = build_method(src_cfg)
    method.load_state_dict(state["method"])
    return {k: v.detach().clone() for k, v in method.encoder.state_dict().items()}, state["config"]["model"]


def load_into(backbone: torch.nn.Module, state: dict[str, torch.Tensor], source_model: dict | None,
              cfg: RunConfig, target: str) -> None:
    """Copy ``state`` into ``backbone``; a ConfigError (one line) at the first backbone, key or shape mismatch."""
    if source_model and source_model.get("backbone") != cfg.model.backbone:
        raise ConfigError(f"model.init: {target} is a {source_model.get('backbone')} encoder; this run builds "
                          f"{cfg.model.backbone} (model.backbone)")
    own = backbone.state_dict()
    for key, value in own.items():
        if key not in state:
            raise ConfigError(f"model.init: {target} has no {key!r} (shape {tuple(value.shape)}) for this run's "
                              f"{cfg.model.backbone}: another backbone or width")
        if tuple(state[key].shape) != tuple(value.shape):
            raise ConfigError(f"model.init: {key!r} is {tuple(state[key].shape)} in {target} but "
                              f"{tuple(value.shape)} in this run's {cfg.model.backbone} (width {cfg.model.width})")
    extra = [k for k in state if k not in own]
    if extra:
        raise ConfigError(f"model.init: {target} has {extra[0]!r} ({len(extra)} keys in all) that this run's "
                          f"{cfg.model.backbone} lacks: another backbone")
    backbone.load_state_dict(state, strict=True)


def initial_encoder(cfg: RunConfig, build_method) -> tuple[dict[str, torch.Tensor], dict | None, InitSource] | None:
    """(encoder state, source model section, source) of ``cfg.model.init``, or None when unset."""
    source = resolve(cfg)
    if source is None:
        return None
    state, model = encoder_state(source, build_method)
    return state, model, source
