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
    validate_semisup(cfg.data)
    return cfg


def from_dict(raw: dict[str, Any], source_file: str = "") -> RunConfig:
    """Build and fully validate a :class:`RunConfig` from a plain mapping (as read from YAML)."""
    return check(parse(raw, source_file))


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read ``path`` (YAML; None: all defaults), apply ``--set`` overrides and validate."""
    raw, source = read_raw(path, overrides)
    return from_dict(raw, source_file=source)
