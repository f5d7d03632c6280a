"""Semi-supervised and open-set data settings, and labeled splits (:func:`labeled_split`).

``data.labels_per_class = k`` (or ``data.label_fraction``) picks, for every known class c
(``data.known_classes``, default all), the first k row ids of a permutation of that class's rows seeded by
``(data.split_seed, c)``, sorted; so splits are nested (the 25-label split is inside the 50-label one).
The choice is written to a JSON split file (``data.split_file``; default
``$REPLAB_CACHE_DIR/splits/<dataset>-<split>-k<k>-c<classes>-s<seed>.json``, cache dir
``~/.cache/replab``) holding the row ids per class; an existing file is read, not recomputed, so a run
is reproducible from its split file (log it as an artifact) and hand-made splits can be used. Row ids are
the data layer's global ids (files in sorted order, rows in file order), the same ids as ``data.limit``.
The split is drawn from the whole split, whatever ``data.limit`` (which only shrinks the unlabeled pool).

:func:`validate` checks the semi-supervised keys of the ``data`` section (labels, known classes, ``mix``).
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from replab.config import ConfigError
from replab.platform.data import arrays, datasets, indexes, plan, sources

SPLIT_FORMAT = "replab-labeled-split/1"


MIX_KEYS = ("dataset", "split", "classes", "count", "fraction", "exclude_labeled")


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


_LABEL_CACHE: dict[str, np.ndarray] = {}


_LABEL_LOCK = threading.Lock()


def _source(dataset: str, root: str, split: str, image_column: str = "image", label_column: str = "label"):
    return sources.resolve(dataset, root, split, image_column=image_column, label_column=label_column)


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
    index = indexes.build_index(src)
    if src.kind == "parquet":
        spec = plan.ReadPlan.build(index, np.zeros(0, np.int64)).spec
        parts = []
        for path in src.files:
            if not spec.has_labels:
                with src.filesystem.open_input_file(path) as f:
                    parts.append(np.full(pq.ParquetFile(f).metadata.num_rows, -1, np.int64))
                continue
            with src.filesystem.open_input_file(path) as f:
                table = pq.ParquetFile(f).read(columns=[src.label_column])
            parts.append(plan.labels_from(table, spec))
        labels = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    elif src.kind == "tar":
        labels = np.asarray(index.tar_label, np.int64)
    else:
        labels = np.asarray(src.file_labels if src.file_labels is not None else [-1] * index.total_rows, np.int64)
    if len(labels) != index.total_rows:
        raise datasets.DataError(f"{src.uri}: {len(labels)} labels for {index.total_rows} rows")
    with _LABEL_LOCK:
        _LABEL_CACHE[key] = labels
    return labels


def load_rows(src, rows: np.ndarray, resolution: int, num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode the given row ids of a resolved source without Ray: ``(uint8 [n, R, R, 3], labels [n])`` in
    row-id order (undecodable rows are left out)."""
    rows = np.unique(np.asarray(rows, np.int64))
    if len(rows) == 0:
        return np.zeros((0, resolution, resolution, 3), np.uint8), np.zeros(0, np.int64)
    read_plan = plan.ReadPlan.build(indexes.build_index(src), rows)
    images, labels, _stats = arrays.decode_pieces(read_plan, int(resolution), num_threads)
    return images, labels


def _known(data, labels: np.ndarray) -> list[int]:
    if data.known_classes is not None:
        return [int(c) for c in data.known_classes]
    present = np.unique(labels[labels >= 0])
    if len(present) == 0:
        raise ConfigError(f"data.dataset: {data.dataset} has no labels; a labeled split needs a labeled dataset")
    return [int(c) for c in present]


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
