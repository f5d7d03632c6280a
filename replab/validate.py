"""The one place a run's config is fully validated, after loading.

:mod:`replab.config` holds the schema and checks names, types and ranges without importing the library. What
needs the library is checked here, in this order: the method's own parameters (the method registry), the
backbone (the model zoo), and the semi-supervised / open-set keys of the data section (the data layer).
Every failure is one :class:`~replab.config.ConfigError` line naming the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from replab.config import ConfigError, RunConfig, parse, read_raw
from replab.methods import registry
from replab.models import backbones
from replab.platform.data.labeled import validate as validate_semisup


def check(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its method parameters validated and typed; raises ConfigError on the first bad value."""
    params = registry.validate_params(cfg.method.name, dict(cfg.method.params))
    cfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, params=params))
    if cfg.model.backbone not in backbones.BACKBONES:
        raise ConfigError(
            f"model.backbone: {cfg.model.backbone!r} is not valid; choose one of: {', '.join(backbones.BACKBONES)}"
        )
    problem = backbones.input_problem(cfg.model.backbone, cfg.data.resolution, cfg.model.patch_size)
    if problem:
        raise ConfigError(problem)
    validate_semisup(cfg.data)
    return cfg


WORKER_MEMORY_GIB = 1.0
"""A floor on one train worker's resident memory (a Ray worker process with torch loaded, before data)."""


def check_fits_machine(cfg: RunConfig, cpus: int | None = None, available_gib: float | None = None,
                       gpus: int | None = None) -> None:
    """Refuse, in one line, a local run (no cluster address) that this machine cannot hold: more train workers
    than cores, ``num_workers x cpus_per_worker`` above the cores, more GPU workers than GPUs, or
    ``num_workers x WORKER_MEMORY_GIB`` above the available memory. Joining a cluster skips the check (Ray
    schedules there). ``cpus`` / ``available_gib`` / ``gpus``: this machine's (tests pass their own)."""
    if os.environ.get("RAY_ADDRESS"):
        return
    workers = max(cfg.train.num_workers, 1)
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    asked = workers * cfg.train.cpus_per_worker
    hint = "; lower train.num_workers / train.cpus_per_worker, or set RAY_ADDRESS to use a cluster"
    if workers > cpus or asked > cpus:
        raise ConfigError(f"train.num_workers: {workers} workers x {cfg.train.cpus_per_worker:g} CPUs "
                          f"= {asked:g} CPUs do not fit this machine's {cpus} cores{hint}")
    if cfg.train.use_gpu:
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
        if workers > gpus:
            raise ConfigError(f"train.num_workers: {workers} GPU workers but this machine has {gpus} GPUs{hint}")
    if available_gib is None:
        import psutil

        available_gib = psutil.virtual_memory().available / 2**30
    if workers * WORKER_MEMORY_GIB > available_gib:
        raise ConfigError(f"train.num_workers: {workers} workers need about {workers * WORKER_MEMORY_GIB:g} GiB "
                          f"but {available_gib:.1f} GiB is available{hint}")


def from_dict(raw: dict[str, Any], source_file: str = "") -> RunConfig:
    """Build and fully validate a :class:`RunConfig` from a plain mapping (as read from YAML)."""
    return check(parse(raw, source_file))


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read ``path`` (YAML; None: all defaults), apply ``--set`` overrides and validate."""
    raw, source = read_raw(path, overrides)
    return from_dict(raw, source_file=source)
