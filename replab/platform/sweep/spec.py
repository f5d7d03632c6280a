"""The ``sweep:`` section of an experiment YAML, parsed and checked (:func:`parse_spec`), and the axes it names.

The experiment YAML carries a ``sweep:`` section next to the usual run sections::

    sweep:
      name: cifar10-scaling          # optional; default: <yaml stem>-<hash of what defines the sweep>
      axes:                          # the grid is the product of the axes, in this order
        model_size: [{backbone: resnet18, width: 0.25}, {backbone: resnet18, width: 0.5}]   # or backbone names
        data_size: [1000, 5000]      # data.limit (nested seeded subsets by construction)
        resolution: [32, 64]         # data.resolution
        compute: [5, 10]             # train.epochs
        method.name: [simclr, byol]  # any config key
      search:                        # optional: Optuna inside every grid cell
        num_samples: 4
        metric: eval/knn_top1        # default: sweep.metric
        mode: max                    # default: max for eval/*, min otherwise
        space:
          train.lr: {type: loguniform, low: 0.05, high: 1.0}
      scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # or just "asha"; needs search
      max_concurrent: 1              # trials running at once
      trial_cpus: 0.1                # CPUs of the Tune function (the Train workers ask for their own)
      metric: eval/knn_top1          # the scaling metric: error = 1 - top1 (or the loss itself)
      bootstrap: 200                 # resamples for the report's confidence intervals
      trial_runner: auto             # auto: one-worker trials train in the Tune trial's process (direct),
                                     # several workers on Ray Train; or force direct / ray_train
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replab.config import SECTIONS, ConfigError

FIRST_CLASS_AXES = {
    "model_size": "model",
    "data_size": "data.limit",
    "resolution": "data.resolution",
    "compute": "train.epochs",
}
"""First-class axes and the config key(s) they set (``model_size`` sets model.backbone/width/...)."""


SCALING_X = {
    "model_size": "compute/params",
    "data_size": "compute/dataset_images",
    "resolution": "data.resolution",
    "compute": "compute/train_flops",
}
"""What a first-class axis is measured by in the scaling fits (a metric, or a param for resolution)."""


AXIS_SHORT = {"model_size": "m", "data_size": "d", "resolution": "r", "compute": "e"}


MODEL_KEYS = ("backbone", "width", "cifar_stem", "patch_size")


SWEEP_KEYS = ("name", "axes", "search", "scheduler", "max_concurrent", "trial_cpus", "metric", "bootstrap",
              "save_encoders", "trial_runner")


TRIAL_RUNNERS = ("auto", "direct", "ray_train")
"""How a trial trains: ``direct`` in the Tune trial's own process (one worker), ``ray_train`` on a Ray Train worker
group, ``auto`` direct for one worker and Ray Train for several."""


METRICS = ("eval/knn_top1", "eval/linear_top1", "train/epoch_loss")


SPACE_TYPES = ("uniform", "loguniform", "randint", "lograndint", "choice")


@dataclass
class SearchSpec:
    num_samples: int
    metric: str
    mode: str
    space: dict[str, dict[str, Any]]


@dataclass
class SchedulerSpec:
    type: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int | None = None


@dataclass
class SweepSpec:
    name: str
    axes: dict[str, list[Any]]
    search: SearchSpec | None = None
    scheduler: SchedulerSpec | None = None
    max_concurrent: int = 1
    trial_cpus: float = 0.1
    metric: str = "eval/knn_top1"
    bootstrap: int = 200
    save_encoders: bool = True
    trial_runner: str = "auto"


def error_of(metric: str, value: float) -> float:
    """The error that the scaling laws fit: ``1 - top1`` for accuracies, the value itself for losses."""
    return 1.0 - value if metric.startswith("eval/") else value


def _one_line(value: Any) -> str:
    return json.dumps(value, default=str) if not isinstance(value, str) else repr(value)


def _int(key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < minimum:
        raise ConfigError(f"{key}: {_one_line(value)} is not valid; expected an integer >= {minimum}")
    return int(value)


def _number(key: str, value: Any, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0):
        raise ConfigError(f"{key}: {_one_line(value)} is not valid; expected a {'positive ' if positive else ''}number")
    return float(value)


def axis_overrides(axis: str, value: Any, where: str) -> dict[str, Any]:
    """The ``section.key -> value`` settings one axis value stands for (validates the value's form)."""
    from replab.models import backbones

    if axis == "model_size":
        if isinstance(value, str):
            value = {"backbone": value}
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = {"width": value}
        if not isinstance(value, dict) or not value:
            raise ConfigError(f"{where}: {_one_line(value)} is not valid; expected a backbone name "
                              f"({', '.join(backbones.BACKBONES)}), a width, or a mapping of {', '.join(MODEL_KEYS)}")
        for key in value:
            if key not in MODEL_KEYS:
                raise ConfigError(f"{where}.{key}: unknown key; valid keys: {', '.join(MODEL_KEYS)}")
        if "backbone" in value and value["backbone"] not in backbones.BACKBONES:
            raise ConfigError(f"{where}.backbone: {_one_line(value['backbone'])} is not valid; "
                              f"choose one of: {', '.join(backbones.BACKBONES)}")
        if "width" in value:
            _number(f"{where}.width", value["width"])
        return {f"model.{k}": v for k, v in value.items()}
    if axis == "data_size":
        if value is None:
            return {"data.limit": None}
        return {"data.limit": _int(where, value)}
    if axis == "resolution":
        return {"data.resolution": _int(where, value, minimum=8)}
    if axis == "compute":
        return {"train.epochs": _int(where, value)}
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{where}: {_one_line(value)} is not valid; a config-key axis takes plain values")
    return {axis: value}


def axis_label(axis: str, value: Any) -> str:
    """A short, path-safe label of one axis value (used in cell ids, tags and plots)."""
    if axis == "model_size":
        settings = axis_overrides(axis, value, axis)
        parts = []
        if "model.backbone" in settings:
            parts.append(str(settings["model.backbone"]).replace("resnet", "r").replace("vit_", "vit"))
        if "model.width" in settings:
            parts.append(f"w{float(settings['model.width']):g}")
        for key in ("model.patch_size", "model.cifar_stem"):
            if key in settings:
                parts.append(f"{key.split('.')[1][0]}{settings[key]}")
        text = "".join(parts)
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def axis_short(axis: str) -> str:
    """``m``/``d``/``r``/``e`` for the first-class axes, else the key's last part (its section for ``*.name``)."""
    if axis in AXIS_SHORT:
        return AXIS_SHORT[axis]
    parts = axis.split(".")
    return (parts[0] if parts[-1] == "name" else parts[-1]) + "-"


def parse_spec(raw: dict, source: str = "") -> SweepSpec:
    """Validate the ``sweep`` section of a plain config mapping; one-line :class:`ConfigError` otherwise."""
    sweep = raw.get("sweep")
    if not sweep:
        raise ConfigError("sweep: missing; add a sweep section with axes (see replab.platform.sweep.spec)")
    if not isinstance(sweep, dict):
        raise ConfigError("sweep: expected a mapping with keys: " + ", ".join(SWEEP_KEYS))
    for key in sweep:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"sweep.{key}: unknown key; valid keys: {', '.join(SWEEP_KEYS)}")
    axes, set_keys = _parse_axes(sweep.get("axes"))
    metric = sweep.get("metric", "eval/knn_top1")
    if metric not in METRICS:
        raise ConfigError(f"sweep.metric: {_one_line(metric)} is not valid; choose one of: {', '.join(METRICS)}")
    search = _parse_search(sweep["search"], metric, set_keys) if sweep.get("search") is not None else None
    scheduler = _parse_scheduler(sweep.get("scheduler"), search)

    runner = sweep.get("trial_runner", "auto")
    if runner not in TRIAL_RUNNERS:
        raise ConfigError(f"sweep.trial_runner: {_one_line(runner)} is not valid; choose one of: "
                          f"{', '.join(TRIAL_RUNNERS)}")
    name = sweep.get("name") or ""
    if name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", str(name)):
        raise ConfigError(f"sweep.name: {_one_line(name)} is not valid; use letters, digits and _ . + -")
    if not name:
        name = f"{Path(source).stem if source else 'sweep'}-{sweep_digest(raw)}"
    return SweepSpec(
        name=str(name),
        axes=axes,
        search=search,
        scheduler=scheduler,
        max_concurrent=_int("sweep.max_concurrent", sweep.get("max_concurrent", 1)),
        trial_cpus=_number("sweep.trial_cpus", sweep.get("trial_cpus", 0.1)),
        metric=metric,
        bootstrap=_int("sweep.bootstrap", sweep.get("bootstrap", 200), minimum=0),
        save_encoders=bool(sweep.get("save_encoders", True)),
        trial_runner=str(runner),
    )


def _parse_axes(raw_axes: Any) -> tuple[dict[str, list], dict[str, str]]:
    """(axis -> values, config key -> the axis that sets it) of ``sweep.axes``; every value is checked."""
    axes = _flatten_axes(raw_axes)
    if not isinstance(axes, dict) or not axes:
        raise ConfigError("sweep.axes: expected a mapping of axis -> list of values; axes: "
                          f"{', '.join(FIRST_CLASS_AXES)} or any section.key")
    set_keys: dict[str, str] = {}
    for axis, values in axes.items():
        axis = str(axis)
        if axis not in FIRST_CLASS_AXES:
            section = axis.partition(".")[0]
            if "." not in axis or section not in SECTIONS or section == "tracking":
                raise ConfigError(f"sweep.axes.{axis}: unknown axis; choose one of: {', '.join(FIRST_CLASS_AXES)} "
                                  f"or a config key section.key with section one of: "
                                  f"{', '.join(s for s in SECTIONS if s != 'tracking')}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.axes.{axis}: expected a non-empty list of values")
        keys = ("model.backbone", "model.width", "model.cifar_stem", "model.patch_size") if axis == "model_size" \
            else (FIRST_CLASS_AXES.get(axis, axis),)
        for i, value in enumerate(values):
            axis_overrides(axis, value, f"sweep.axes.{axis}[{i}]")
        labels = [axis_label(axis, v) for v in values]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"sweep.axes.{axis}: repeated values {labels}; each value must be distinct")
        for key in keys:
            if key in set_keys and set_keys[key] != axis:
                raise ConfigError(f"sweep.axes: {set_keys[key]} and {axis} both set {key}; keep one of them")
            set_keys[key] = axis
    return {str(k): list(v) for k, v in axes.items()}, set_keys


def _parse_search(s: Any, metric: str, set_keys: dict[str, str]) -> SearchSpec:
    """``sweep.search``: Optuna's samples per cell, its metric and mode, and the searched space."""
    if not isinstance(s, dict):
        raise ConfigError("sweep.search: expected a mapping with keys: num_samples, metric, mode, space")
    for key in s:
        if key not in ("num_samples", "metric", "mode", "space"):
            raise ConfigError(f"sweep.search.{key}: unknown key; valid keys: num_samples, metric, mode, space")
    num_samples = _int("sweep.search.num_samples", s.get("num_samples", 4))
    s_metric = str(s.get("metric", metric))
    mode = s.get("mode", "max" if s_metric.startswith("eval/") else "min")
    if mode not in ("min", "max"):
        raise ConfigError(f"sweep.search.mode: {_one_line(mode)} is not valid; choose one of: min, max")
    space = s.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError("sweep.search.space: expected a mapping of section.key -> {type, low, high} or "
                          "{type: choice, values}")
    for key, dist in space.items():
        where = f"sweep.search.space.{key}"
        if "." not in str(key) or str(key).partition(".")[0] not in SECTIONS:
            raise ConfigError(f"{where}: expected a config key section.key with section one of: "
                              f"{', '.join(SECTIONS)}")
        if key in set_keys:
            raise ConfigError(f"{where}: {key} is already set by the grid axis {set_keys[key]}; keep one")
        if not isinstance(dist, dict) or dist.get("type") not in SPACE_TYPES:
            raise ConfigError(f"{where}.type: {_one_line(dist.get('type') if isinstance(dist, dict) else dist)} "
                              f"is not valid; choose one of: {', '.join(SPACE_TYPES)}")
        if dist["type"] == "choice":
            if not isinstance(dist.get("values"), list) or not dist["values"]:
                raise ConfigError(f"{where}.values: expected a non-empty list")
        else:
            low = _number(f"{where}.low", dist.get("low"), positive=dist["type"].startswith("log"))
            high = _number(f"{where}.high", dist.get("high"), positive=dist["type"].startswith("log"))
            if high <= low:
                raise ConfigError(f"{where}.high: {high:g} is not valid; expected a number above low={low:g}")
    return SearchSpec(num_samples, s_metric, mode, {str(k): dict(v) for k, v in space.items()})


def _parse_scheduler(sched: Any, search: SearchSpec | None) -> SchedulerSpec | None:
    """``sweep.scheduler``: ASHA within each grid cell (it needs ``sweep.search``), or none."""
    if sched in (None, "none", False):
        return None
    if isinstance(sched, str):
        sched = {"type": sched}
    if not isinstance(sched, dict) or sched.get("type") != "asha":
        kind = sched.get("type") if isinstance(sched, dict) else sched
        raise ConfigError(f"sweep.scheduler: {_one_line(kind)} is not valid; choose one of: asha, none")
    for key in sched:
        if key not in ("type", "grace_period", "reduction_factor", "max_t"):
            raise ConfigError(f"sweep.scheduler.{key}: unknown key; valid keys: type, grace_period, "
                              "reduction_factor, max_t")
    if search is None:
        raise ConfigError("sweep.scheduler: asha stops trials within one grid cell and needs sweep.search "
                          "(several trials per cell)")
    scheduler = SchedulerSpec(
        grace_period=_int("sweep.scheduler.grace_period", sched.get("grace_period", 1)),
        reduction_factor=_number("sweep.scheduler.reduction_factor", sched.get("reduction_factor", 2)),
        max_t=_int("sweep.scheduler.max_t", sched["max_t"]) if sched.get("max_t") is not None else None,
    )
    if scheduler.reduction_factor <= 1:
        raise ConfigError("sweep.scheduler.reduction_factor: expected a number above 1")
    return scheduler


def _flatten_axes(axes: Any) -> Any:
    """``{method: {name: [...]}}`` -> ``{method.name: [...]}`` (what ``--set sweep.axes.method.name=[...]``
    produces), the nested form winning over an existing dotted key; a null axis is dropped."""
    if not isinstance(axes, dict):
        return axes
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: dict) -> None:
        for key, value in node.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict) and name not in FIRST_CLASS_AXES:
                walk(name, value)
            else:
                flat[name] = value

    walk("", axes)
    return {k: v for k, v in flat.items() if v is not None}


def uses_pool(data: Any) -> bool:
    """True when the training images are a mixed unlabeled pool (``data.ood_fraction`` / ``data.mix``): then
    ``data_size`` sets the pool size ``data.unlabeled_size`` instead of ``data.limit``."""
    return getattr(data, "ood_fraction", None) is not None or bool(getattr(data, "mix", None))


def sweep_digest(raw: dict) -> str:
    """A hash of what defines the sweep's trials (not where they are stored or logged, nor concurrency)."""
    d = copy.deepcopy(raw)
    d.pop("tracking", None)
    (d.get("data") or {}).pop("root", None)
    for key in ("storage_path", "name", "log_every", "max_failures"):
        (d.get("train") or {}).pop(key, None)
    for key in ("name", "max_concurrent", "trial_cpus", "metric", "bootstrap", "save_encoders", "trial_runner"):
        (d.get("sweep") or {}).pop(key, None)
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]
