"""The method registry: ``@register`` on a :class:`~replab.methods.base.Method` subclass makes it
selectable as ``method.name`` in a config and listed by ``replab methods``.

Every module in :mod:`replab.methods` is imported on first use, so a new method is one new file.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from torch import nn

_METHODS: dict[str, type] = {}
_NOT_METHODS = {"base", "registry", "losses", "distributed"}
_loaded = False


def register(cls: type) -> type:
    """Class decorator: register ``cls`` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    import replab.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _NOT_METHODS and not info.name.startswith("_"):
            importlib.import_module(f"replab.methods.{info.name}")
    _loaded = True


def available() -> dict[str, type]:
    """Name -> method class, sorted by name."""
    _load_all()
    return dict(sorted(_METHODS.items()))


def get(name: str) -> type:
    methods = available()
    if name not in methods:
        from replab.config import ConfigError

        raise ConfigError(f"method.name: {name!r} is not valid; choose one of: {', '.join(methods)}")
    return methods[name]


def validate_params(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """Check ``values`` against the method's ``Params``; returns them with the defaults filled in."""
    import dataclasses

    from replab.methods.base import params_from_dict

    params = params_from_dict(get(name).Params, values, name)
    return dataclasses.asdict(params) if dataclasses.is_dataclass(params) else {}


def build(name: str, params: dict[str, Any], backbone: nn.Module, resolution: int):
    """Instantiate method ``name`` on ``backbone`` with its (validated) hyper-parameters."""
    from replab.methods.base import params_from_dict

    cls = get(name)
    return cls(backbone, params_from_dict(cls.Params, params, name), resolution)
