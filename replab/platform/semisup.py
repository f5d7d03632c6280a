"""Semi-supervised and open-set data: labeled splits, the class-stratified support sampler, unlabeled pools.

Labeled splits (:func:`labeled_split`)
    ``data.labels_per_class = k`` (or ``data.label_fraction``) picks, for every known class c
    (``data.known_classes``, default all), the first k row ids of a permutation of that class's rows seeded by
    ``(data.split_seed, c)``, sorted; so splits are nested (the 25-label split is inside the 50-label one).
    The choice is written to a JSON split file (``data.split_file``; default
    ``$REPLAB_CACHE_DIR/splits/<dataset>-<split>-k<k>-c<classes>-s<seed>.json``, cache dir
    ``~/.cache/replab``) holding the row ids per class; an existing file is read, not recomputed, so a run
    is reproducible from its split file (log it as an artifact) and hand-made splits can be used. Row ids are
    the data layer's global ids (files in sorted order, rows in file order), the same ids as ``data.limit``.
    The split is drawn from the whole split, whatever ``data.limit`` (which only shrinks the unlabeled pool).

Supports (:func:`support_sampler`, called by the training loop for methods whose ``support()`` returns a
:class:`~replab.methods.base.SupportSpec`)
    The labeled images are decoded once per worker (a few thousand at most). Every step yields C classes x M
    images (uint8 ``[C*M, R, R, 3]``, labels int64 ``[C*M]`` remapped to 0..C-1 over the known classes in
    ``known_classes`` order), class-balanced and independent of the unlabeled epoch: each class is drawn from
    its own stream of shuffled passes over its labeled images (no repeat within a pass, new order every
    pass: PAWS's ``ClassStratifiedSampler``), so with k < M labels an image recurs within a step. The
    ``classes_per_step`` of the spec is all known classes when 0 or >= C, else a fresh random subset per
    step. Streams are seeded by ``(train.seed, data.split_seed, rank)``: workers draw different images.
    The streams are not checkpointed: a resumed run starts them afresh (same distribution, other draws).

Unlabeled pools (:func:`pool_manifest`, :func:`build_unlabeled_dataset`, :func:`load_unlabeled_arrays`)
    Without ``data.mix`` / ``data.ood_fraction`` the pool is ``data.dataset``/``data.split`` (after
    ``data.limit``), minus the labeled rows when ``data.unlabeled_exclude_labeled``. ``data.mix`` lists
    sources ``{dataset, split, classes, count | fraction, exclude_labeled}`` (``classes``: ids, ``known``,
    ``unknown`` or ``all``; ``fraction``: the source's share of a pool of ``data.unlabeled_size`` rows, or of
    the largest pool in which every share fits; ``count``: rows; neither: all rows). ``data.ood_fraction = r``
    is the class-mismatch shorthand: (1 - r) known-class rows of ``dataset`` + r rows of ``data.ood_dataset``
    (default: the unknown classes of ``dataset``). Every source's rows are a seeded subset (``data.seed``).
    Training sees every pooled image with label -1; the origin of each image (source, row id, true label,
    in-class or not) is kept in the manifest for evaluation only.

Wiring (Ray Train): ``fit`` builds the pool with :func:`build_unlabeled_dataset` when
:func:`uses_unlabeled_pool` is true (instead of ``build_train_dataset``) and may call
:func:`labeled_split` on the driver first, so the split file exists before the workers read it.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from replab.config import ConfigError
from replab.platform import data as data_lib

SPLIT_FORMAT = "replab-labeled-split/1"
MIX_KEYS = ("dataset", "split", "classes", "count", "fraction", "exclude_labeled")
SUPPORT_ON_DEVICE_MAX_BYTES = 256 << 20


# ================================================================================================ config


def is_semisupervised(data) -> bool:
    """True when the config asks for a labeled split (``labels_per_class``, ``label_fraction`` or ``split_file``)."""
    return data.labels_per_class is not None or data.label_fraction is not None or bool(data.split_file)


def uses_unlabeled_pool(data) -> bool:
    """True when training should read :func:`build_unlabeled_dataset` instead of the plain train split."""
    return is_semisupervised(data) or bool(data.mix) or data.ood_fraction is not None


def validate(data) -> None:
    """Range checks of the semi-supervised keys of a DataConfig; raises a one-line ConfigError."""
    if data.labels_per_class is not None and data.label_fraction is not None:
        raise ConfigError("data.label_fraction: set either data.labels_per_class or data.label_fraction, not both")
    if data.labels_per_class is not None and data.labels_per_class < 1:
        raise ConfigError(f"data.labels_per_class: {data.labels_per_class!r} is not valid; expected a positive integer")
    if data.label_fraction is not None and not 0 < data.label_fraction <= 1:
        raise ConfigError(f"data.label_fraction: {data.label_fraction!r} is not valid; expected a number in (0, 1]")
    if data.known_classes is not None:
        if not data.known_classes:
            raise ConfigError("data.known_classes: empty; list the labeled class ids or use null for all classes")
        if len(set(data.known_classes)) != len(data.known_classes) or min(data.known_classes) < 0:
            raise ConfigError(f"data.known_classes: {data.known_classes!r} is not valid; expected distinct ids >= 0")
    if data.ood_fraction is not None:
        if not 0 <= data.ood_fraction <= 1:
            raise ConfigError(f"data.ood_fraction: {data.ood_fraction!r} is not valid; expected a number in [0, 1]")
        if data.mix:
            raise ConfigError("data.ood_fraction: set either data.mix or data.ood_fraction, not both")
    if data.unlabeled_size is not None and data.unlabeled_size < 1:
        raise ConfigError(f"data.unlabeled_size: {data.unlabeled_size!r} is not valid; expected a positive integer")
    for i, entry in enumerate(data.mix):
        _check_entry(i, entry)
    kinds = {"fraction" in e for e in data.mix}
    if len(kinds) > 1:
        raise ConfigError("data.mix: give every source a fraction, or none (counts / all rows)")
    if data.mix and kinds == {True}:
        total = sum(float(e["fraction"]) for e in data.mix)
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"data.mix: the fractions sum to {total:g}; they must sum to 1")
    elif data.unlabeled_size is not None and data.ood_fraction is None:
        raise ConfigError("data.unlabeled_size: needs fractions (data.mix[].fraction or data.ood_fraction); "
                          "use data.limit to subsample a single source")


def _check_entry(i: int, entry: Any) -> None:
    key = f"data.mix[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{key}: expected a mapping with keys {', '.join(MIX_KEYS)}")
    for k in entry:
        if k not in MIX_KEYS:
            raise ConfigError(f"{key}.{k}: unknown key; valid keys: {', '.join(MIX_KEYS)}")
    if "count" in entry and "fraction" in entry:
        raise ConfigError(f"{key}: give count or fraction, not both")
    count = entry.get("count")
    if "count" in entry and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
        raise ConfigError(f"{key}.count: {entry['count']!r} is not valid; expected a positive integer")
    if "fraction" in entry:
        f = entry["fraction"]
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ConfigError(f"{key}.fraction: {f!r} is not valid; expected a number in (0, 1]")
    classes = entry.get("classes")
    if classes is not None and classes not in ("known", "unknown", "all"):
        if not isinstance(classes, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
            raise ConfigError(f"{key}.classes: {classes!r} is not valid; expected a list of ids, known, unknown or all")
    if "exclude_labeled" in entry and not isinstance(entry["exclude_labeled"], bool):
        raise ConfigError(f"{key}.exclude_labeled: {entry['exclude_labeled']!r} is not valid; expected true or false")


# ================================================================================================ rows and labels

_LABEL_CACHE: dict[str, np.ndarray] = {}
_LABEL_LOCK = threading.Lock()


def _source(dataset: str, root: str, split: str, image_column: str = "image", label_column: str = "label"):
    return data_lib.resolve(dataset, root, split, image_column=image_column, label_column=label_column)


def resolve_source(data, dataset: str | None = None, split: str | None = None):
    """The data layer's resolved Source of ``dataset``/``split`` (default: the config's) under ``data.root``."""
    return _source(dataset or data.dataset, data.root, split or data.split, data.image_column, data.label_column)


def row_labels(src) -> np.ndarray:
    """The label of every row of a resolved source, in global row-id order (int64, -1 when unlabeled).

    Reads only the label column (parquet), the folder names (folder) or the tar index (tar).
    """
    key = src.fingerprint()
    with _LABEL_LOCK:
        if key in _LABEL_CACHE:
            return _LABEL_CACHE[key]
    index = data_lib.build_index(src)
    if src.kind == "parquet":
        spec = data_lib._Plan.build(index, np.zeros(0, np.int64)).spec
        parts = []
        for path in src.files:
            if not spec.has_labels:
                with src.filesystem.open_input_file(path) as f:
                    parts.append(np.full(pq.ParquetFile(f).metadata.num_rows, -1, np.int64))
                continue
            with src.filesystem.open_input_file(path) as f:
                table = pq.ParquetFile(f).read(columns=[src.label_column])
            parts.append(data_lib._labels_from(table, spec))
        labels = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    elif src.kind == "tar":
        labels = np.asarray(index.tar_label, np.int64)
    else:
        labels = np.asarray(src.file_labels if src.file_labels is not None else [-1] * index.total_rows, np.int64)
    if len(labels) != index.total_rows:
        raise data_lib.DataError(f"{src.uri}: {len(labels)} labels for {index.total_rows} rows")
    with _LABEL_LOCK:
        _LABEL_CACHE[key] = labels
    return labels


def load_rows(src, rows: np.ndarray, resolution: int, num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode the given row ids of a resolved source without Ray: ``(uint8 [n, R, R, 3], labels [n])`` in
    row-id order (undecodable rows are left out)."""
    rows = np.unique(np.asarray(rows, np.int64))
    if len(rows) == 0:
        return np.zeros((0, resolution, resolution, 3), np.uint8), np.zeros(0, np.int64)
    plan = data_lib._Plan.build(data_lib.build_index(src), rows)
    images, labels, _stats = data_lib._decode_pieces(plan, int(resolution), num_threads)
    return images, labels


def _known(data, labels: np.ndarray) -> list[int]:
    if data.known_classes is not None:
        return [int(c) for c in data.known_classes]
    present = np.unique(labels[labels >= 0])
    if len(present) == 0:
        raise ConfigError(f"data.dataset: {data.dataset} has no labels; a labeled split needs a labeled dataset")
    return [int(c) for c in present]


# ================================================================================================ labeled split


@dataclass
class LabeledSplit:
    """The labeled rows per known class of ``dataset``/``split`` (row ids, sorted)."""

    dataset: str
    split: str
    known_classes: list[int]
    rows: dict[int, np.ndarray]
    path: str = ""
    num_rows: int = 0

    def all_rows(self) -> np.ndarray:
        parts = [self.rows[c] for c in self.known_classes if c in self.rows]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def remap(self) -> dict[int, int]:
        """Original class id -> 0..C-1 (``known_classes`` order)."""
        return {c: i for i, c in enumerate(self.known_classes)}


def select_labeled(
    labels: np.ndarray, known_classes: list[int], labels_per_class: int | None = None,
    label_fraction: float | None = None, seed: int = 0, candidates: np.ndarray | None = None,
) -> dict[int, np.ndarray]:
    """Per known class c: the first k row ids of a permutation of c's rows seeded by ``(seed, c)``, sorted.

    ``k = labels_per_class`` (all of c's rows when fewer), or ``max(1, round(label_fraction * n_c))``.
    ``candidates`` restricts the rows drawn from (default all). Nested in k for a fixed seed.
    """
    if (labels_per_class is None) == (label_fraction is None):
        raise ValueError("give exactly one of labels_per_class and label_fraction")
    labels = np.asarray(labels)
    pool = np.arange(len(labels), dtype=np.int64) if candidates is None else np.asarray(candidates, np.int64)
    out: dict[int, np.ndarray] = {}
    for c in known_classes:
        rows = pool[labels[pool] == c]
        if len(rows) == 0:
            raise ConfigError(f"data.known_classes: class {c} has no images in this split")
        k = labels_per_class if labels_per_class is not None else max(1, int(round(label_fraction * len(rows))))
        perm = np.random.default_rng([int(seed), int(c)]).permutation(len(rows))
        out[int(c)] = np.sort(rows[perm[: min(k, len(rows))]]).astype(np.int64)
    return out


def _cache_dir() -> Path:
    return Path(os.environ.get("REPLAB_CACHE_DIR") or Path("~/.cache/replab").expanduser())


def default_split_name(data) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(data.dataset).rstrip("/")).name or "data")[:40]
    amount = f"k{data.labels_per_class}" if data.labels_per_class is not None else f"f{data.label_fraction:g}"
    classes = "all" if data.known_classes is None else "-".join(str(int(c)) for c in data.known_classes)
    if len(classes) > 40:
        import hashlib

        classes = hashlib.sha1(classes.encode()).hexdigest()[:10]
    return f"{safe}-{data.split or 'train'}-{amount}-c{classes}-s{data.split_seed}.json"


def split_path(data) -> Path:
    """Where the split file of ``data`` is (``data.split_file``, a folder there, or the default)."""
    if data.split_file:
        p = Path(data.split_file).expanduser()
        if data.split_file.endswith(("/", os.sep)) or p.is_dir():
            if data.labels_per_class is None and data.label_fraction is None:
                raise ConfigError(f"data.split_file: {data.split_file} is a folder; set data.labels_per_class too")
            return p / default_split_name(data)
        return p
    return _cache_dir() / "splits" / default_split_name(data)


def write_split_file(path: str | os.PathLike, split: LabeledSplit, data=None) -> None:
    """Write ``split`` as JSON, atomically (same content for the same settings: byte-for-byte reproducible)."""
    path = Path(path)
    doc = {
        "format": SPLIT_FORMAT,
        "dataset": split.dataset,
        "split": split.split,
        "num_rows": int(split.num_rows),
        "labels_per_class": None if data is None else data.labels_per_class,
        "label_fraction": None if data is None else data.label_fraction,
        "seed": None if data is None else int(data.split_seed),
        "known_classes": [int(c) for c in split.known_classes],
        "classes": {str(c): [int(r) for r in split.rows[c]] for c in split.known_classes},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def read_split_file(path: str | os.PathLike) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"data.split_file: cannot read {path}: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("classes"), dict):
        raise ConfigError(f"data.split_file: {path} is not a split file (expected {{\"classes\": {{id: [rows]}}}})")
    return doc


def labeled_split(data, write: bool = True) -> LabeledSplit:
    """The labeled split of ``data`` (a DataConfig): read from the split file, or drawn and written there."""
    validate(data)
    if not is_semisupervised(data):
        raise ConfigError("data.labels_per_class: not set; a labeled split needs data.labels_per_class, "
                          "data.label_fraction or data.split_file")
    src = _source(data.dataset, data.root, data.split, data.image_column, data.label_column)
    labels = row_labels(src)
    path = split_path(data)
    if path.is_file():
        doc = read_split_file(path)
        rows = {int(c): np.asarray(r, np.int64) for c, r in doc["classes"].items()}
        known = [int(c) for c in doc.get("known_classes") or sorted(rows)]
        if data.known_classes is not None and [int(c) for c in data.known_classes] != known:
            raise ConfigError(f"data.known_classes: {list(data.known_classes)} differs from the classes "
                              f"{known} of the split file {path}")
        if doc.get("num_rows") not in (None, len(labels)):
            raise ConfigError(f"data.split_file: {path} was made for {doc['num_rows']} rows but "
                              f"{data.dataset}/{data.split} has {len(labels)}; the dataset changed")
        for key in ("labels_per_class", "label_fraction"):
            if getattr(data, key) is not None and doc.get(key) is not None and doc[key] != getattr(data, key):
                raise ConfigError(f"data.{key}: {getattr(data, key)} differs from {doc[key]} in the split file {path}")
        for c, r in rows.items():
            if len(r) and (r.max() >= len(labels) or r.min() < 0 or (labels[r] != c).any()):
                raise ConfigError(f"data.split_file: {path}: rows listed for class {c} are not of class {c}")
        return LabeledSplit(data.dataset, data.split, known, rows, str(path), len(labels))
    if data.labels_per_class is None and data.label_fraction is None:
        raise ConfigError(f"data.split_file: {path} does not exist; set data.labels_per_class to create it")
    known = _known(data, labels)
    rows = select_labeled(labels, known, data.labels_per_class, data.label_fraction, data.split_seed)
    split = LabeledSplit(data.dataset, data.split, known, rows, str(path), len(labels))
    if write:
        write_split_file(path, split, data)
    return split


def load_labeled(
    data, split: LabeledSplit | None = None, resolution: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The labeled images (uint8 ``[n, R, R, 3]``) and their labels remapped to 0..C-1 (known-class order)."""
    split = split or labeled_split(data)
    src = _source(data.dataset, data.root, data.split, data.image_column, data.label_column)
    images, labels = load_rows(src, split.all_rows(), resolution or data.resolution)
    lut = split.remap()
    return images, np.asarray([lut[int(y)] for y in labels], np.int64)


# ================================================================================================ supports


class SupportSampler:
    """An infinite iterator of class-balanced support batches over labeled arrays (see the module docstring).

    ``labels`` are 0..C-1. Each step: ``classes_per_step`` classes (all when 0 or >= C) x
    ``images_per_class`` images, grouped by class in increasing label order.
    """

    def __init__(self, images, labels, classes_per_step: int, images_per_class: int, seed=0,
                 device: torch.device | str = "cpu"):
        if images_per_class < 1:
            raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
        labels = np.asarray(labels, np.int64)
        self.classes = np.unique(labels)
        if len(self.classes) == 0:
            raise ValueError("no labeled images to draw supports from")
        self.num_classes = len(self.classes)
        self.classes_per_step = self.num_classes if classes_per_step <= 0 else min(classes_per_step, self.num_classes)
        self.images_per_class = int(images_per_class)
        self.rng = np.random.default_rng(seed if isinstance(seed, (list, tuple)) else [int(seed)])
        self.members = [np.flatnonzero(labels == c) for c in self.classes]
        self.streams: list[np.ndarray] = [np.zeros(0, np.int64) for _ in self.classes]
        device = torch.device(device)
        tensor = torch.as_tensor(np.ascontiguousarray(images))
        if device.type != "cpu" and tensor.numel() <= SUPPORT_ON_DEVICE_MAX_BYTES:
            tensor = tensor.to(device)
        self.images = tensor
        self.labels = torch.as_tensor(labels).to(tensor.device)

    def _take(self, j: int, m: int) -> np.ndarray:
        out = []
        while m > 0:
            if len(self.streams[j]) == 0:
                self.streams[j] = self.members[j][self.rng.permutation(len(self.members[j]))]
            got = self.streams[j][:m]
            self.streams[j] = self.streams[j][m:]
            out.append(got)
            m -= len(got)
        return np.concatenate(out)

    def next_indices(self) -> np.ndarray:
        if self.classes_per_step < self.num_classes:
            chosen = np.sort(self.rng.choice(self.num_classes, self.classes_per_step, replace=False))
        else:
            chosen = np.arange(self.num_classes)
        return np.concatenate([self._take(int(j), self.images_per_class) for j in chosen])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(self.next_indices()).to(self.images.device)
        return self.images[idx], self.labels[idx]


def support_sampler(cfg, spec, rank: int, world_size: int, device,
                    start_epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training loop's support stream for ``spec`` (a SupportSpec): ``(uint8 [S, R, R, 3], int64 [S])``.

    Labels are 0..C-1 over ``data.known_classes``. Raises ConfigError when the run has no labeled split.
    The stream is seeded by (train seed, split seed, rank, ``start_epoch``): a run resumed at epoch e draws a
    stream of its own instead of replaying the supports of epoch 0 (as the augmentation stream does).
    """
    data = cfg.data
    if not is_semisupervised(data):
        raise ConfigError(f"data.labels_per_class: method {cfg.method.name!r} trains on labeled supports; set "
                          "data.labels_per_class (or data.label_fraction / data.split_file)")
    images, labels = load_labeled(data)
    if len(images) == 0:
        raise ConfigError(f"data.labels_per_class: no labeled images could be decoded from {data.dataset}")
    seed = [int(cfg.train.seed), int(data.split_seed), int(rank), 0x5A9]
    if start_epoch:
        seed.append(int(start_epoch))
    return SupportSampler(images, labels, spec.classes_per_step, spec.images_per_class, seed=seed, device=device)


# ================================================================================================ unlabeled pool


@dataclass
class PoolSource:
    """One source of the unlabeled pool: which rows, and (for evaluation only) their true labels."""

    dataset: str
    split: str
    rows: np.ndarray
    true_labels: np.ndarray
    in_class: np.ndarray
    """Per row: the image belongs to a known class of the labeled dataset."""
    description: str = ""
    known_classes: list[int] = field(default_factory=list)


@dataclass
class UnlabeledPool:
    """Decoded pool without Ray. ``labels`` are all -1 (what training sees); the rest is for evaluation."""

    images: np.ndarray
    labels: np.ndarray
    source: np.ndarray
    """Per image: index into ``sources``."""
    true_labels: np.ndarray
    in_class: np.ndarray
    sources: list[PoolSource] = field(default_factory=list)


def _same(a: str, b: str) -> bool:
    return str(a).rstrip("/") == str(b).rstrip("/")


def _entries(data) -> list[tuple[int, dict]]:
    """``(seed index, entry)`` per source; the seed index stays fixed when a zero share is dropped."""
    if data.mix:
        return list(enumerate(dict(e) for e in data.mix))
    if data.ood_fraction is not None:
        r = float(data.ood_fraction)
        ood = ({"dataset": data.ood_dataset, "split": data.ood_split, "classes": "all"} if data.ood_dataset
               else {"classes": "unknown"})
        entries = [(0, {"classes": "known", "fraction": 1.0 - r}), (1, {**ood, "fraction": r})]
        return [(i, e) for i, e in entries if e["fraction"] > 0]
    return [(0, {})]


def pool_manifest(data) -> list[PoolSource]:
    """The rows of every source of the unlabeled pool of ``data`` (deterministic in the config)."""
    validate(data)
    labeled: LabeledSplit | None = labeled_split(data) if is_semisupervised(data) else None
    primary_src = _source(data.dataset, data.root, data.split, data.image_column, data.label_column)
    primary_labels = row_labels(primary_src)
    known = labeled.known_classes if labeled is not None else _known_or_all(data, primary_labels)
    labeled_rows = labeled.all_rows() if labeled is not None else np.zeros(0, np.int64)

    resolved = []
    for seed_index, entry in _entries(data):
        dataset = entry.get("dataset") or data.dataset
        split = entry.get("split") or data.split
        is_primary = _same(dataset, data.dataset) and split == (data.split or "train")
        src = primary_src if is_primary else _source(dataset, data.root, split, data.image_column, data.label_column)
        labels = primary_labels if is_primary else row_labels(src)
        rows = np.arange(len(labels), dtype=np.int64)
        if is_primary and data.limit is not None:
            rows = data_lib.subset_indices(len(labels), data.limit, data.seed)
        classes = entry.get("classes")
        same_classes = _same(dataset, data.dataset)
        if classes in ("known", "unknown"):
            if not same_classes:
                raise ConfigError(f"data.mix: classes: {classes} refers to the classes of {data.dataset}; "
                                  f"list class ids for {dataset}")
            wanted = np.isin(labels[rows], known)
            rows = rows[wanted if classes == "known" else ~wanted]
        elif isinstance(classes, list):
            rows = rows[np.isin(labels[rows], classes)]
        if is_primary and entry.get("exclude_labeled", data.unlabeled_exclude_labeled) and len(labeled_rows):
            rows = np.setdiff1d(rows, labeled_rows, assume_unique=True)
        if len(rows) == 0:
            raise ConfigError(f"data.mix: no rows in {dataset}/{split} for classes {classes!r}")
        resolved.append((seed_index, entry, dataset, split, rows, labels, same_classes))

    fractions = [float(e["fraction"]) for _, e, *_ in resolved if "fraction" in e]
    if fractions:
        avail = [len(r[4]) for r in resolved]
        total = data.unlabeled_size or int(min(a / f for a, f in zip(avail, fractions)) + 1e-9)
        sizes = [int(np.floor(f * total + 1e-9)) for f in fractions]
        sizes[-1] = total - sum(sizes[:-1])
        for (seed_index, entry, dataset, split, rows, *_), n in zip(resolved, sizes):
            if n > len(rows):
                raise ConfigError(f"data.unlabeled_size: {total} rows at these shares need {n} from {dataset}/{split} "
                                  f"but it has {len(rows)}; lower data.unlabeled_size")
    else:
        sizes = [int(e["count"]) if "count" in e else len(rows) for _, e, _, _, rows, *_ in resolved]
        for (_, entry, dataset, split, rows, *_), n in zip(resolved, sizes):
            if n > len(rows):
                raise ConfigError(f"data.mix: count {n} but {dataset}/{split} has {len(rows)} rows there")

    out = []
    for (seed_index, entry, dataset, split, rows, labels, same_classes), n in zip(resolved, sizes):
        if n < len(rows):
            perm = np.random.default_rng([int(data.seed), int(seed_index), 0x51ED]).permutation(len(rows))
            rows = np.sort(rows[perm[:n]])
        true = labels[rows]
        in_class = np.isin(true, known) if same_classes else np.zeros(len(rows), bool)
        desc = f"{dataset}/{split}" + (f" classes={entry['classes']}" if entry.get("classes") is not None else "")
        out.append(PoolSource(dataset, split, rows, true, in_class, desc, list(known) if same_classes else []))
    return out


def _known_or_all(data, labels: np.ndarray) -> list[int]:
    if data.known_classes is not None:
        return [int(c) for c in data.known_classes]
    return [int(c) for c in np.unique(labels[labels >= 0])]


def pool_summary(sources: list[PoolSource]) -> dict[str, Any]:
    """Rows per source and the out-of-class share (for logging; never used by training)."""
    total = sum(len(s.rows) for s in sources)
    inside = sum(int(s.in_class.sum()) for s in sources)
    return {"pool/rows": total, "pool/out_of_class_fraction": 1.0 - inside / max(total, 1),
            **{f"pool/source{i}_rows": len(s.rows) for i, s in enumerate(sources)}}


def load_unlabeled_arrays(data, resolution: int | None = None) -> UnlabeledPool:
    """Decode the unlabeled pool without Ray (tests, LocalEnv runs): images with labels -1 plus origins."""
    sources = pool_manifest(data)
    res = int(resolution or data.resolution)
    images, true, origin, inside = [], [], [], []
    for i, s in enumerate(sources):
        src = _source(s.dataset, data.root, s.split, data.image_column, data.label_column)
        if len(s.rows) == len(row_labels(src)):  # a whole split: the data layer's array cache applies
            imgs, labs = data_lib.load_arrays(s.dataset, data.root, s.split, res, image_column=data.image_column,
                                              label_column=data.label_column)
        else:
            imgs, labs = load_rows(src, s.rows, res)
        images.append(imgs)
        true.append(labs)
        origin.append(np.full(len(imgs), i, np.int64))
        inside.append(np.isin(labs, s.known_classes) if s.known_classes else np.zeros(len(imgs), bool))
    images_all = np.concatenate(images) if images else np.zeros((0, res, res, 3), np.uint8)
    true_all = np.concatenate(true) if true else np.zeros(0, np.int64)
    return UnlabeledPool(images_all, np.full(len(images_all), -1, np.int64), np.concatenate(origin), true_all,
                         np.concatenate(inside), sources)


def _decode_unlabeled(batch, resolution: int, counter: Any = None) -> dict[str, np.ndarray]:
    """The data layer's decode, with every label replaced by -1 (training never sees the pool's labels)."""
    out = data_lib._decode_udf(batch, resolution, counter)
    return {"image": out["image"], "label": np.full(len(out["label"]), -1, dtype=np.int64)}


def build_unlabeled_dataset(data, *, window_bytes: int | None = None):
    """The unlabeled pool as a :class:`replab.platform.data.TrainData` (``ray.data.Dataset`` of ``image`` +
    ``label`` = -1): one read per source (the data layer's shuffle windows over the selected rows), unioned.

    The sources' blocks are interleaved in a random order and the trainer-side shuffle buffer
    (``data.shuffle_buffer`` rows, default 8192 = 32 blocks of 256) mixes them, so each batch holds the sources
    close to their proportions; cached pools draw a new block order every epoch (:func:`data.epoch_stream`).
    """
    import uuid

    import ray

    sources = pool_manifest(data)
    if not ray.is_initialized():
        ray.init()
    counter_name = f"replab-skips-{uuid.uuid4().hex[:12]}"
    counter = data_lib._skip_actor(counter_name, create=True)
    parts = []
    num_rows = 0
    for i, s in enumerate(sources):
        src = _source(s.dataset, data.root, s.split, data.image_column, data.label_column)
        index = data_lib.build_index(src)
        selected = None if len(s.rows) == index.total_rows else s.rows
        plan = data_lib._Plan.build(index, selected)
        num_rows += plan.num_rows
        ds = ray.data.read_datasource(
            data_lib._datasource_class()(plan, int(data.seed) * 1000 + i, window_bytes or data_lib.WINDOW_BYTES),
            override_num_blocks=max(1, len(plan.pieces)),
        )
        ds = ds.repartition(target_num_rows_per_block=max(1, int(data.decode_batch_size)))
        ds = ds.map_batches(_decode_unlabeled, batch_size=max(1, int(data.decode_batch_size)),
                            batch_format="pyarrow", fn_kwargs={"resolution": int(data.resolution), "counter": counter})
        parts.append(ds)
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    cached = data_lib.should_cache(data.cache, num_rows, int(data.resolution))
    if len(parts) > 1 and not cached:  # interleave the sources' blocks (epoch_stream does it when cached)
        ds = ds.randomize_block_order(seed=int(data.seed))
    ds, buffer = data_lib.epoch_stream(ds, cached=cached, seed=int(data.seed), shuffle_buffer=data.shuffle_buffer)
    known = None
    if is_semisupervised(data):
        known = labeled_split(data).known_classes
    return data_lib.TrainData(
        dataset=ds, num_rows=num_rows, shuffle_buffer=buffer, counter_name=counter_name, cached=cached,
        source=" + ".join(s.description for s in sources), num_classes=len(known) if known else None,
        class_names=None, resolution=int(data.resolution),
    )


__all__ = [
    "LabeledSplit", "PoolSource", "SupportSampler", "UnlabeledPool", "build_unlabeled_dataset", "is_semisupervised",
    "labeled_split", "load_labeled", "load_rows", "load_unlabeled_arrays", "pool_manifest", "pool_summary",
    "read_split_file", "resolve_source", "row_labels", "select_labeled", "split_path", "support_sampler",
    "uses_unlabeled_pool",
    "validate", "write_split_file",
]

