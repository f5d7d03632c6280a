"""The one place a run's config is fully validated, after loading.

:mod:`replab.config` holds the schema and checks names, types and ranges without importing the library. What
needs the library is checked here, in this order: the method's own parameters (the method registry), the
backbone (the model zoo), and the semi-supervised / open-set keys of the data section (the data layer).
Every failure is one :class:`~replab.config.ConfigError` line naming the key and the valid choices.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

from replab.config import ConfigError, MethodConfig, RunConfig, apply_override, parse, parse_override, read_raw
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


def with_recipe(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with its ``method.recipe`` applied under it: each of the recipe's ``section.key=value`` settings
    (the method's ``recipes``) fills a key the config leaves unset, so the config's own values win. ``paper`` (the
    default) is the method's published defaults and changes nothing."""
    method = raw.get("method") if isinstance(raw, dict) else None
    if not isinstance(method, dict) or str(method.get("recipe", MethodConfig.recipe)) == MethodConfig.recipe:
        return raw
    name, recipe = str(method.get("name", MethodConfig.name)), str(method["recipe"])
    recipes = registry.get(name).recipes
    if recipe not in recipes:
        raise ConfigError(f"method.recipe: {recipe!r} is not a recipe of {name}; choose one of: "
                          f"{', '.join([MethodConfig.recipe, *recipes])}")
    out = copy.deepcopy(raw)
    for setting in recipes[recipe]:
        key, value = parse_override(setting)
        if not is_set(out, key):
            apply_override(out, key, value)
    return out


def is_set(raw: dict[str, Any], key: str) -> bool:
    """Whether the plain config mapping sets ``key`` (``section.key``; a method parameter may also sit under
    ``method.params``)."""
    section, name = key.split(".", 1)
    values = raw.get(section) or {}
    return name in values or (section == "method" and name in (values.get("params") or {}))


def from_dict(raw: dict[str, Any], source_file: str = "") -> RunConfig:
    """Build and fully validate a :class:`RunConfig` from a plain mapping (as read from YAML), its method's recipe
    applied (:func:`with_recipe`)."""
    return check(parse(with_recipe(raw), source_file))


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read ``path`` (YAML; None: all defaults), apply ``--set`` overrides and validate."""
    raw, source = read_raw(path, overrides)
    return from_dict(raw, source_file=source)
