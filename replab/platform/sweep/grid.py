"""The sweep's grid: the product of its axes expanded into validated cells (:func:`expand`), each a full run
config; deterministic trial names; the grid in words for ``--dry-run``.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Any

from replab.config import ConfigError, RunConfig, apply_override
from replab.platform.sweep.spec import SweepSpec, axis_label, axis_overrides, axis_short, uses_pool
from replab.validate import from_dict


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


def expand(raw: dict, spec: SweepSpec, resolve: bool = True) -> list[Cell]:
    """The grid: one validated :class:`Cell` per combination of axis values (the product, in axis order)."""
    from replab.platform.train.ray_train import resolve_paths

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
        cells.append(Cell(cell_id, index, {a: jsonable(v) for a, v in axes.items()}, labels, cfg))
    if spec.search is not None:
        for cell in cells:
            for key, dist in spec.search.space.items():
                values = dist["values"] if dist["type"] == "choice" else [dist["low"], dist["high"]]
                for value in values:
                    if dist["type"] in ("randint", "lograndint"):
                        value = int(value)
                    _build(cell_raw(cell.config), {key: value}, f"sweep.search.space.{key} (cell {cell.id})")
    return cells


def jsonable(value: Any) -> Any:
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
    if spec.trial_runner == "direct" and cfg.train.num_workers > 1:
        raise ConfigError(f"sweep.trial_runner: direct trains one worker in the trial's process but "
                          f"train.num_workers={cfg.train.num_workers} ({where}); use auto or ray_train")
    key = "data.unlabeled_size" if uses_pool(cfg.data) else "data.limit"
    size = getattr(cfg.data, key.split(".")[1], None)
    if size is not None and size < cfg.train.batch_size:
        raise ConfigError(f"{key}: {size} is below train.batch_size={cfg.train.batch_size} ({where}); "
                          "raise the data size or lower the batch size")


def cell_raw(cfg: RunConfig) -> dict[str, Any]:
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


def runner_of(choice: str, cfg: RunConfig) -> str:
    """The trial runner of a cell: ``sweep.trial_runner``, with ``auto`` -> ``direct`` for one worker, else
    ``ray_train``."""
    if choice != "auto":
        return choice
    return "direct" if cfg.train.num_workers <= 1 else "ray_train"


def short_label(axis: str, label: str) -> str:
    """One axis value in a run name: ``m0.25`` (width), ``mr18w0.5``, ``d5000``, ``r32``, ``e10``, ``simclr``
    (``*.name`` axes), ``lr0.1`` (other keys)."""
    if axis == "model_size":
        return "m" + (label[1:] if label.startswith("w") else label)
    if axis in ("data_size", "resolution", "compute"):
        return axis_short(axis) + label
    key = axis.split(".")[-1]
    return label if key == "name" else f"{key}{label}"


def run_labels(cells: list[Cell]) -> dict[str, str]:
    """Cell id -> the short, distinct start of its trials' MLflow run names: the values of the axes that vary,
    in axis order (``m0.25-d5000-r32``); the cell id where the short forms would collide."""
    varying = [a for a in (cells[0].axes if cells else {}) if len({c.labels[a] for c in cells}) > 1]
    names = {c.id: "-".join(short_label(a, c.labels[a]) for a in varying) or c.id for c in cells}
    if len(set(names.values())) < len(names):
        return {c.id: c.id for c in cells}
    return names


def sweep_dir(cfg: RunConfig, name: str) -> str:
    base = cfg.train.storage_path
    return f"{base.rstrip('/')}/sweeps/{name}"


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
