"""The data layer: sources -> a shuffled, decoded ``ray.data.Dataset`` (or numpy arrays without Ray).

Sources (:func:`resolve`)
    1. Parquet in the Hugging Face image layout: the image column (``data.image_column``) is a struct
       ``{bytes, path}`` or plain binary; the label column (``data.label_column``) is optional (missing: label
       -1) and may be integers or strings (strings: classes = sorted unique values).
    2. A folder of images: class sub-folders give labels 0..C-1 in sorted name order; a flat folder is
       unlabeled (-1). Every regular file is a sample (hidden files, ``_*`` and a few metadata names such as
       ``classes.json``/``README.md`` aside): a file that is not a decodable image is skipped and counted.
    3. Tar shards (webdataset style, uncompressed ``.tar``): members ``key.jpg``/``key.png``/... plus an
       optional ``key.cls`` (an integer label); class names from ``classes.json`` beside the shards.
    4. Named datasets ``cifar10``, ``tinyimagenet``, ``imagenette128`` under the data root
       (``{root}/{name}/{split}-NNNNN-of-MMMMM.parquet`` + ``classes.json`` + ``info.json``).

    Splits: files named ``{split}-*``/``{split}_*`` or under a ``{split}/`` folder (``val`` also matches
    ``validation``/``valid``); a source without split naming is the ``train`` split only. Paths may be local
    (made absolute before they reach Ray workers), ``file://``, ``s3://``, ``gs://`` or anything
    ``pyarrow.fs.FileSystem.from_uri`` reads; a local path may contain ``*`` globs.

Rows and ids
    Every sample has a global row id: files in sorted path order, rows in file order. ``data.limit = N``
    keeps :func:`subset_indices` ``(total, N, seed)``: the first N of one seeded permutation of all ids,
    sorted. It is a random subset (the shared shards are sorted by class), exactly N rows (minus skipped
    ones), and nested: the subset for N is inside the subset for N' > N with the same seed.

Pipeline (:func:`build_train_dataset`)
    A custom Ray Data datasource plans the read per execution. Reading works on *pieces* (a parquet row
    group, a run of tar members, one loose file); every execution (every epoch's ``iter_torch_batches``)
    draws a new permutation of the pieces from ``(seed, execution index)`` (the same mechanism as Ray's
    ``FileShuffleConfig(reseed_after_execution=True)``), packs them into *shuffle windows* of at most
    :data:`WINDOW_BYTES` encoded bytes, and each read task permutes the rows of its whole
    window before emitting them. Reading encoded bytes is cheap, so windows can span many row groups
    (all of CIFAR-10 is one 55 MB window: a full shuffle each epoch; loose files are drawn
    :data:`FOLDER_WINDOW_FILES` at a time from a global permutation); then ``repartition`` cuts the stream
    into ``decode_batch_size`` blocks and ``map_batches`` decodes them in parallel CPU tasks (uint8
    ``[R, R, 3]`` ``image`` + int64 ``label``). Large corpora are streamed (memory bounded by the windows in
    flight) and additionally mixed by the trainer-side local shuffle buffer (``TrainData.shuffle_buffer``).

    ``data.cache``: ``on``, or ``auto`` when the decoded corpus is under 25% of the object store, decodes
    once and ``materialize()`` s; every epoch then draws a new block order (``randomize_block_order``, seeded
    per execution) and the trainer-side shuffle buffer mixes rows across blocks, so the first batch comes
    without waiting for an all-to-all shuffle.

Skipped images
    Bad rows are dropped inside the decode function (never an exception: ``max_errored_blocks`` is 0) and
    reported to a named Ray actor (``SkipCounter``, namespace ``replab``, created with ``get_if_exists``),
    keyed by row id, so the count is the number of distinct bad rows however many epochs re-decode them.
    ``TrainData.skipped()`` works on the driver and in train workers on any node (it looks the actor up by
    name; ``skipped_count(name)`` does the same from just the name). Without Ray, :func:`load_arrays` fills
    ``stats={"skipped": n, "reasons": {...}, "examples": [...]}``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import uuid
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from replab.platform import decode as _decode
from replab.platform.datasets import (
    NAMED_DATASETS,
    DataError,
    DatasetInfo,
    data_root,
    download,
    how_to_fix,
    is_uri,
)

__all__ = [
    "DataError",
    "DatasetInfo",
    "Source",
    "TrainData",
    "build_train_dataset",
    "data_root",
    "dataset_info",
    "default_test_split",
    "download",
    "inspect",
    "iterate_batches",
    "load_arrays",
    "resolve",
    "resolve_config",
    "should_cache",
    "skipped_count",
    "skipped_summary",
    "subset_indices",
]

log = logging.getLogger(__name__)

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "pnm", "jfif", "jpe"}
LABEL_EXTS = {"cls", "cls.txt", "label", "label.txt", "class", "class.txt", "cls2"}
KNOWN_SPLITS = ("train", "test", "val", "validation", "valid", "dev", "unlabeled", "unsupervised")
SPLIT_ALIASES = {"val": ("val", "validation", "valid"), "validation": ("validation", "val", "valid"),
                 "valid": ("valid", "val", "validation")}
IGNORED_FILES = {"classes.json", "info.json", "readme", "readme.md", "readme.txt", "license", "license.txt",
                 "thumbs.db", "desktop.ini", "dataset_info.json", "state.json", "dataset_dict.json"}

WINDOW_BYTES = int(float(os.environ.get("REPLAB_SHUFFLE_WINDOW_MB", "128")) * (1 << 20))
"""Encoded bytes per shuffle window (one read task); env ``REPLAB_SHUFFLE_WINDOW_MB``."""
FOLDER_WINDOW_FILES = 256
"""Loose files per read task (drawn from a global permutation of the files each epoch)."""
TAR_PIECE_BYTES = 16 << 20
SKIP_NAMESPACE = "replab"
CACHE_FRACTION = 0.25
ARRAY_CACHE_MAX_BYTES = 2 << 30

ENCODED_SCHEMA = pa.schema([("bytes", pa.large_binary()), ("label", pa.int64()), ("row", pa.int64()),
                            ("name", pa.string())])


# ================================================================================================ sources


@dataclass
class Source:
    """A resolved dataset split: what kind, which files, how to read them (picklable)."""

    kind: str
    """``parquet``, ``folder`` or ``tar``."""
    name: str
    split: str
    uri: str
    """Absolute local path or URI of the resolved location (shown in messages)."""
    files: list[str]
    """Paths inside ``filesystem`` (absolute for local files), sorted."""
    filesystem: pafs.FileSystem
    base: str
    """Folder the files are relative to (for row names and class sub-folders)."""
    image_column: str = "image"
    label_column: str = "label"
    class_names: list[str] | None = None
    file_labels: list[int] | None = None
    """folder: label of each file (-1: unlabeled)."""
    file_sizes: list[int] | None = None
    file_mtimes: list[float] | None = None

    def rel(self, path: str) -> str:
        return posixpath.relpath(path, self.base) if path.startswith(self.base) else path

    def fingerprint(self) -> str:
        """Changes when the files change (keys the array cache)."""
        h = hashlib.sha1()
        h.update(json.dumps([self.kind, self.uri, self.split, self.image_column, self.label_column]).encode())
        for i, f in enumerate(self.files):
            size = self.file_sizes[i] if self.file_sizes else None
            mtime = self.file_mtimes[i] if self.file_mtimes else None
            h.update(f"{f}|{size}|{mtime}\n".encode())
        return h.hexdigest()


def _filesystem(path: str) -> tuple[pafs.FileSystem, str, str]:
    """``(filesystem, path inside it, display form)``; local paths made absolute."""
    if is_uri(path):
        try:
            fs, inner = pafs.FileSystem.from_uri(path)
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"cannot open {path}: {exc}") from None
        return fs, inner.rstrip("/") or "/", path.rstrip("/")
    p = str(Path(path).expanduser().resolve())
    return pafs.LocalFileSystem(), p, p


def _hidden(rel: str) -> bool:
    parts = rel.split("/")
    return any(part.startswith((".", "_")) for part in parts) or parts[-1].lower() in IGNORED_FILES


def _list_files(fs: pafs.FileSystem, base: str) -> list[pafs.FileInfo]:
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    out = [i for i in infos if i.type == pafs.FileType.File and not _hidden(posixpath.relpath(i.path, base))]
    return sorted(out, key=lambda i: i.path)


def _split_token(rel: str) -> str | None:
    """The split named by a relative path: its first component (``train/...``) or a ``{split}-`` prefix."""
    for comp in rel.split("/"):
        head = re.split(r"[-_.]", comp, maxsplit=1)[0].lower()
        if head in KNOWN_SPLITS:
            return head
    return None


def _split_matches(token: str | None, split: str) -> bool:
    return token is not None and token in SPLIT_ALIASES.get(split, (split,))


def _select_split(rels: list[str], split: str, where: str) -> list[int]:
    tokens = [_split_token(r) for r in rels]
    chosen = [i for i, t in enumerate(tokens) if _split_matches(t, split)]
    if chosen:
        return chosen
    present = sorted({t for t in tokens if t is not None})
    if not present and split == "train":
        return list(range(len(rels)))
    if not present:
        raise DataError(
            f"{where} has no split naming, so it is served as split 'train' only (asked for {split!r}); "
            "name files {split}-*.parquet / {split}-*.tar or use {split}/ sub-folders"
        )
    raise DataError(f"{where} has no split {split!r} (splits found: {', '.join(present)})")


def _expand_glob(path: str) -> tuple[pafs.FileSystem, list[pafs.FileInfo], str, str]:
    fs, inner, display = _filesystem(path)
    # The pattern lives in the last components; list from the longest prefix without wildcards.
    parts = inner.split("/")
    fixed = []
    for part in parts:
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    base = "/".join(fixed) or "/"
    import fnmatch

    try:
        infos = _list_files(fs, base)
    except (FileNotFoundError, OSError):
        infos = []
    matched = [i for i in infos if fnmatch.fnmatch(i.path, inner)]
    return fs, matched, base, display


def resolve(
    dataset: str,
    root: str = "",
    split: str = "train",
    *,
    image_column: str = "image",
    label_column: str = "label",
) -> Source:
    """Find ``split`` of ``dataset`` (a named dataset under the data root, or a path/URI); raises DataError."""
    if not dataset:
        raise DataError(f"data.dataset is empty; use a named dataset ({', '.join(NAMED_DATASETS)}) or a path")
    dataset = str(dataset)
    split = split or "train"
    if dataset in NAMED_DATASETS and not dataset.startswith((".", "/")):
        base = data_root(root)
        location = posixpath.join(base, dataset) if is_uri(base) else os.path.join(base, dataset)
        fs, inner, display = _filesystem(location)
        info = fs.get_file_info(inner)
        files = _list_files(fs, inner) if info.type == pafs.FileType.Directory else []
        parquet = [f for f in files if f.path.endswith(".parquet")]
        if not parquet:
            raise DataError(
                f"dataset {dataset!r} not found: looked for {display}/{split}-*.parquet "
                f"({'no such folder' if info.type == pafs.FileType.NotFound else 'no parquet files there'}). "
                f"To fix: {how_to_fix(dataset)}"
            )
        src = _source_from_files(fs, parquet, inner, display, dataset, split, "parquet", image_column, label_column)
        src.class_names = src.class_names or _classes_json(fs, inner)
        return src

    if any(c in dataset for c in "*?[") and not is_uri(dataset):
        fs, infos, base, display = _expand_glob(dataset)
        if not infos:
            raise DataError(f"{dataset}: the pattern matches no files")
        kinds = {_kind_of(i.path) for i in infos}
        kind = "parquet" if "parquet" in kinds else "tar" if "tar" in kinds else "folder"
        infos = [i for i in infos if _kind_of(i.path) == kind] if kind != "folder" else infos
        return _source_from_files(fs, infos, base, display, dataset, split, kind, image_column, label_column)

    fs, inner, display = _filesystem(dataset)
    try:
        info = fs.get_file_info(inner)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read {display}: {exc}") from None
    if info.type == pafs.FileType.NotFound:
        if "/" not in dataset and not is_uri(dataset):
            raise DataError(
                f"{dataset!r} is not a named dataset ({', '.join(NAMED_DATASETS)}) and not an existing path "
                f"(looked for {display})"
            )
        raise DataError(f"dataset path not found: {display}")
    if info.type == pafs.FileType.File:
        kind = _kind_of(inner)
        if kind not in ("parquet", "tar"):
            raise DataError(f"{display}: expected a .parquet file, a .tar shard or a folder")
        base = posixpath.dirname(inner)
        return _source_from_files(fs, [info], base, display, dataset, split, kind, image_column, label_column)

    files = _list_files(fs, inner)
    parquet = [f for f in files if f.path.endswith(".parquet")]
    tars = [f for f in files if f.path.endswith(".tar")]
    if parquet:
        src = _source_from_files(fs, parquet, inner, display, dataset, split, "parquet", image_column, label_column)
        src.class_names = src.class_names or _classes_json(fs, inner)
        return src
    if tars:
        src = _source_from_files(fs, tars, inner, display, dataset, split, "tar", image_column, label_column)
        src.class_names = src.class_names or _classes_json(fs, inner)
        return src
    if any(f.path.endswith((".tar.gz", ".tgz", ".zip")) for f in files):
        raise DataError(f"{display}: compressed archives are not read directly; extract them or use `replab data download`")
    return _folder_source(fs, files, inner, display, dataset, split)


def _kind_of(path: str) -> str:
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith(".tar"):
        return "tar"
    return "folder"


def _classes_json(fs: pafs.FileSystem, base: str) -> list[str] | None:
    for name in ("classes.json", "classes.txt"):
        path = posixpath.join(base, name)
        try:
            if fs.get_file_info(path).type != pafs.FileType.File:
                continue
            with fs.open_input_stream(path) as f:
                text = f.read().decode()
            return [str(c) for c in json.loads(text)] if name.endswith(".json") else [
                line.strip() for line in text.splitlines() if line.strip()
            ]
        except Exception:  # noqa: BLE001
            continue
    return None


def _source_from_files(fs, infos, base, display, name, split, kind, image_column, label_column) -> Source:
    rels = [posixpath.relpath(i.path, base) for i in infos]
    chosen = _select_split(rels, split, display)
    infos = [infos[i] for i in chosen]
    return Source(
        kind=kind,
        name=name,
        split=split,
        uri=display,
        files=[i.path for i in infos],
        filesystem=fs,
        base=base,
        image_column=image_column,
        label_column=label_column,
        file_sizes=[int(i.size or 0) for i in infos],
        file_mtimes=[float(i.mtime.timestamp()) if i.mtime else 0.0 for i in infos],
    )


def _folder_source(fs, files, inner, display, name, split) -> Source:
    base = inner
    top_dirs = {posixpath.relpath(f.path, inner).split("/")[0] for f in files if "/" in posixpath.relpath(f.path, inner)}
    split_dirs = {d for d in top_dirs if d.lower() in KNOWN_SPLITS}
    if split_dirs:
        match = [d for d in sorted(split_dirs) if _split_matches(d.lower(), split)]
        if not match:
            raise DataError(f"{display} has no split {split!r} (splits found: {', '.join(sorted(split_dirs))})")
        base = posixpath.join(inner, match[0])
        files = [f for f in files if f.path.startswith(base + "/")]
    elif split != "train":
        raise DataError(
            f"{display} has no split sub-folders, so it is served as split 'train' only (asked for {split!r}); "
            "use train/, val/ or test/ sub-folders"
        )
    rels = [posixpath.relpath(f.path, base) for f in files]
    class_dirs = sorted({r.split("/")[0] for r in rels if "/" in r})
    if class_dirs:
        index = {c: i for i, c in enumerate(class_dirs)}
        keep = [i for i, r in enumerate(rels) if "/" in r]  # files beside the class folders are not samples
        files = [files[i] for i in keep]
        labels = [index[rels[i].split("/")[0]] for i in keep]
        class_names: list[str] | None = class_dirs
    else:
        labels = [-1] * len(files)
        class_names = None
    if not files:
        raise DataError(f"{display}: no files found")
    return Source(
        kind="folder",
        name=name,
        split=split,
        uri=display if base == inner else f"{display}/{posixpath.relpath(base, inner)}",
        files=[f.path for f in files],
        filesystem=fs,
        base=base,
        class_names=class_names,
        file_labels=labels,
        file_sizes=[int(f.size or 0) for f in files],
        file_mtimes=[float(f.mtime.timestamp()) if f.mtime else 0.0 for f in files],
    )


# ================================================================================================ index


@dataclass
class _Index:
    """Pieces (the units that are read at once) and, for folder/tar, per-row locations."""

    source: Source
    piece_file: np.ndarray
    piece_part: np.ndarray
    """parquet: row-group index; tar: first sample index of the run; folder: unused."""
    piece_row0: np.ndarray
    piece_rows: np.ndarray
    piece_bytes: np.ndarray
    total_rows: int
    label_values: list[str] | None = None
    """String label column: the sorted values (label = index)."""
    has_labels: bool = True
    # tar only (per sample, global order)
    tar_offset: np.ndarray | None = None
    tar_size: np.ndarray | None = None
    tar_label: np.ndarray | None = None
    tar_name: list[str] | None = None
    max_label: int = -1

    @property
    def num_classes(self) -> int | None:
        names = self.source.class_names
        if names:
            return len(names)
        return self.max_label + 1 if self.max_label >= 0 else None


def _threads(n: int) -> int:
    return max(1, min(16, n))


def build_index(src: Source) -> _Index:
    if src.kind == "parquet":
        return _parquet_index(src)
    if src.kind == "tar":
        return _tar_index(src)
    return _folder_index(src)


def _leaf_bytes(rg: pq.RowGroupMetaData, column: str) -> int:
    total = 0
    for j in range(rg.num_columns):
        col = rg.column(j)
        path = col.path_in_schema
        if path == column or path.startswith(column + "."):
            total += int(col.total_compressed_size)
    return total


def _parquet_index(src: Source) -> _Index:
    fs = src.filesystem

    def footer(path: str) -> pq.FileMetaData:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata

    with ThreadPoolExecutor(_threads(len(src.files))) as pool:
        metas = list(pool.map(footer, src.files))
    schema = metas[0].schema.to_arrow_schema()
    if src.image_column not in schema.names:
        raise DataError(
            f"{src.uri}: no image column {src.image_column!r} (columns: {', '.join(schema.names)}); "
            "set --set data.image_column=NAME"
        )
    itype = schema.field(src.image_column).type
    if not (pa.types.is_struct(itype) and any(_is_binary(f.type) for f in itype) or _is_binary(itype)):
        raise DataError(f"{src.uri}: column {src.image_column!r} is {itype}, expected binary or struct<bytes, path>")
    has_labels = src.label_column in schema.names
    label_values = None
    max_label = -1
    if has_labels:
        ltype = schema.field(src.label_column).type
        if pa.types.is_string(ltype) or pa.types.is_large_string(ltype) or pa.types.is_dictionary(ltype):
            values: set[str] = set()
            for path in src.files:
                with fs.open_input_file(path) as f:
                    col = pq.ParquetFile(f).read(columns=[src.label_column]).column(0)
                values.update(v for v in pc.unique(col.cast(pa.string())).to_pylist() if v is not None)
            label_values = sorted(values)
            max_label = len(label_values) - 1
        else:
            max_label = _parquet_max_label(metas, src.label_column, fs, src.files)
    else:
        log.warning("%s: no label column %r; labels are -1", src.uri, src.label_column)
    pf, pp, pr, pb = [], [], [], []
    for i, meta in enumerate(metas):
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            if rg.num_rows == 0:
                continue
            pf.append(i)
            pp.append(g)
            pr.append(rg.num_rows)
            pb.append(_leaf_bytes(rg, src.image_column))
    rows = np.asarray(pr, dtype=np.int64)
    row0 = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64) if len(rows) else rows
    if label_values and not src.class_names:
        src.class_names = list(label_values)
    return _Index(src, np.asarray(pf, np.int64), np.asarray(pp, np.int64), row0, rows,
                  np.asarray(pb, np.int64), int(rows.sum()), label_values, has_labels, max_label=max_label)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or (
        hasattr(pa.types, "is_binary_view") and pa.types.is_binary_view(t)
    )


def _parquet_max_label(metas, column, fs, files) -> int:
    """Largest label: from the row-group statistics, reading the column only where they are missing."""
    best = -1
    for meta, path in zip(metas, files):
        stats_ok = True
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            col = next((rg.column(j) for j in range(rg.num_columns) if rg.column(j).path_in_schema == column), None)
            stats = None if col is None else col.statistics
            if stats is None or not stats.has_min_max:
                stats_ok = False
                break
            best = max(best, int(stats.max))
        if not stats_ok:
            with fs.open_input_file(path) as f:
                top = pc.max(pq.ParquetFile(f).read(columns=[column]).column(0)).as_py()
            best = max(best, int(top) if top is not None else -1)
    return best


def _folder_index(src: Source) -> _Index:
    n = len(src.files)
    labels = np.asarray(src.file_labels if src.file_labels is not None else [-1] * n, dtype=np.int64)
    return _Index(
        src,
        np.arange(n, dtype=np.int64),
        np.zeros(n, np.int64),
        np.arange(n, dtype=np.int64),
        np.ones(n, np.int64),
        np.asarray(src.file_sizes or [0] * n, np.int64),
        n,
        has_labels=bool(src.class_names),
        max_label=int(labels.max()) if n else -1,
    )


def _tar_key(name: str) -> tuple[str, str]:
    """webdataset convention: ``dir/key.ext.ext`` -> (``dir/key``, ``ext.ext``)."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


def _scan_tar(fs: pafs.FileSystem, path: str) -> list[tuple[int, int, int, str]]:
    """``[(data offset, size, label, key)]`` per sample of one shard (header scan; labels read from .cls)."""
    samples: dict[str, dict] = {}
    order: list[str] = []
    try:
        with fs.open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                directory, base = posixpath.split(m.name)
                if base.startswith((".", "_")):
                    continue
                key, ext = _tar_key(m.name)
                entry = samples.get(key)
                if entry is None:
                    entry = samples[key] = {"image": None, "other": None, "label": -1}
                    order.append(key)
                if ext in LABEL_EXTS:
                    try:
                        entry["label"] = int(tar.extractfile(m).read().decode().strip().split()[0])
                    except (ValueError, IndexError, UnicodeDecodeError):
                        entry["label"] = -1
                elif ext.split(".")[-1] in IMAGE_EXTS and entry["image"] is None:
                    entry["image"] = (m.offset_data, m.size)
                elif entry["other"] is None and ext not in ("json", "txt", "json.txt"):
                    entry["other"] = (m.offset_data, m.size)
    except tarfile.ReadError as exc:
        raise DataError(f"{path}: not a readable uncompressed tar shard ({exc})") from None
    out = []
    for key in order:
        entry = samples[key]
        loc = entry["image"] or entry["other"]
        if loc is None:
            continue  # a key with only a label/json member is not a sample
        out.append((int(loc[0]), int(loc[1]), int(entry["label"]), key))
    return out


def _tar_index(src: Source) -> _Index:
    fs = src.filesystem
    with ThreadPoolExecutor(_threads(len(src.files))) as pool:
        shards = list(pool.map(lambda p: _scan_tar(fs, p), src.files))
    offs, sizes, labels, names, pf, pp, pr, pb = [], [], [], [], [], [], [], []
    total = 0
    for i, samples in enumerate(shards):
        start = 0
        while start < len(samples):
            end = start
            first = samples[start][0]
            while end < len(samples) and end - start < 1024 and (
                end == start or samples[end][0] + samples[end][1] - first <= TAR_PIECE_BYTES
            ):
                end += 1
            pf.append(i)
            pp.append(total + start)
            pr.append(end - start)
            pb.append(samples[end - 1][0] + samples[end - 1][1] - first)
            start = end
        for off, size, label, key in samples:
            offs.append(off)
            sizes.append(size)
            labels.append(label)
            names.append(f"{posixpath.basename(src.files[i])}:{key}")
        total += len(samples)
    rows = np.asarray(pr, np.int64)
    lab = np.asarray(labels, np.int64)
    return _Index(src, np.asarray(pf, np.int64), np.asarray(pp, np.int64), np.asarray(pp, np.int64), rows,
                  np.asarray(pb, np.int64), total, has_labels=bool((lab >= 0).any()),
                  tar_offset=np.asarray(offs, np.int64), tar_size=np.asarray(sizes, np.int64), tar_label=lab,
                  tar_name=names, max_label=int(lab.max()) if len(lab) else -1)


# ================================================================================================ subset


def subset_indices(total: int, limit: int | None, seed: int) -> np.ndarray:
    """The sorted row ids kept by ``data.limit``: the first ``limit`` of a seeded permutation of ``total``.

    Nested: for the same ``(total, seed)`` the subset for N is contained in the subset for N' > N.
    """
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if limit is None or limit >= total:
        return np.arange(total, dtype=np.int64)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    perm = np.random.default_rng(seed).permutation(total)
    return np.sort(perm[:limit]).astype(np.int64)


# ================================================================================================ reading


@dataclass
class _Piece:
    """One read unit with the rows to keep (local indices, or None for all)."""

    kind: str
    path: str
    part: int
    row0: int
    rows: np.ndarray | None
    nbytes: int
    count: int
    """Rows this piece contributes (len(rows), or all rows of the piece)."""
    # folder / tar payload
    labels: np.ndarray | None = None
    names: list[str] | None = None
    offsets: np.ndarray | None = None
    sizes: np.ndarray | None = None
    paths: list[str] | None = None
    """files: the paths (``rows`` then holds their global row ids)."""


@dataclass
class _ReadSpec:
    kind: str
    filesystem: pafs.FileSystem
    base: str
    image_column: str
    label_column: str
    has_labels: bool
    label_values: list[str] | None


@dataclass
class _Plan:
    """Everything a read needs, computed once on the driver: pieces with their selected rows.

    Loose files (``folder``) are kept as arrays rather than one piece per file: pieces of up to
    :data:`FOLDER_WINDOW_FILES` files are cut on demand, in row order (``pieces``) or from a fresh
    permutation per execution (``windows``), so every read task gets a uniform random sample of files.
    """

    spec: _ReadSpec
    pieces: list[_Piece]
    num_rows: int
    encoded_bytes: int
    file_paths: list[str] | None = None
    file_ids: np.ndarray | None = None
    file_labels: np.ndarray | None = None
    file_sizes: np.ndarray | None = None

    @classmethod
    def build(cls, index: _Index, selected: np.ndarray | None) -> "_Plan":
        src = index.source
        spec = _ReadSpec(src.kind, src.filesystem, src.base, src.image_column, src.label_column,
                         index.has_labels, index.label_values)
        if src.kind == "folder":
            ids = np.arange(index.total_rows, dtype=np.int64) if selected is None else selected.astype(np.int64)
            labels = np.asarray(src.file_labels if src.file_labels is not None else [-1] * index.total_rows,
                                dtype=np.int64)
            plan = cls(spec, [], len(ids), int(index.piece_bytes[ids].sum()), file_paths=src.files, file_ids=ids,
                       file_labels=labels, file_sizes=index.piece_bytes)
            plan.pieces = [plan._files_piece(ids[i:i + FOLDER_WINDOW_FILES])
                           for i in range(0, len(ids), FOLDER_WINDOW_FILES)]
            return plan
        pieces: list[_Piece] = []
        starts = index.piece_row0
        ends = index.piece_row0 + index.piece_rows
        if selected is not None:
            lo = np.searchsorted(selected, starts, side="left")
            hi = np.searchsorted(selected, ends, side="left")
        num_rows = 0
        encoded = 0
        for k in range(len(starts)):
            if selected is None:
                local = None
                n = int(index.piece_rows[k])
            else:
                if hi[k] == lo[k]:
                    continue
                local = (selected[lo[k]:hi[k]] - starts[k]).astype(np.int64)
                n = len(local)
                if n == index.piece_rows[k]:
                    local = None
            path = src.files[int(index.piece_file[k])]
            nbytes = int(index.piece_bytes[k])
            piece = _Piece(src.kind, path, int(index.piece_part[k]), int(starts[k]), local, nbytes, n)
            if src.kind == "tar":
                ids = np.arange(starts[k], ends[k]) if local is None else starts[k] + local
                piece.offsets = index.tar_offset[ids]
                piece.sizes = index.tar_size[ids]
                piece.labels = index.tar_label[ids]
                piece.names = [index.tar_name[i] for i in ids]
            pieces.append(piece)
            num_rows += n
            encoded += nbytes if local is None else max(1, nbytes * n // int(index.piece_rows[k]))
        return cls(spec, pieces, num_rows, encoded)

    def _files_piece(self, ids: np.ndarray) -> _Piece:
        paths = [self.file_paths[int(i)] for i in ids]
        base = self.spec.base.rstrip("/") + "/"
        piece = _Piece("files", "", 0, 0, np.asarray(ids, np.int64), int(self.file_sizes[ids].sum()), len(ids))
        piece.labels = self.file_labels[ids]
        piece.names = [p[len(base):] if p.startswith(base) else p for p in paths]
        piece.paths = paths
        return piece

    def windows(self, rng: np.random.Generator, window_bytes: int) -> list[list[_Piece]]:
        if self.spec.kind == "folder":
            ids = self.file_ids[rng.permutation(len(self.file_ids))]
            return [[self._files_piece(ids[i:i + FOLDER_WINDOW_FILES])]
                    for i in range(0, len(ids), FOLDER_WINDOW_FILES)]
        order = rng.permutation(len(self.pieces))
        out: list[list[_Piece]] = []
        cur: list[_Piece] = []
        cur_bytes = 0
        for k in order:
            piece = self.pieces[int(k)]
            if cur and cur_bytes + piece.nbytes > window_bytes:
                out.append(cur)
                cur, cur_bytes = [], 0
            cur.append(piece)
            cur_bytes += piece.nbytes
        if cur:
            out.append(cur)
        return out


def _struct_bytes(col: pa.ChunkedArray) -> tuple[pa.ChunkedArray, pa.ChunkedArray | None]:
    if not pa.types.is_struct(col.type):
        return col, None
    names = [f.name for f in col.type]
    bname = "bytes" if "bytes" in names else next(f.name for f in col.type if _is_binary(f.type))
    data = pc.struct_field(col, names.index(bname))
    path = pc.struct_field(col, names.index("path")) if "path" in names else None
    return data, path


def _labels_from(table: pa.Table, spec: _ReadSpec) -> np.ndarray:
    if not spec.has_labels or spec.label_column not in table.column_names:
        return np.full(table.num_rows, -1, dtype=np.int64)
    col = table.column(spec.label_column)
    if spec.label_values is not None:
        idx = pc.index_in(col.cast(pa.string()), value_set=pa.array(spec.label_values, pa.string()))
        return np.asarray(pc.fill_null(idx, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
    col = pc.fill_null(col.cast(pa.int64()), -1)
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.int64)


def _read_piece(spec: _ReadSpec, piece: _Piece) -> pa.Table:
    fs = spec.filesystem
    if piece.kind == "parquet":
        columns = [spec.image_column] + ([spec.label_column] if spec.has_labels else [])
        with fs.open_input_file(piece.path) as f:
            table = pq.ParquetFile(f).read_row_group(piece.part, columns=columns)
        if piece.rows is not None:
            table = table.take(pa.array(piece.rows))
        data, paths = _struct_bytes(table.column(spec.image_column))
        n = table.num_rows
        local = np.arange(n, dtype=np.int64) if piece.rows is None else piece.rows
        if paths is not None:
            names = pc.fill_null(paths.cast(pa.string()), "")
            fallback = [f"{posixpath.basename(piece.path)}#{piece.row0 + int(r)}" for r in local]
            name_list = [p or fb for p, fb in zip(names.to_pylist(), fallback)]
        else:
            name_list = [f"{posixpath.basename(piece.path)}#{piece.row0 + int(r)}" for r in local]
        return pa.table(
            {
                "bytes": data.cast(pa.large_binary()),
                "label": pa.array(_labels_from(table, spec)),
                "row": pa.array(piece.row0 + local),
                "name": pa.array(name_list, pa.string()),
            },
            schema=ENCODED_SCHEMA,
        )
    if piece.kind == "tar":
        first = int(piece.offsets[0])
        length = int(piece.offsets[-1] + piece.sizes[-1]) - first
        with fs.open_input_file(piece.path) as f:
            buf = f.read_at(length, first)
        view = memoryview(buf)
        blobs = [bytes(view[int(o) - first:int(o) - first + int(s)]) for o, s in zip(piece.offsets, piece.sizes)]
        local = np.arange(len(blobs), dtype=np.int64) if piece.rows is None else piece.rows
        return pa.table(
            {
                "bytes": pa.array(blobs, pa.large_binary()),
                "label": pa.array(np.asarray(piece.labels, np.int64)),
                "row": pa.array(piece.row0 + local),
                "name": pa.array(piece.names, pa.string()),
            },
            schema=ENCODED_SCHEMA,
        )
    # loose files
    blobs = []
    for path in piece.paths:
        try:
            with fs.open_input_stream(path) as f:
                blobs.append(f.read())
        except OSError as exc:  # unreadable file: reported as an empty image, with its name
            log.warning("cannot read %s: %s", path, exc)
            blobs.append(b"")
    return pa.table(
        {"bytes": pa.array(blobs, pa.large_binary()), "label": pa.array(np.asarray(piece.labels, np.int64)),
         "row": pa.array(np.asarray(piece.rows, np.int64)), "name": pa.array(piece.names, pa.string())},
        schema=ENCODED_SCHEMA,
    )


def _read_pieces(spec: _ReadSpec, pieces: Sequence[_Piece]) -> pa.Table:
    tables = [_read_piece(spec, p) for p in pieces]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _read_window(spec: _ReadSpec, pieces: list[_Piece], perm_seed: tuple[int, ...]) -> Iterator[pa.Table]:
    table = _read_pieces(spec, pieces)
    perm = np.random.default_rng(list(perm_seed)).permutation(table.num_rows)
    yield table.take(pa.array(perm))


# ================================================================================================ skip counting


class SkipCounter:
    """Distinct skipped rows of one dataset (a named Ray actor; see :func:`build_train_dataset`)."""

    MAX_EXAMPLES = 20

    def __init__(self) -> None:
        self.rows: set[int] = set()
        self.reasons: Counter = Counter()
        self.examples: list[tuple[str, str]] = []

    def add(self, rows: list[int], names: list[str], reasons: list[str]) -> int:
        for row, name, reason in zip(rows, names, reasons):
            if row in self.rows:
                continue
            self.rows.add(int(row))
            self.reasons[_decode.category(reason)] += 1
            if len(self.examples) < self.MAX_EXAMPLES:
                self.examples.append((name, reason))
        return len(self.rows)

    def count(self) -> int:
        return len(self.rows)

    def summary(self) -> dict:
        return {"skipped": len(self.rows), "reasons": dict(self.reasons), "examples": list(self.examples)}


def _skip_actor(name: str, create: bool = False):
    import ray

    if create:
        actor_cls = ray.remote(num_cpus=0, max_restarts=0)(SkipCounter)
        return actor_cls.options(name=name, namespace=SKIP_NAMESPACE, get_if_exists=True).remote()
    return ray.get_actor(name, namespace=SKIP_NAMESPACE)


def skipped_count(counter_name: str) -> int:
    """Skipped rows recorded under ``counter_name`` (``TrainData.counter_name``), from any node."""
    import ray

    return int(ray.get(_skip_actor(counter_name).count.remote()))


def skipped_summary(counter_name: str) -> dict:
    import ray

    return ray.get(_skip_actor(counter_name).summary.remote())


def _decode_udf(batch: pa.Table, resolution: int, counter: Any = None) -> dict[str, np.ndarray]:
    images, ok, reasons = _decode.decode_batch(batch.column("bytes").to_pylist(), resolution)
    labels = batch.column("label").to_numpy()
    if not ok.all():
        bad = np.flatnonzero(~ok)
        rows = batch.column("row").to_numpy()[bad].tolist()
        names = batch.column("name").take(pa.array(bad)).to_pylist()
        why = [reasons[i] for i in bad]
        if counter is not None:
            import ray

            try:  # synchronous, so a count read right after the epoch includes this batch
                ray.get(counter.add.remote(rows, names, why))
            except Exception as exc:  # noqa: BLE001  (a lost counter must not fail the data pipeline)
                log.warning("could not record %d skipped images (%s): %s", len(rows), exc, why[:3])
        labels = labels[ok]
    return {"image": images, "label": np.asarray(labels, dtype=np.int64)}


# ================================================================================================ Ray Data


@functools.lru_cache(maxsize=None)
def _datasource_class():
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ImageWindowDatasource(Datasource):
        """Encoded rows in per-execution shuffle windows (see the module docstring)."""

        def __init__(self, plan: _Plan, seed: int, window_bytes: int):
            super().__init__()
            self._plan = plan
            self._seed = int(seed)
            self._window_bytes = int(window_bytes)

        def get_name(self) -> str:
            return "ReplabImages"

        def estimate_inmemory_data_size(self) -> int | None:
            return self._plan.encoded_bytes

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
            execution = int(getattr(data_context, "_execution_idx", 0) or 0) if data_context is not None else 0
            rng = np.random.default_rng([self._seed, execution])
            tasks = []
            for w, pieces in enumerate(self._plan.windows(rng, self._window_bytes)):
                rows = sum(p.count for p in pieces)
                meta = BlockMetadata(num_rows=rows, size_bytes=int(sum(p.nbytes for p in pieces)),
                                     exec_stats=None, input_files=None)
                fn = functools.partial(_read_window, self._plan.spec, pieces, (self._seed, execution, w))
                tasks.append(ReadTask(fn, meta, schema=ENCODED_SCHEMA, per_task_row_limit=per_task_row_limit))
            return tasks

    return ImageWindowDatasource


@dataclass
class TrainData:
    """What :func:`build_train_dataset` returns to the training loop."""

    dataset: Any
    """``ray.data.Dataset`` with rows ``image`` (uint8 [R, R, 3]) and ``label`` (int64)."""
    num_rows: int
    """Rows after ``limit``, before skipped ones."""
    shuffle_buffer: int | None
    """Pass to ``iter_torch_batches(local_shuffle_buffer_size=...)`` (None: ``data.shuffle_buffer=0``);
    it must be >= 2x the per-worker batch size (see :meth:`local_shuffle_buffer`)."""
    counter_name: str
    cached: bool
    source: str
    num_classes: int | None = None
    class_names: list[str] | None = None
    resolution: int = 32

    def local_shuffle_buffer(self, batch_size: int) -> int | None:
        """``shuffle_buffer`` raised to at least ``2 * batch_size`` (per-worker batch), or None without one.

        Ray 2.60's local shuffle buffer yields a short batch mid-epoch, even with ``drop_last=True``, when
        ``local_shuffle_buffer_size < 2 * batch_size`` (its compaction threshold is half the buffer): always
        pass a buffer of at least twice the batch.
        """
        if self.shuffle_buffer is None:
            return None
        return max(int(self.shuffle_buffer), 2 * int(batch_size))

    def skipped(self) -> int:
        """Distinct rows skipped so far (works on the driver and in Ray Train workers on any node)."""
        return skipped_count(self.counter_name)

    def skipped_summary(self) -> dict:
        """``{"skipped": n, "reasons": {category: n}, "examples": [(name, reason), ...]}``."""
        return skipped_summary(self.counter_name)


def _object_store_bytes() -> float:
    try:
        import ray

        if ray.is_initialized():
            return float(ray.cluster_resources().get("object_store_memory", 0.0))
    except Exception:  # noqa: BLE001
        pass
    try:
        import psutil

        return 0.3 * psutil.virtual_memory().total  # Ray's default object store fraction
    except Exception:  # noqa: BLE001
        return 0.0


def should_cache(cache: str, num_rows: int, resolution: int, object_store_bytes: float | None = None) -> bool:
    """``data.cache``: ``on``/``off``, or ``auto``: the decoded images take < 25% of the object store."""
    if cache in ("on", True):
        return True
    if cache in ("off", False):
        return False
    store = _object_store_bytes() if object_store_bytes is None else object_store_bytes
    return num_rows * resolution * resolution * 3 < CACHE_FRACTION * store


def resolve_config(cfg, split: str | None = None) -> Source:
    """:func:`resolve` for a :class:`replab.config.DataConfig` (``split`` defaults to ``cfg.split``),
    downloading a missing named dataset first when ``cfg.download`` is set; raises DataError otherwise."""
    return _resolve_cfg(cfg, split or cfg.split)


def _resolve_cfg(cfg, split: str) -> Source:
    """resolve() for a DataConfig, downloading a missing named dataset when ``cfg.download`` is set."""
    try:
        return resolve(cfg.dataset, cfg.root, split, image_column=cfg.image_column, label_column=cfg.label_column)
    except DataError:
        if not (getattr(cfg, "download", False) and cfg.dataset in NAMED_DATASETS):
            raise
    download(cfg.dataset, cfg.root)
    return resolve(cfg.dataset, cfg.root, split, image_column=cfg.image_column, label_column=cfg.label_column)


def _plan_for(cfg, split: str | None = None) -> tuple[Source, _Index, _Plan]:
    src = _resolve_cfg(cfg, split or cfg.split)
    index = build_index(src)
    selected = None if cfg.limit is None else subset_indices(index.total_rows, cfg.limit, cfg.seed)
    return src, index, _Plan.build(index, selected)


def epoch_stream(ds, *, cached: bool, seed: int, shuffle_buffer: int) -> tuple[Any, int | None]:
    """The dataset every epoch iterates, and the trainer-side shuffle buffer (None: ``shuffle_buffer`` <= 0).

    Cached: ``materialize()`` once, then a new block order per epoch (``randomize_block_order`` reseeded per
    execution) and the buffer mixes rows across blocks. Not a global ``random_shuffle``: that is an all-to-all
    barrier before every epoch's first batch, ~15% of a short epoch (docs/BENCHMARKS.md, Ray overhead).
    Streamed: rows are already permuted within each read window; the buffer mixes across windows.
    """
    if cached:
        from ray.data import RandomSeedConfig

        ds = ds.materialize()
        ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return ds, (int(shuffle_buffer) if shuffle_buffer and shuffle_buffer > 0 else None)


def build_train_dataset(cfg, *, window_bytes: int | None = None) -> TrainData:
    """The training ``ray.data.Dataset`` for ``cfg`` (a :class:`replab.config.DataConfig`).

    Streams by default; caches decoded images in the object store when ``cfg.cache`` is ``on``, or
    ``auto`` and they take less than a quarter of it. See the module docstring for shuffling and skips.
    Raises :class:`DataError` (before any Ray work) when the data cannot be found. Typical use::

        td = build_train_dataset(cfg.data)
        TorchTrainer(..., datasets={"train": td.dataset},
                     dataset_config=ray.train.DataConfig(datasets_to_split=["train"]))
        # in each worker (per-worker batch b):
        shard.iter_torch_batches(batch_size=b, drop_last=True,
                                 local_shuffle_buffer_size=td.local_shuffle_buffer(b))
        metrics["data/skipped"] = skipped_count(td.counter_name)   # or td.skipped()
    """
    import ray

    src, index, plan = _plan_for(cfg)
    if plan.num_rows == 0:
        raise DataError(f"{src.uri}: no rows to train on (split {src.split!r}, limit {cfg.limit})")
    if not ray.is_initialized():
        ray.init()
    counter_name = f"replab-skips-{uuid.uuid4().hex[:12]}"
    counter = _skip_actor(counter_name, create=True)
    ds = ray.data.read_datasource(
        _datasource_class()(plan, cfg.seed, window_bytes or WINDOW_BYTES),
        override_num_blocks=max(1, len(plan.pieces)),
    )
    ds = ds.repartition(target_num_rows_per_block=max(1, int(cfg.decode_batch_size)))
    ds = ds.map_batches(
        _decode_udf,
        batch_size=max(1, int(cfg.decode_batch_size)),
        batch_format="pyarrow",
        fn_kwargs={"resolution": int(cfg.resolution), "counter": counter},
    )
    cached = should_cache(cfg.cache, plan.num_rows, int(cfg.resolution))
    ds, buffer = epoch_stream(ds, cached=cached, seed=int(cfg.seed), shuffle_buffer=cfg.shuffle_buffer)
    return TrainData(
        dataset=ds,
        num_rows=plan.num_rows,
        shuffle_buffer=buffer,
        counter_name=counter_name,
        cached=cached,
        source=src.uri,
        num_classes=index.num_classes,
        class_names=src.class_names,
        resolution=int(cfg.resolution),
    )


# ================================================================================================ no Ray


def _cache_dir() -> str:
    return os.environ.get("REPLAB_CACHE_DIR") or str(Path("~/.cache/replab").expanduser())


def _array_cache_enabled(cache: bool | None) -> bool:
    if cache is not None:
        return cache
    return os.environ.get("REPLAB_ARRAY_CACHE", "1").lower() not in ("0", "false", "no", "off")


def _decode_pieces(plan: _Plan, resolution: int, num_threads: int | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read + decode every piece of ``plan`` in row-id order (threads: Pillow releases the GIL)."""
    n = plan.num_rows
    images = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    reasons: Counter = Counter()
    examples: list[tuple[str, str]] = []
    # Jobs: (output offset, pieces), ~decode_batch rows each, so threads share work evenly.
    jobs: list[tuple[int, list[_Piece]]] = []
    offset, cur, cur_rows = 0, [], 0
    for piece in plan.pieces:
        cur.append(piece)
        cur_rows += piece.count
        if cur_rows >= 256:
            jobs.append((offset, cur))
            offset, cur, cur_rows = offset + cur_rows, [], 0
    if cur:
        jobs.append((offset, cur))

    def run(job: tuple[int, list[_Piece]]):
        start, pieces = job
        table = _read_pieces(plan.spec, pieces)
        decoded, mask, why = _decode.decode_batch(table.column("bytes").to_pylist(), resolution)
        return start, table, decoded, mask, why

    threads = num_threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        it = iter(jobs)
        for job in it:
            pending.append(pool.submit(run, job))
            if len(pending) >= 2 * threads:
                break
        while pending:
            start, table, decoded, mask, why = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(run, nxt))
            m = table.num_rows
            labels[start:start + m] = table.column("label").to_numpy()
            ok[start:start + m] = mask
            images[start:start + m][mask] = decoded
            if not mask.all():
                names = table.column("name").to_pylist()
                for i in np.flatnonzero(~mask):
                    reasons[_decode.category(why[i])] += 1
                    if len(examples) < SkipCounter.MAX_EXAMPLES:
                        examples.append((names[i], why[i]))
    skipped = int(n - ok.sum())
    if skipped:
        images, labels = images[ok], labels[ok]
    return images, labels, {"skipped": skipped, "reasons": dict(reasons), "examples": examples}


def load_arrays(
    dataset: str,
    root: str = "",
    split: str = "train",
    resolution: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    image_column: str = "image",
    label_column: str = "label",
    *,
    cache: bool | None = None,
    stats: dict | None = None,
    num_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a split without Ray: ``(images uint8 [N, R, R, 3], labels int64 [N])`` in row-id order.

    ``dataset`` is a named dataset, a path/URI, or a :class:`replab.config.DataConfig` (then ``root``,
    columns, ``resolution``, ``limit`` and ``seed`` come from it unless given, and ``download`` is honoured).
    ``resolution`` defaults to 32. ``limit`` keeps the same nested seeded subset
    as training. Skipped images are left out; ``stats`` (a dict, filled in) gets ``skipped``, ``reasons`` and
    ``examples``. Decoded arrays up to 2 GiB are cached under ``$REPLAB_CACHE_DIR`` (default
    ``~/.cache/replab``)/arrays keyed by the files (size, mtime), split, resolution, limit and seed;
    ``cache=False`` or ``REPLAB_ARRAY_CACHE=0`` turns that off.
    """
    if not isinstance(dataset, str) and hasattr(dataset, "dataset"):
        cfg = dataset
        if root and root != cfg.root:
            cfg = dataclasses.replace(cfg, root=root)
        dataset = cfg.dataset
        image_column, label_column = cfg.image_column, cfg.label_column
        resolution = resolution or cfg.resolution
        if limit is None:
            limit = cfg.limit
        seed = seed or cfg.seed
        src = _resolve_cfg(cfg, split)
    else:
        src = resolve(dataset, root, split, image_column=image_column, label_column=label_column)
    resolution = int(resolution or 32)
    result_stats: dict = {}
    key_path = None
    if _array_cache_enabled(cache):
        key = hashlib.sha1(
            json.dumps([src.fingerprint(), int(resolution), limit, int(seed), _decode.DECODE_VERSION]).encode()
        ).hexdigest()[:16]
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", posixpath.basename(str(dataset).rstrip("/")))[:40]
        key_path = os.path.join(_cache_dir(), "arrays", f"{safe}-{split}-r{resolution}-n{limit}-s{seed}-{key}")
        if os.path.isfile(os.path.join(key_path, "meta.json")):
            try:
                images = np.load(os.path.join(key_path, "images.npy"))
                labels = np.load(os.path.join(key_path, "labels.npy"))
                with open(os.path.join(key_path, "meta.json")) as f:
                    result_stats = json.load(f)
                result_stats["cached"] = True
                if stats is not None:
                    stats.clear()
                    stats.update(result_stats)
                return images, labels
            except (OSError, ValueError, json.JSONDecodeError):
                shutil.rmtree(key_path, ignore_errors=True)
    index = build_index(src)
    selected = None if limit is None else subset_indices(index.total_rows, limit, seed)
    plan = _Plan.build(index, selected)
    images, labels, result_stats = _decode_pieces(plan, int(resolution), num_threads)
    result_stats["rows"] = plan.num_rows
    if key_path is not None and images.nbytes <= ARRAY_CACHE_MAX_BYTES:
        try:
            os.makedirs(os.path.dirname(key_path), exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(key_path))
            np.save(os.path.join(tmp, "images.npy"), images)
            np.save(os.path.join(tmp, "labels.npy"), labels)
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(result_stats, f)
            try:
                os.replace(tmp, key_path)
            except OSError:  # another process wrote it first
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as exc:
            log.warning("could not write the array cache %s: %s", key_path, exc)
    if stats is not None:
        stats.clear()
        stats.update(result_stats)
    return images, labels


def iterate_batches(
    images,
    labels,
    batch_size: int,
    seed: int,
    epoch: int,
    drop_last: bool = True,
) -> Iterator[dict[str, Any]]:
    """Batches ``{"image": uint8 [B, R, R, 3], "label": int64 [B]}`` (torch) in a new order per (seed, epoch)."""
    import torch

    n = len(images)
    if len(labels) != n:
        raise ValueError(f"images ({n}) and labels ({len(labels)}) differ in length")
    perm = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
    stop = n - n % batch_size if drop_last else n
    is_torch = isinstance(images, torch.Tensor)
    for start in range(0, stop, batch_size):
        idx = perm[start:start + batch_size]
        if is_torch:
            t_idx = torch.from_numpy(idx)
            yield {"image": images[t_idx], "label": torch.as_tensor(labels[t_idx] if isinstance(labels, torch.Tensor)
                                                                    else np.asarray(labels)[idx], dtype=torch.int64)}
        else:
            yield {"image": torch.from_numpy(np.ascontiguousarray(images[idx])),
                   "label": torch.from_numpy(np.asarray(labels)[idx].astype(np.int64, copy=False))}


# ================================================================================================ info


def _available_splits(dataset: str, root: str = "") -> list[str]:
    if dataset in NAMED_DATASETS and not dataset.startswith((".", "/")):
        base = data_root(root)
        location = posixpath.join(base, dataset) if is_uri(base) else os.path.join(base, dataset)
    else:
        location = dataset
    fs, inner, display = _filesystem(location)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        resolve(dataset, root, "train")  # raises the clear not-found error
        return []
    if info.type == pafs.FileType.File:
        token = _split_token(posixpath.basename(inner))
        return [token or "train"]
    files = _list_files(fs, inner)
    shards = [f for f in files if f.path.endswith((".parquet", ".tar"))]
    if shards:
        tokens = {_split_token(posixpath.relpath(f.path, inner)) for f in shards}
    else:
        tokens = {_split_token(posixpath.relpath(f.path, inner).split("/")[0])
                  for f in files if "/" in posixpath.relpath(f.path, inner)}
    tokens.discard(None)
    return sorted(tokens) if tokens else ["train"]


def dataset_info(dataset: str, root: str = "") -> DatasetInfo:
    """Name, classes (``classes.json`` when present, else class folders / label values) and rows per split
    (from the parquet footers, the folder listing or the tar headers)."""
    splits: dict[str, int] = {}
    class_names: list[str] | None = None
    num_classes: int | None = None
    for split in _available_splits(dataset, root):
        src = resolve(dataset, root, split)
        index = build_index(src)
        splits[split] = index.total_rows
        class_names = class_names or src.class_names
        if index.num_classes is not None:
            num_classes = max(num_classes or 0, index.num_classes)
    if class_names:
        num_classes = len(class_names)
    return DatasetInfo(name=dataset, num_classes=num_classes, class_names=class_names, splits=splits)


def default_test_split(dataset: str, root: str = "") -> str:
    """``"test"`` or ``"val"``, whichever the dataset has (test first); DataError when neither."""
    splits = _available_splits(dataset, root)
    if "test" in splits:
        return "test"
    for name in ("val", "validation", "valid"):
        if name in splits:
            return "val"
    raise DataError(f"{dataset}: no test or val split (splits: {', '.join(splits)}); set --set eval.test_split=NAME")


def inspect(source: str, root: str = "", split: str = "train", sample: int = 2000,
            image_column: str = "image", label_column: str = "label") -> dict:
    """Summary of a source: rows, classes, label counts and, on a seeded sample, image sizes, modes and
    formats, and how many images do not decode (with a few names and reasons)."""
    from PIL import Image

    src = resolve(source, root, split, image_column=image_column, label_column=label_column)
    index = build_index(src)
    selected = subset_indices(index.total_rows, min(sample, index.total_rows), 0)
    plan = _Plan.build(index, selected)
    widths, heights = [], []
    modes: Counter = Counter()
    formats: Counter = Counter()
    label_counts: Counter = Counter()
    unreadable = 0
    reasons: Counter = Counter()
    examples: list[tuple[str, str]] = []
    import io
    import warnings

    for start in range(0, len(plan.pieces), 64):
        table = _read_pieces(plan.spec, plan.pieces[start:start + 64])
        blobs = table.column("bytes").to_pylist()
        names = table.column("name").to_pylist()
        label_counts.update(table.column("label").to_pylist())
        _, ok, why = _decode.decode_batch(blobs, 8)
        for blob, good, reason, name in zip(blobs, ok, why, names):
            if not good:
                unreadable += 1
                reasons[_decode.category(reason)] += 1
                if len(examples) < 10:
                    examples.append((name, reason))
            limit = Image.MAX_IMAGE_PIXELS
            try:
                Image.MAX_IMAGE_PIXELS = None  # header only: report the size of decompression bombs too
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with Image.open(io.BytesIO(blob)) as im:
                        widths.append(im.size[0])
                        heights.append(im.size[1])
                        modes[im.mode] += 1
                        formats[im.format or "?"] += 1
            except Exception:  # noqa: BLE001
                continue
            finally:
                Image.MAX_IMAGE_PIXELS = limit

    def dist(values: list[int]) -> dict:
        if not values:
            return {}
        arr = np.asarray(values)
        return {"min": int(arr.min()), "median": float(np.median(arr)), "max": int(arr.max())}

    return {
        "source": src.uri,
        "kind": src.kind,
        "split": split,
        "files": len(src.files),
        "rows": index.total_rows,
        "num_classes": index.num_classes,
        "class_names": src.class_names,
        "labeled": index.has_labels,
        "sampled": plan.num_rows,
        "sample_label_counts": {int(k): v for k, v in sorted(label_counts.items())},
        "width": dist(widths),
        "height": dist(heights),
        "modes": dict(modes),
        "formats": dict(formats),
        "unreadable": unreadable,
        "unreadable_reasons": dict(reasons),
        "unreadable_examples": examples,
    }
