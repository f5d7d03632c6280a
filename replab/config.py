"""The typed run configuration: YAML + ``--set section.key=value`` overrides, validated up front.

A run is described by one :class:`RunConfig` with the sections ``data``, ``model``, ``method``, ``train``,
``eval`` and ``tracking`` (plus ``sweep`` for ``replab sweep``, kept as plain data and checked by the
sweep module). Every key is declared here with its type and, where the set is closed, its valid choices.
The ``method`` section holds ``name`` plus the hyper-parameters that method declares in its own ``Params``
dataclass (see :mod:`replab.methods.base`), so ``--set method.temperature=0.2`` is checked against the
chosen method.

Any problem is raised as :class:`ConfigError` whose message is one line naming the key and the valid
choices; the CLI prints it and exits with code 2 before any Ray work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration: the message is one line naming the key and the valid choices."""


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    """A named dataset (cifar10, tinyimagenet, imagenette128) under ``root``, or a path/URI to parquet
    shards, an image folder or tar shards."""
    root: str = ""
    """Where named datasets live. Empty: $REPLAB_DATA_ROOT, else ~/.cache/replab/datasets."""
    split: str = "train"
    limit: int | None = None
    """Use at most this many training images (a seeded random subset, nested across sizes)."""
    resolution: int = 32
    """Side of the square uint8 images sent to the trainers (decode + resize on CPU workers)."""
    image_column: str = "image"
    label_column: str = "label"
    seed: int = 0
    cache: Literal["auto", "on", "off"] = "auto"
    """Keep decoded images in the Ray object store (``auto``: when they fit in a quarter of it)."""
    shuffle_buffer: int = 8192
    """Rows in the trainer-side shuffle buffer that mixes the streamed (or cached) blocks; 0: none."""
    decode_batch_size: int = 256
    download: bool = False
    """Download and convert a missing named dataset (needs a network)."""
    # -- semi-supervised and open-set data (replab.platform.data.labeled / support / pool: labeled splits, supports, unlabeled pools)
    labels_per_class: int | None = None
    """Labeled images per known class, drawn from ``split`` (PAWS / RoPAWS supports). None: no labeled split."""
    label_fraction: float | None = None
    """Instead of ``labels_per_class``: this fraction of every known class (0.01 = 1% of the labels)."""
    known_classes: list[int] | None = None
    """The labeled (in-distribution) class ids; supports are relabeled 0..C-1 in this order. None: all."""
    split_seed: int = 0
    """Seed of the labeled split (nested: the k-label split is inside the k'-label split for k < k')."""
    split_file: str = ""
    """JSON of the labeled row ids per class; read when it exists, written when not. Empty: a file under
    $REPLAB_CACHE_DIR/splits (default ~/.cache/replab/splits) named after the split's settings."""
    unlabeled_exclude_labeled: bool = False
    """Leave the labeled images out of the unlabeled pool (open-set protocol: 'the rest' of the train split)."""
    mix: list[dict] = field(default_factory=list)
    """Unlabeled pool from several sources: [{dataset, split, classes (ids | known | unknown), count or
    fraction}]; empty: the ``dataset``/``split`` itself. Training sees label -1; the origin is kept for eval."""
    unlabeled_size: int | None = None
    """Rows of the unlabeled pool when ``mix`` uses fractions / with ``ood_fraction`` (None: the largest that fits)."""
    ood_dataset: str = ""
    """Out-of-class source for ``ood_fraction`` (empty: the unknown classes of ``dataset``)."""
    ood_split: str = "train"
    ood_fraction: float | None = None
    """Class-mismatch ratio: this share of the unlabeled pool is out-of-class, the rest known-class images."""


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    """resnet18/34/50/101, vit_tiny/vit_small/vit_base (see ``replab methods --backbones``)."""
    width: float = 1.0
    """Width multiplier (1/16 .. 4): of every ResNet stage (at least 8 channels each), or of a ViT's token and MLP
    width (depth and heads kept; at least 8 per head)."""
    cifar_stem: Literal["auto", "on", "off"] = "auto"
    """3x3 stride-1 stem without max-pool; ``auto`` turns it on at resolution <= 64."""
    patch_size: int | None = None
    """ViT patch size; None picks one from the resolution (4 at 32 px, 8 at 64 px, 16 above)."""
    init: str | None = None
    """Start from the encoder of another run: an MLflow run id or name, a run folder, a checkpoint folder, or an
    exported encoder file (.safetensors / .pt state dict). Only the encoder; a resumed run keeps its own."""


@dataclass
class MethodConfig:
    name: str = "simclr"
    recipe: str = "paper"
    """``paper``: the method's published defaults. Another name picks one of the method's documented variants
    (its ``recipes``, e.g. ``cpu`` for small batches on a CPU budget): ``section.key=value`` settings applied
    under the config, so that anything the config sets itself still wins."""
    params: dict[str, Any] = field(default_factory=dict)
    """Method hyper-parameters, written flat in YAML next to ``name`` (validated by the method)."""


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256
    """Global batch size, split evenly over the workers."""
    num_workers: int = 1
    """Ray Train workers (one process each; one GPU each when use_gpu)."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    optimizer: Literal["auto", "sgd", "lars", "adamw"] = "auto"
    """``auto``: the method's published optimizer."""
    lr: float | None = None
    """Base learning rate for a batch of 256 (scaled linearly with batch_size); None: the method's."""
    weight_decay: float | None = None
    warmup_epochs: float = 10.0
    min_lr_ratio: float = 0.0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """``auto``: bf16 autocast on GPU and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32."""
    channels_last: bool = True
    compile: bool = False
    checkpoint_every: int = 1
    """Save a checkpoint every this many epochs (0: only at the end)."""
    storage_path: str = "runs"
    """Checkpoints and Ray Train state: a local path (made absolute) or a URI (s3://, gs://)."""
    name: str = ""
    """Run name; empty: derived from the method, backbone and dataset. Re-running a name resumes it."""
    seed: int = 0
    max_failures: int = 0
    """Ray Train worker-group restarts after a worker dies (resumes from the last checkpoint)."""
    steps_per_epoch: int | None = None
    """Cap on steps per epoch (None: all full batches)."""
    log_every: int = 20
    deterministic: bool = True
    """One seed, one machine, one worker: the same data order and losses run after run (Ray Data keeps the
    block order, the trainer-side shuffle buffer is seeded per epoch; on GPU also deterministic cuDNN/cuBLAS
    kernels). Off: blocks arrive as tasks finish (docs/BENCHMARKS.md, 'Deterministic data order', for the cost)."""


@dataclass
class EvalConfig:
    knn: bool = True
    linear: bool = True
    every: int = 0
    """Evaluate every this many epochs (0: only before and after training)."""
    before_training: bool = True
    """Evaluate the random-init encoder first (the baseline)."""
    dataset: str = ""
    """Dataset for kNN / probe; empty: the training dataset. Its train split is the labeled bank."""
    train_split: str = "train"
    test_split: str = ""
    """Empty: ``test`` or ``val``, whichever the dataset has."""
    bank_limit: int | None = 10000
    test_limit: int | None = 10000
    knn_k: int = 200
    knn_temperature: float = 0.1
    linear_epochs: int = 30
    linear_lr: float = 0.1
    batch_size: int = 512


@dataclass
class TrackingConfig:
    uri: str = ""
    """MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (absolute)."""
    experiment: str = "replab"
    enabled: bool = True


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: dict[str, Any] = field(default_factory=dict)
    """Sweep axes and search (``replab sweep``); ignored by ``replab train``."""
    source_file: str = ""
    """The YAML file this config came from (set by :func:`load_config`)."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source_file")
        method = out.pop("method")
        out["method"] = {"name": method["name"], "recipe": method["recipe"], **method["params"]}
        return out

    def flat(self) -> dict[str, Any]:
        """``section.key -> value`` for every key (MLflow params)."""
        out: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                for key, value in values.items():
                    out[f"{section}.{key}"] = value
        return out


SECTIONS = ("data", "model", "method", "train", "eval", "tracking")


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {name: hints[name] for name in SECTIONS if name != "method"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` to the declared type ``tp`` or raise a one-line :class:`ConfigError`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads on/off as booleans
        if value in choices:
            return value
        raise ConfigError(f"{key}: {value!r} is not valid; choose one of: {', '.join(map(str, choices))}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        finite = [e for e in errors if e.endswith("a finite number")]
        if finite:
            raise ConfigError(finite[0])
        raise ConfigError(f"{key}: {value!r} is not valid; expected {_type_name(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: {value!r} is not valid; expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not valid; expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: {value!r} is not valid; expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not valid; expected a number")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and not math.isfinite(number):
            raise ConfigError(f"{key}: {value!r} is not valid; expected a finite number")
        if number is not None:
            return number
        raise ConfigError(f"{key}: {value!r} is not valid; expected a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: {value!r} is not valid; expected a string")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: {value!r} is not valid; expected a list")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        items = [coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: {value!r} is not valid; expected a mapping")
        return dict(value)
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs=3"`` -> ``("train.epochs", 3)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if "." not in key:
        raise ConfigError(f"--set {text!r}: expected section.key=value with section one of: {', '.join(SECTIONS)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_override(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``raw[section][key] = value`` on the plain (unvalidated) config mapping."""
    if not isinstance(raw, dict):
        raise ConfigError(f"--set {key}: the config's top level is not a mapping of sections")
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:  # absent, or an empty YAML section (``data:``)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            where = ".".join(parts[:depth + 1])
            raise ConfigError(f"--set {key}: {where} is {node!r}, not a mapping; cannot set a key under it")
    node[parts[-1]] = value


def parse(raw: dict[str, Any], source_file: str = "") -> RunConfig:
    """Build a :class:`RunConfig` from a plain mapping (as read from YAML) and check it against the schema: section
    and key names, value types and ranges. The method's own parameters stay a plain mapping here: the method
    registry checks them, with everything else that needs the library (:func:`replab.validate.from_dict`)."""
    raw = copy.deepcopy(raw or {})
    if not isinstance(raw, dict):
        raise ConfigError("config: the top level must be a mapping of sections")
    valid_sections = (*SECTIONS, "sweep")
    for section in raw:
        if section not in valid_sections:
            raise ConfigError(f"{section}: unknown section; valid sections: {', '.join(valid_sections)}")

    sections: dict[str, Any] = {}
    for name, cls in _section_classes().items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: expected a mapping of keys")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"{name}.{key}: unknown key; valid keys: {', '.join(hints)}")
            kwargs[key] = coerce(f"{name}.{key}", value, hints[key])
        sections[name] = cls(**kwargs)

    method_raw = dict(raw.get("method") or {})
    method_name = str(method_raw.pop("name", MethodConfig.name))
    recipe = str(method_raw.pop("recipe", MethodConfig.recipe))
    params_raw = method_raw.pop("params", {}) or {}
    params_raw.update(method_raw)
    sections["method"] = MethodConfig(name=method_name, recipe=recipe, params=params_raw)

    sweep = raw.get("sweep") or {}
    if not isinstance(sweep, dict):
        raise ConfigError("sweep: expected a mapping")
    cfg = RunConfig(**sections, sweep=sweep, source_file=source_file)
    _check_ranges(cfg)
    return cfg


RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    # key: (lowest, highest, lowest excluded); None: unbounded. A None value (where the type allows it) passes.
    "data.limit": (0, None, True),
    "data.resolution": (8, 4096, False),
    "data.seed": (0, None, False),
    "data.shuffle_buffer": (0, None, False),
    "data.decode_batch_size": (1, None, False),
    "data.labels_per_class": (1, None, False),
    "data.label_fraction": (0, 1, True),
    "data.split_seed": (0, None, False),
    "data.unlabeled_size": (1, None, False),
    "data.ood_fraction": (0, 1, False),
    "model.width": (1 / 16, 4, False),
    "model.patch_size": (1, None, False),
    "train.epochs": (0, None, True),
    "train.batch_size": (0, None, True),
    "train.num_workers": (0, None, False),
    "train.cpus_per_worker": (0, None, True),
    "train.lr": (0, None, True),
    "train.weight_decay": (0, None, False),
    "train.warmup_epochs": (0, None, False),
    "train.min_lr_ratio": (0, 1, False),
    "train.checkpoint_every": (0, None, False),
    "train.seed": (0, None, False),
    "train.max_failures": (-1, None, False),
    "train.steps_per_epoch": (1, None, False),
    "train.log_every": (1, None, False),
    "eval.every": (0, None, False),
    "eval.bank_limit": (1, None, False),
    "eval.test_limit": (1, None, False),
    "eval.knn_k": (0, None, True),
    "eval.knn_temperature": (0, None, True),
    "eval.linear_epochs": (1, None, False),
    "eval.linear_lr": (0, None, True),
    "eval.batch_size": (1, None, False),
}
"""The valid range of every numeric key (seeds are >= 0: numpy's generators refuse negative seeds)."""

TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "databricks", "databricks-uc", "postgresql", "mysql",
                    "mssql")


def check_range(key: str, value: Any, lo: float | None, hi: float | None, lo_open: bool = False) -> None:
    """Raise a one-line :class:`ConfigError` unless ``lo <= value <= hi`` (``lo < value`` when ``lo_open``)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    below = lo is not None and (value <= lo if lo_open else value < lo)
    if below or (hi is not None and value > hi):
        if lo is not None and hi is not None:
            want = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        elif lo == 0:
            want = "a positive number" if lo_open else "a non-negative number"
        else:
            want = f"a number {'>' if lo_open else '>='} {lo:g}"
        raise ConfigError(f"{key}: {value!r} is not valid; expected {want}")


def check_tracking_uri(uri: str) -> None:
    """An MLflow store: empty (the default), a path, ``sqlite:///``, ``http(s)://``, ``file:``, ``databricks``
    or a database URI; anything else (``htp://x``, ``sqlite://db``) is refused here, not deep inside MLflow."""
    if not uri:
        return
    if not uri.strip() or uri != uri.strip():
        raise ConfigError(f"tracking.uri: {uri!r} is not valid; it has leading or trailing spaces")
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if not scheme or len(scheme) == 1 or "/" in scheme or "\\" in scheme:  # a path (C:\... on Windows)
        return
    ok = scheme in TRACKING_SCHEMES or scheme.split("+", 1)[0] in ("postgresql", "mysql", "mssql")
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        ok = False
    if scheme in ("http", "https") and not uri.startswith(f"{scheme}://"):
        ok = False
    if not ok:
        raise ConfigError(
            f"tracking.uri: {uri!r} is not valid; use a path, sqlite:///FILE.db, http(s)://HOST:PORT, file:PATH "
            "or databricks"
        )


def _check_ranges(cfg: RunConfig) -> None:
    for key, (lo, hi, lo_open) in RANGES.items():
        section, name = key.split(".")
        check_range(key, getattr(getattr(cfg, section), name), lo, hi, lo_open)
    for i, cls in enumerate(cfg.data.known_classes or []):
        check_range(f"data.known_classes[{i}]", cls, 0, None)
    if not cfg.train.storage_path.strip():
        raise ConfigError("train.storage_path: '' is not valid; expected a folder or a URI (default: runs)")
    if not cfg.tracking.experiment.strip():
        raise ConfigError("tracking.experiment: '' is not valid; expected an experiment name (default: replab)")
    check_tracking_uri(cfg.tracking.uri)
    if cfg.model.init is not None and (not isinstance(cfg.model.init, str) or not cfg.model.init.strip()):
        raise ConfigError(f"model.init: {cfg.model.init!r} is not valid; expected an MLflow run id or name, a run "
                          "or checkpoint folder, or an encoder file (.safetensors / .pt)")
    workers = max(cfg.train.num_workers, 1)
    if cfg.train.batch_size % workers:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is not divisible by train.num_workers={workers}; "
            "choose a multiple of the worker count"
        )


def read_raw(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> tuple[dict[str, Any], str]:
    """Read ``path`` (YAML; None: all defaults) and apply ``--set`` overrides: (the plain mapping, the resolved
    source path or "")."""
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
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, not {type(raw).__name__}")
        source = str(p.resolve())
    for item in overrides:
        key, value = parse_override(item)
        apply_override(raw, key, value)
    return raw, source
