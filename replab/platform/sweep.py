"""``replab sweep``: a grid of training runs (optionally with Optuna search and ASHA per grid cell) on Ray Tune.

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

Execution. Each trial is a full replab training run: a Tune *function trainable* (:func:`_trial`) builds and
fits a Ray Train ``TorchTrainer`` over :func:`replab.platform.train._ray_train_fn` with
``RunConfig(name=<trial name>, storage_path=<sweep dir>/train, callbacks=[TuneReportCallback()])``, so every
epoch's report is a Tune iteration (ASHA can stop it). A plain grid is one ``Tuner`` over
``grid_search(cells)`` (cells run concurrently up to ``max_concurrent``); with search, ``grid_search`` cannot
combine with Optuna, so each cell gets its own ``Tuner`` (its trials run concurrently).

Names are deterministic: the trial name is the cell id (plus a hash of the searched values), so an
interrupted sweep resumes by re-running the same command (or ``--resume``): ``Tuner.restore`` skips finished
trials, and an unfinished trial's ``TorchTrainer`` finds its own checkpoints under
``<sweep dir>/train/<trial name>``. A trial that already finished (``trials/<name>/done.json``) only
re-reports its result. State lives in ``<train.storage_path>/sweeps/<sweep name>/``.

MLflow. One parent run per sweep (created on the driver; tag ``replab.sweep``), one nested child run per
trial (opened by the trial with the parent's id; rank 0 logs the per-step and per-epoch history into it by
id). Axis values are the child's ``sweep.<axis>`` params and tags. Every trial records its compute:
encoder and total parameters, training FLOPs (``FlopCounterMode`` on one training step of the method on a
dummy batch of the global batch size, on the meta device, times the steps run), images seen, training and
wall time, accelerator. Trials stopped early by ASHA are marked FINISHED with ``replab.early_stopped``;
failed trials FAILED; trials cut off by an interrupted sweep KILLED (on the next start when the driver died
without a chance to mark them). SQLite under concurrent writers: every MLflow write here is retried.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from replab.config import SECTIONS, ConfigError, RunConfig, apply_override, from_dict, parse_override

# ---------------------------------------------------------------------------------------------- the spec

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
              "save_encoders")
METRICS = ("eval/knn_top1", "eval/linear_top1", "train/epoch_loss")
SPACE_TYPES = ("uniform", "loguniform", "randint", "lograndint", "choice")
SWEEP_TAG = "replab.sweep"
ROLE_TAG = "replab.role"
TRIAL_TAG = "replab.trial"
CELL_TAG = "replab.cell"


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


@dataclass
class Cell:
    """One point of the grid: its id, axis values and the validated run config (paths resolved)."""

    id: str
    index: int
    axes: dict[str, Any]
    labels: dict[str, str]
    config: RunConfig

    def plan(self) -> dict[str, Any]:
        return {"id": self.id, "axes": self.axes}


def error_of(metric: str, value: float) -> float:
    """The error that the scaling laws fit: ``1 - top1`` for accuracies, the value itself for losses."""
    return 1.0 - value if metric.startswith("eval/") else value


def load_raw(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> tuple[dict, str]:
    """The plain YAML mapping with ``--set`` overrides applied (what :func:`replab.config.load_config` validates)."""
    raw: dict[str, Any] = {}
    source = ""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            line = str(exc).replace("\n", " ")
            raise ConfigError(f"{path}: not valid YAML ({line})") from None
        source = str(p.resolve())
    for item in overrides:
        key, value = parse_override(item)
        apply_override(raw, key, value)
    return raw, source


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


def _base_without_sweep(raw: dict) -> dict:
    base = copy.deepcopy({k: v for k, v in raw.items() if k != "sweep"})
    return base


def _build(base: dict, settings: dict[str, Any], where: str) -> RunConfig:
    raw = copy.deepcopy(base)
    for key, value in settings.items():
        apply_override(raw, key, value)
    try:
        return from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def parse_spec(raw: dict, source: str = "") -> SweepSpec:
    """Validate the ``sweep`` section of a plain config mapping; one-line :class:`ConfigError` otherwise."""
    sweep = raw.get("sweep")
    if not sweep:
        raise ConfigError("sweep: missing; add a sweep section with axes (see replab.platform.sweep)")
    if not isinstance(sweep, dict):
        raise ConfigError("sweep: expected a mapping with keys: " + ", ".join(SWEEP_KEYS))
    for key in sweep:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"sweep.{key}: unknown key; valid keys: {', '.join(SWEEP_KEYS)}")
    axes = _flatten_axes(sweep.get("axes"))
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
    metric = sweep.get("metric", "eval/knn_top1")
    if metric not in METRICS:
        raise ConfigError(f"sweep.metric: {_one_line(metric)} is not valid; choose one of: {', '.join(METRICS)}")

    search = None
    if sweep.get("search") is not None:
        s = sweep["search"]
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
        search = SearchSpec(num_samples, s_metric, mode, {str(k): dict(v) for k, v in space.items()})

    scheduler = None
    sched = sweep.get("scheduler")
    if sched not in (None, "none", False):
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

    name = sweep.get("name") or ""
    if name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", str(name)):
        raise ConfigError(f"sweep.name: {_one_line(name)} is not valid; use letters, digits and _ . + -")
    if not name:
        name = f"{Path(source).stem if source else 'sweep'}-{sweep_digest(raw)}"
    return SweepSpec(
        name=str(name),
        axes={str(k): list(v) for k, v in axes.items()},
        search=search,
        scheduler=scheduler,
        max_concurrent=_int("sweep.max_concurrent", sweep.get("max_concurrent", 1)),
        trial_cpus=_number("sweep.trial_cpus", sweep.get("trial_cpus", 0.1)),
        metric=metric,
        bootstrap=_int("sweep.bootstrap", sweep.get("bootstrap", 200), minimum=0),
        save_encoders=bool(sweep.get("save_encoders", True)),
    )


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
    for key in ("name", "max_concurrent", "trial_cpus", "metric", "bootstrap", "save_encoders"):
        (d.get("sweep") or {}).pop(key, None)
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


def expand(raw: dict, spec: SweepSpec, resolve: bool = True) -> list[Cell]:
    """The grid: one validated :class:`Cell` per combination of axis values (the product, in axis order)."""
    from replab.platform.train import resolve_paths

    base = _base_without_sweep(raw)
    base_cfg = _build(base, {}, "config")
    _check_spec_against_config(spec, base_cfg)
    names = list(spec.axes)
    cells = []
    seen: set[str] = set()
    for index, combo in enumerate(itertools.product(*(spec.axes[a] for a in names))):
        settings: dict[str, Any] = {}
        axes = dict(zip(names, combo))
        for axis, value in axes.items():
            settings.update(axis_overrides(axis, value, f"sweep.axes.{axis}"))
        labels = {a: axis_label(a, v) for a, v in axes.items()}
        where = "sweep cell " + ", ".join(f"{a}={labels[a]}" for a in names)
        if "data_size" in axes and uses_pool(_build(base, {k: v for k, v in settings.items() if k != "data.limit"},
                                                    where).data):
            settings["data.unlabeled_size"] = settings.pop("data.limit")
        cfg = _build(base, settings, where)
        _check_cell(cfg, spec, where)
        if resolve:
            cfg = resolve_paths(cfg)
        cell_id = f"c{index:03d}-" + "_".join(f"{axis_short(a)}{labels[a]}" for a in names)
        cell_id = cell_id[:120]
        if cell_id in seen:
            cell_id = f"{cell_id}-{index}"
        seen.add(cell_id)
        cells.append(Cell(cell_id, index, {a: _jsonable(v) for a, v in axes.items()}, labels, cfg))
    if spec.search is not None:
        for cell in cells:
            for key, dist in spec.search.space.items():
                values = dist["values"] if dist["type"] == "choice" else [dist["low"], dist["high"]]
                for value in values:
                    if dist["type"] in ("randint", "lograndint"):
                        value = int(value)
                    _build(_cell_raw(cell.config), {key: value}, f"sweep.search.space.{key} (cell {cell.id})")
    return cells


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _check_spec_against_config(spec: SweepSpec, cfg: RunConfig) -> None:
    if not cfg.tracking.enabled:
        raise ConfigError("tracking.enabled: replab sweep records every trial in MLflow; set tracking.enabled=true")


def _check_cell(cfg: RunConfig, spec: SweepSpec, where: str) -> None:
    if spec.metric == "eval/knn_top1" and not cfg.eval.knn:
        raise ConfigError(f"sweep.metric: eval/knn_top1 needs eval.knn=true ({where}); or choose eval/linear_top1, "
                          "train/epoch_loss")
    if spec.metric == "eval/linear_top1" and not cfg.eval.linear:
        raise ConfigError(f"sweep.metric: eval/linear_top1 needs eval.linear=true ({where}); or choose "
                          "eval/knn_top1, train/epoch_loss")
    if spec.search is not None and spec.search.metric.startswith("eval/"):
        kind = spec.search.metric.split("/")[1].split("_")[0]
        if kind in ("knn", "linear") and not getattr(cfg.eval, kind):
            raise ConfigError(f"sweep.search.metric: {spec.search.metric} needs eval.{kind}=true ({where})")
        if spec.scheduler is not None and cfg.eval.every != 1:
            raise ConfigError(f"sweep.scheduler: asha compares {spec.search.metric} after every epoch; set "
                              "eval.every=1 or sweep.search.metric=train/epoch_loss")
    key = "data.unlabeled_size" if uses_pool(cfg.data) else "data.limit"
    size = getattr(cfg.data, key.split(".")[1], None)
    if size is not None and size < cfg.train.batch_size:
        raise ConfigError(f"{key}: {size} is below train.batch_size={cfg.train.batch_size} ({where}); "
                          "raise the data size or lower the batch size")


def _cell_raw(cfg: RunConfig) -> dict[str, Any]:
    """A cell's config as a plain mapping that :func:`from_dict` accepts again."""
    d = cfg.to_dict()
    d.pop("sweep", None)
    d.pop("source_file", None)
    return d


def trial_name(cell_id: str, searched: dict[str, Any]) -> str:
    if not searched:
        return cell_id
    digest = hashlib.sha1(json.dumps(searched, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{cell_id}-s{digest}"


def sweep_dir(cfg: RunConfig, name: str) -> str:
    base = cfg.train.storage_path
    return f"{base.rstrip('/')}/sweeps/{name}"


# ---------------------------------------------------------------------------------------------- compute


def count_compute(cfg: RunConfig) -> dict[str, Any]:
    """Parameters and FLOPs of one training step (forward + backward) of the method at the global batch size.

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode` on the meta device (shapes only, no
    arithmetic), falling back to a real CPU step on a small batch scaled linearly when a method does
    something the meta device cannot (data-dependent control flow). Optimizer updates, augmentation and
    teacher updates are not counted (they are a few FLOPs per parameter, not per pixel).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from replab.methods.base import Support
    from replab.platform.loop import build_method

    batch = cfg.train.batch_size

    def one_step(device: str, b: int) -> tuple[float, Any]:
        with torch.device(device):
            torch.manual_seed(0)
            method = build_method(cfg)
            views = [torch.rand(b, 3, s.size, s.size) for s in method.views()]
            labels = torch.randint(0, 10, (b,))
            extra = {}
            spec = method.support()
            if spec is not None:  # semi-supervised methods also see a labeled support batch every step
                classes = spec.classes_per_step or len(cfg.data.known_classes or range(10))
                n = classes * spec.images_per_class
                extra["support"] = Support([torch.rand(n, 3, v.size, v.size) for v in spec.views],
                                           torch.arange(classes).repeat_interleave(spec.images_per_class))
        with FlopCounterMode(display=False) as counter:
            out = method(views, labels, **extra)
            out.loss.backward()
        return float(counter.get_total_flops()), method

    how = "meta"
    try:
        flops, method = one_step("meta", batch)
    except Exception:  # noqa: BLE001 - data-dependent ops: count a real small step on the CPU instead
        how = "cpu-extrapolated"
        small = max(2, min(8, batch))
        f1, method = one_step("cpu", small)
        f2, _ = one_step("cpu", 2 * small)
        per_image = (f2 - f1) / small
        flops = f1 + per_image * (batch - small)
    encoder = sum(p.numel() for p in method.encoder.parameters())
    total = sum(p.numel() for p in method.parameters())
    return {"params": int(encoder), "params_total": int(total), "flops_per_step": flops,
            "flops_per_image": flops / batch, "batch_size": batch, "counted_on": how}


def accelerator(cfg: RunConfig) -> str:
    """What the trial trains on, in words (``2x GPU:H100`` or the CPU model)."""
    import ray

    workers = max(cfg.train.num_workers, 1)
    if cfg.train.use_gpu:
        kinds = sorted(k.split(":", 1)[1] for k in ray.cluster_resources() if k.startswith("accelerator_type:"))
        return f"{workers}x GPU" + (f":{'/'.join(kinds)}" if kinds else "")
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{workers}x CPU ({cfg.train.cpus_per_worker:g} cores)" + (f" {model}" if model else "")


# ---------------------------------------------------------------------------------------------- MLflow


def retry(fn, *args, attempts: int = 8, **kwargs):
    """Call ``fn``, retrying on errors (SQLite answers "database is locked" under concurrent writers)."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001
            if attempt == attempts - 1:
                raise
            time.sleep(0.25 * (attempt + 1))


def _search_runs(uri: str, experiment_ids: list[str], filter_string: str, max_results: int = 5000):
    from replab.platform import tracking

    return retry(tracking.client(uri).search_runs, experiment_ids, filter_string=filter_string,
                 max_results=max_results)


def find_parent(uri: str, experiment: str, name: str):
    from replab.platform import tracking

    exp = retry(tracking.experiment_id, uri, experiment)
    runs = _search_runs(uri, [exp], f"tags.`{SWEEP_TAG}` = '{name}' and tags.`{ROLE_TAG}` = 'sweep'")
    runs = sorted(runs, key=lambda r: r.info.start_time or 0)
    return runs[-1] if runs else None


def children(uri: str, parent) -> list:
    return _search_runs(uri, [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")


def open_parent(cfg: RunConfig, spec: SweepSpec, cells: list[Cell], folder: str, raw: dict) -> str:
    """Create the sweep's parent run, or re-open the one of an earlier (interrupted) attempt."""
    from replab.platform import tracking

    uri, c = cfg.tracking.uri, tracking.client(cfg.tracking.uri)
    existing = find_parent(uri, cfg.tracking.experiment, spec.name)
    if existing is not None:
        retry(c.update_run, existing.info.run_id, status="RUNNING")
        return existing.info.run_id
    tags = {SWEEP_TAG: spec.name, ROLE_TAG: "sweep", "mlflow.runName": spec.name, "replab.sweep_dir": folder,
            tracking.RUN_TAG: f"sweep:{spec.name}"}
    run = retry(c.create_run, retry(tracking.experiment_id, uri, cfg.tracking.experiment), tags=tags,
                run_name=spec.name)
    run_id = run.info.run_id
    params = {"sweep.name": spec.name, "sweep.cells": len(cells), "sweep.axes": json.dumps(spec.axes),
              "sweep.metric": spec.metric, "sweep.max_concurrent": spec.max_concurrent,
              "sweep.search": json.dumps(spec.search.__dict__) if spec.search else "none",
              "sweep.scheduler": json.dumps(spec.scheduler.__dict__) if spec.scheduler else "none"}
    params.update({k: v for k, v in cells[0].config.flat().items() if not k.startswith("tracking.")})
    retry(tracking.log_params, uri, run_id, params)
    retry(c.log_dict, run_id, {k: v for k, v in raw.items()}, "sweep_config.yaml")
    return run_id


def mark_stale_children(uri: str, parent_run_id: str, status: str = "KILLED") -> int:
    """Children left RUNNING by a driver that died: mark them (their trials resume into the same run)."""
    from replab.platform import tracking

    c = tracking.client(uri)
    parent = retry(c.get_run, parent_run_id)
    n = 0
    for run in children(uri, parent):
        if run.info.status in ("RUNNING", "SCHEDULED"):
            retry(c.set_terminated, run.info.run_id, status=status)
            n += 1
    return n


def _open_child(cfg: RunConfig, parent_run_id: str, run_label: str, params: dict, tags: dict) -> str:
    """The trial's child run: created with the parent's id, or re-opened when the trial resumes."""
    from replab.platform import tracking

    uri, c = cfg.tracking.uri, tracking.client(cfg.tracking.uri)
    existing = retry(tracking.find_run, uri, cfg.tracking.experiment, run_label)
    if existing is not None and existing.info.status != "FINISHED":
        retry(c.update_run, existing.info.run_id, status="RUNNING")
        return existing.info.run_id
    all_tags = {tracking.RUN_TAG: run_label, "mlflow.runName": run_label, "mlflow.parentRunId": parent_run_id, **tags}
    exp = retry(tracking.experiment_id, uri, cfg.tracking.experiment)
    run = retry(c.create_run, exp, tags=all_tags, run_name=run_label)
    retry(tracking.log_params, uri, run.info.run_id, params)
    return run.info.run_id


# ---------------------------------------------------------------------------------------------- the trial


def build_trial_data(cfg: RunConfig):
    """The training ``TrainData`` of a trial: the same stream ``replab train`` builds (the dataset, or the
    mixed unlabeled pool of a semi-supervised / open-set config)."""
    from replab.platform.train import build_train_data

    return build_train_data(cfg)


def _json_write(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _trial(config: dict[str, Any], plan: dict[str, Any] | None = None) -> None:
    """The Tune function trainable: one full replab training run (Ray Train inside the Tune trial)."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from replab.platform import tracking
    from replab.platform.train import _log_outputs, _ray_train_fn

    start = time.time()
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # this trial drives its own Ray Data pipeline
    cell = plan["cells"][config["cell"]]
    searched = {k: v for k, v in config.items() if k != "cell"}
    name = trial_name(config["cell"], searched)
    raw = copy.deepcopy(cell["config"])
    for key, value in searched.items():
        apply_override(raw, key, value)
    raw["train"]["name"] = name
    raw["train"]["storage_path"] = f"{plan['dir']}/train"
    cfg = from_dict(raw)
    folder = Path(plan["dir"]) / "trials" / name
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "done.json"
    if done.exists():  # finished earlier: only re-report (Tune lost track of it, e.g. a driver killed mid-save)
        with open(folder / "rereports.log", "a") as f:
            f.write(json.dumps({"time": start, "pid": os.getpid()}) + "\n")
        ray.tune.report(json.loads(done.read_text())["result"])
        return
    with open(folder / "starts.log", "a") as f:  # one line per training attempt (a resume adds one)
        f.write(json.dumps({"time": start, "pid": os.getpid()}) + "\n")

    phases: dict[str, float] = {}
    mark = time.time()
    compute_file = folder / "compute.json"
    if compute_file.exists():
        compute = json.loads(compute_file.read_text())
    else:
        compute = count_compute(cfg)
        compute["accelerator"] = accelerator(cfg)
        _json_write(compute_file, compute)

    uri = cfg.tracking.uri
    axis_params = {f"sweep.{a}": cell["labels"][a] for a in cell["axes"]}
    axis_params.update({f"sweep.search.{k}": v for k, v in searched.items()})
    tags = {SWEEP_TAG: plan["name"], ROLE_TAG: "trial", TRIAL_TAG: name, CELL_TAG: config["cell"],
            "method": cfg.method.name, "backbone": cfg.model.backbone, "dataset": cfg.data.dataset,
            "compute.accelerator": compute["accelerator"], **axis_params}
    params = {**cfg.flat(), **axis_params, "compute.params": compute["params"],
              "compute.params_total": compute["params_total"], "compute.flops_per_step": compute["flops_per_step"],
              "compute.flops_counted_on": compute["counted_on"]}
    params = {k: v for k, v in params.items() if not k.startswith("tracking.")}
    phases["compute_count_s"], mark = time.time() - mark, time.time()
    run_id = _open_child(cfg, plan["parent_run_id"], f"{plan['name']}.{name}", params, tags)
    logger = tracking.RunLogger(uri, run_id)
    phases["mlflow_open_s"], mark = time.time() - mark, time.time()
    try:
        train_data = build_trial_data(cfg)
        phases["dataset_s"], mark = time.time() - mark, time.time()
        loop_config = {"config": _cell_raw(cfg), "num_rows": train_data.num_rows,
                       "shuffle_buffer": train_data.shuffle_buffer, "skip_counter": train_data.counter_name,
                       "run_id": run_id, "tracking_uri": uri}
        trainer = TorchTrainer(
            _ray_train_fn,
            train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})},
            ),
            run_config=ray.train.RunConfig(
                name=name, storage_path=cfg.train.storage_path,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
                callbacks=[TuneReportCallback()],
            ),
            datasets={"train": train_data.dataset},
        )
        fit_start = time.time()
        result = trainer.fit()
        fit_wall = time.time() - fit_start
        phases["fit_s"], mark = fit_wall, time.time()
        metrics = dict(result.metrics or {})
        if "step" not in metrics:  # every epoch was done before (the run finished, its trial's bookkeeping did not)
            logged = retry(tracking.client(uri).get_run, run_id).data.metrics
            metrics = {**{k: v for k, v in logged.items() if not k.startswith("compute/")}, **metrics}
        epoch_times = retry(tracking.client(uri).get_metric_history, run_id, "train/epoch_time_s")
        steps = int(metrics.get("step", 0))
        summary = {
            "compute/params": compute["params"],
            "compute/params_total": compute["params_total"],
            "compute/flops_per_step": compute["flops_per_step"],
            "compute/train_flops": compute["flops_per_step"] * steps,
            "compute/steps": steps,
            "compute/images_seen": steps * cfg.train.batch_size,
            "compute/dataset_images": train_data.num_rows,
            "compute/train_time_s": sum(m.value for m in epoch_times),
            "compute/fit_wall_s": fit_wall,
            "compute/wall_time_s": time.time() - start,
        }
        retry(logger.metrics, summary, step=steps)
        if plan.get("save_encoders", True):
            retry(_log_outputs, logger, result, metrics)
        else:
            retry(logger.dict, {k: v for k, v in metrics.items() if k.startswith(("eval/", "train/epoch"))},
                  "eval_summary.json")
        retry(logger.tag, "replab.completed", "true")
        retry(logger.tag, "replab.early_stopped", "false")
        phases["log_outputs_s"] = time.time() - mark
        retry(logger.finish, "FINISHED")
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
        try:
            retry(logger.finish, status, attempts=3)
        except Exception:  # noqa: BLE001
            pass
        raise
    final = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    final.update(summary)
    final["trial_done"] = 1
    _json_write(done, {"result": final, "run_id": run_id, "trial": name, "phases": phases})
    ray.tune.report(final)


# ---------------------------------------------------------------------------------------------- driver


def _status_callback(uri: str, plan: dict[str, Any]):
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


def _trial_dirname(trial) -> str:
    cfg = trial.config or {}
    searched = {k: v for k, v in cfg.items() if k != "cell"}
    return trial_name(str(cfg.get("cell", trial.trial_id)), searched)


def _space(dist: dict[str, Any]):
    from ray import tune

    kind = dist["type"]
    if kind == "uniform":
        return tune.uniform(dist["low"], dist["high"])
    if kind == "loguniform":
        return tune.loguniform(dist["low"], dist["high"])
    if kind == "randint":
        return tune.randint(int(dist["low"]), int(dist["high"]) + 1)
    if kind == "lograndint":
        return tune.lograndint(int(dist["low"]), int(dist["high"]) + 1)
    return tune.choice(list(dist["values"]))


def _searcher(spec: SweepSpec, seed: int):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class PatientOptunaSearch(OptunaSearch):
        """Optuna that ignores epochs without the metric (evaluation may run only at the end)."""

        def on_trial_result(self, trial_id, result):
            if self.metric in result:
                super().on_trial_result(trial_id, result)

    return PatientOptunaSearch(metric=spec.search.metric, mode=spec.search.mode,
                               sampler=optuna.samplers.TPESampler(seed=seed))


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    tracking_uri: str
    directory: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0
    interrupted: bool = False
    failed: int = 0
    report: dict[str, Any] | None = None


def plan_sweep(config_path, overrides=()) -> tuple[dict, SweepSpec, list[Cell]]:
    """Read and validate a sweep: the raw mapping, the spec and the grid (no Ray, no MLflow)."""
    raw, source = load_raw(config_path, overrides)
    spec = parse_spec(raw, source)
    cells = expand(raw, spec)
    return raw, spec, cells


def run_sweep(config_path, overrides=(), resume: bool = False, report: bool = True, echo=print) -> SweepResult:
    """Run (or resume) the sweep described by ``config_path`` + ``overrides``; returns what happened."""
    from ray import tune

    from replab.platform import data as data_lib
    from replab.platform.train import check_tracking_reachable, ensure_ray

    raw, spec, cells = plan_sweep(config_path, overrides)
    seen_data = set()
    for cell in cells:  # a missing dataset fails here, before any Ray work
        key = (cell.config.data.dataset, cell.config.data.root, cell.config.data.split)
        if key not in seen_data:
            data_lib.resolve_config(cell.config.data)
            seen_data.add(key)
    base = cells[0].config
    folder = sweep_dir(base, spec.name)
    local = "://" not in folder
    if not local:
        raise ConfigError("train.storage_path: replab sweep keeps its state in a local or shared folder; "
                          "URIs are not supported for sweeps yet")
    plan_file = Path(folder) / "plan.json"
    grid = {"cells": [c.plan() for c in cells], "search": spec.search.__dict__ if spec.search else None}
    exists = plan_file.exists()
    if exists and json.loads(plan_file.read_text()).get("grid") != _jsonable(grid):
        raise ConfigError(f"sweep.name: {spec.name!r} already exists at {folder} with a different grid; "
                          "choose a new sweep.name or remove that folder")
    if resume and not exists:
        raise ConfigError(f"--resume: no sweep {spec.name!r} at {folder} to resume; run without --resume to start it")

    # a local instance gets the cores plus what concurrent trials' train workers ask for (Ray Data needs CPUs too)
    per_trial = max(max(c.config.train.num_workers, 1) * c.config.train.cpus_per_worker for c in cells)
    ensure_ray(per_trial * spec.max_concurrent + spec.trial_cpus * spec.max_concurrent)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # evaluation may run only at the last epoch
    uri = base.tracking.uri
    check_tracking_reachable(uri)
    Path(folder).mkdir(parents=True, exist_ok=True)
    parent_run_id = open_parent(base, spec, cells, folder, raw)
    if not exists:
        _json_write(plan_file, {"name": spec.name, "parent_run_id": parent_run_id, "grid": grid})
    stale = mark_stale_children(uri, parent_run_id)
    plan = {
        "name": spec.name, "dir": folder, "parent_run_id": parent_run_id, "experiment": base.tracking.experiment,
        "save_encoders": spec.save_encoders,
        "cells": {c.id: {"config": _cell_raw(c.config), "axes": c.axes, "labels": c.labels} for c in cells},
    }
    samples = spec.search.num_samples if spec.search else 1
    echo(f"sweep {spec.name}: {len(cells)} cells x {samples} trial(s), at most {spec.max_concurrent} at once")
    echo(f"  state: {folder}")
    echo(f"  MLflow parent run: {parent_run_id} ({uri})" + (f"; {stale} interrupted trial run(s) marked KILLED"
                                                             if stale else ""))

    trainable = tune.with_resources(tune.with_parameters(_trial, plan=plan), {"CPU": spec.trial_cpus})
    callback = _status_callback(uri, plan)
    start = time.time()
    interrupted = False
    try:
        with _outside_job_working_dir(folder):
            interrupted = _fit_tune_jobs(spec, cells, folder, trainable, callback, echo)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        wall = time.time() - start
        if interrupted:
            mark_stale_children(uri, parent_run_id)

    result = SweepResult(spec.name, parent_run_id, uri, folder, wall_time_s=wall, interrupted=interrupted)
    result.trials = trial_table(uri, parent_run_id)
    result.failed = sum(1 for t in result.trials if t["status"] == "FAILED")
    _finish_parent(uri, parent_run_id, result, spec)
    if interrupted:
        echo("sweep interrupted; re-run the same command (or add --resume) to continue it")
        return result
    if report:
        from replab.platform import report as report_lib

        try:
            result.report = report_lib.build_report(uri, parent_run_id, metric=spec.metric,
                                                    bootstrap=spec.bootstrap, echo=echo)
        except Exception as exc:  # noqa: BLE001 - the sweep itself succeeded; say why there is no report
            echo(f"no scaling report: {type(exc).__name__}: {exc}")
    return result


def _fit_tune_jobs(spec: SweepSpec, cells: list[Cell], folder: str, trainable, callback, echo) -> bool:
    """Fit (or restore and finish) the sweep's Tune experiments, one per grid or per searched cell; True when
    one was interrupted. A finished experiment leaves ``tune/<name>.done`` and is skipped on a re-run."""
    from ray import tune

    if spec.search is None:
        jobs = [("grid", {"cell": tune.grid_search([c.id for c in cells])}, None, None, 1, spec.max_concurrent)]
    else:
        jobs = []
        for cell in cells:
            space = {"cell": cell.id, **{k: _space(d) for k, d in spec.search.space.items()}}
            jobs.append((f"cell-{cell.id}", space, spec.search.metric, spec.search.mode, spec.search.num_samples,
                         min(spec.max_concurrent, spec.search.num_samples), cell))
    for job in jobs:
        exp_name, space, metric, mode, num_samples, concurrency = job[:6]
        path = f"{folder}/tune/{exp_name}"
        if (Path(folder) / "tune" / f"{exp_name}.done").exists():
            continue
        if tune.Tuner.can_restore(path):
            echo(f"  resuming {exp_name} from {path}")
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        else:
            scheduler = None
            search_alg = None
            if spec.search is not None:
                search_alg = _searcher(spec, seed=job[6].index + 1000 * job[6].config.train.seed)
            if spec.scheduler is not None:
                from ray.tune.schedulers import ASHAScheduler

                # stop_last_trials=False: a trial at its last epoch finishes its run (and its bookkeeping)
                scheduler = ASHAScheduler(
                    time_attr="epoch", metric=metric, mode=mode, grace_period=spec.scheduler.grace_period,
                    reduction_factor=spec.scheduler.reduction_factor, stop_last_trials=False,
                    max_t=spec.scheduler.max_t or job[6].config.train.epochs)
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    num_samples=num_samples, max_concurrent_trials=concurrency, search_alg=search_alg,
                    scheduler=scheduler, trial_name_creator=_trial_dirname, trial_dirname_creator=_trial_dirname,
                    reuse_actors=False,
                ),
                run_config=tune.RunConfig(
                    name=exp_name, storage_path=f"{folder}/tune", callbacks=[callback], verbose=1,
                    failure_config=tune.FailureConfig(max_failures=0),
                ),
            )
        results = tuner.fit()
        states = _trial_states(results)
        if any(s not in ("TERMINATED", "ERROR") for s in states):
            return True
        if all(s == "TERMINATED" for s in states):
            (Path(folder) / "tune" / f"{exp_name}.done").touch()
    return False


@contextlib.contextmanager
def _outside_job_working_dir(folder: str):
    """Run Tune from the sweep's own folder rather than from wherever the driver started; restore the old cwd
    after if it still exists.

    Tune's result analysis calls ``os.getcwd()``. Under ``ray job submit`` the driver starts in the job's unpacked
    ``--working-dir`` package, which Ray shares between jobs with the same content and may delete when an earlier,
    stopped job with that package releases it: a re-submitted sweep then loses its cwd halfway. Every path replab
    hands to Ray is absolute by now (:func:`replab.platform.train.resolve_paths`), so the cwd is free to change.
    """
    try:
        before = os.getcwd()
    except FileNotFoundError:
        before = None
    os.chdir(folder)
    try:
        yield
    finally:
        if before is not None and os.path.isdir(before):
            os.chdir(before)


def _trial_states(results) -> list[str]:
    """The status of every trial of a finished ``Tuner.fit`` (TERMINATED, ERROR, or unfinished ones)."""
    try:
        return [str(t.status) for t in results._experiment_analysis.trials]
    except AttributeError:  # no trial objects in this Ray version: a result without error is a finished trial
        return ["ERROR" if r.error else "TERMINATED" for r in results]


def trial_table(uri: str, parent_run_id: str) -> list[dict[str, Any]]:
    """One row per child run: trial name, status, axis labels and the final metrics."""
    from replab.platform import tracking

    parent = retry(tracking.client(uri).get_run, parent_run_id)
    rows = []
    for run in children(uri, parent):
        rows.append({
            "trial": run.data.tags.get(TRIAL_TAG, run.info.run_name),
            "cell": run.data.tags.get(CELL_TAG, ""),
            "run_id": run.info.run_id,
            "status": run.info.status,
            "early_stopped": run.data.tags.get("replab.early_stopped") == "true",
            "axes": {k[len("sweep."):]: v for k, v in run.data.params.items()
                     if k.startswith("sweep.") and not k.startswith("sweep.search.")},
            "params": dict(run.data.params),
            "metrics": dict(run.data.metrics),
        })
    return sorted(rows, key=lambda r: r["trial"])


def _finish_parent(uri: str, parent_run_id: str, result: SweepResult, spec: SweepSpec) -> None:
    from replab.platform import tracking

    c = tracking.client(uri)
    done = [t for t in result.trials if t["status"] == "FINISHED"]
    train_time = sum(t["metrics"].get("compute/train_time_s", 0.0) for t in done)
    trial_wall = sum(t["metrics"].get("compute/wall_time_s", 0.0) for t in done)
    metrics = {"sweep/wall_time_s": result.wall_time_s, "sweep/trials_finished": len(done),
               "sweep/trials_failed": result.failed, "sweep/sum_trial_train_time_s": train_time,
               "sweep/sum_trial_wall_time_s": trial_wall,
               "sweep/total_train_flops": sum(t["metrics"].get("compute/train_flops", 0.0) for t in done)}
    retry(tracking.RunLogger(uri, parent_run_id).metrics, metrics, step=len(done))
    status = "KILLED" if result.interrupted else ("FAILED" if result.failed else "FINISHED")
    retry(c.set_terminated, parent_run_id, status=status)


def describe(spec: SweepSpec, cells: list[Cell]) -> str:
    """The grid in words (``replab sweep --dry-run``)."""
    lines = [f"sweep {spec.name}: {len(cells)} cells"]
    for axis, values in spec.axes.items():
        lines.append(f"  {axis}: {', '.join(axis_label(axis, v) for v in values)}")
    if spec.search:
        lines.append(f"  search: {spec.search.num_samples} Optuna trials per cell on {spec.search.metric} "
                     f"({spec.search.mode}) over {', '.join(spec.search.space)}"
                     + (f"; ASHA grace {spec.scheduler.grace_period}" if spec.scheduler else ""))
    for cell in cells:
        cfg = cell.config
        size = f"pool={cfg.data.unlabeled_size}" if uses_pool(cfg.data) else f"limit={cfg.data.limit}"
        lines.append(f"  {cell.id}: {cfg.method.name} {cfg.model.backbone} x{cfg.model.width:g} "
                     f"{cfg.data.dataset} {size} res={cfg.data.resolution} epochs={cfg.train.epochs}")
    return "\n".join(lines)


__all__ = ["Cell", "SweepResult", "SweepSpec", "count_compute", "describe", "error_of", "expand", "load_raw",
           "parse_spec", "plan_sweep", "run_sweep", "trial_table"]
