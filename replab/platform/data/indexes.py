"""The row index of a source: every sample's global row id (files in sorted path order, rows in file order), its
label and where its bytes are (parquet row groups, tar member offsets, loose files).

``data.limit = N`` keeps :func:`subset_indices` ``(total, N, seed)``: the first N of one seeded permutation of
all ids, sorted. It is a random subset (the shared shards are sorted by class), exactly N rows (minus skipped
ones), and nested: the subset for N is inside the subset for N' > N with the same seed.
"""

from __future__ import annotations

import logging
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from replab.platform.data.datasets import DataError
from replab.platform.data.sources import IMAGE_EXTS, LABEL_EXTS, Source

log = logging.getLogger(__name__)




TAR_PIECE_BYTES = 16 << 20


@dataclass
class RowIndex:
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


def build_index(src: Source) -> RowIndex:
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


def _parquet_index(src: Source) -> RowIndex:
    fs = src.filesystem

    def footer(path: str) -> pq.FileMetaData:
        try:
            with fs.open_input_file(path) as f:
                return pq.ParquetFile(f).metadata
        except (pa.ArrowInvalid, OSError) as exc:  # truncated, or not parquet at all
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"{path}: not a readable parquet file ({reason}); re-copy or remove this shard") from None

    with ThreadPoolExecutor(_threads(len(src.files))) as pool:
        metas = list(pool.map(footer, src.files))
    schema = metas[0].schema.to_arrow_schema()
    if src.image_column not in schema.names:
        raise DataError(
            f"{src.uri}: no image column {src.image_column!r} (columns: {', '.join(schema.names)}); "
            "set --set data.image_column=NAME"
        )
    itype = schema.field(src.image_column).type
    if not (pa.types.is_struct(itype) and any(is_binary(f.type) for f in itype) or is_binary(itype)):
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
    return RowIndex(src, np.asarray(pf, np.int64), np.asarray(pp, np.int64), row0, rows,
                  np.asarray(pb, np.int64), int(rows.sum()), label_values, has_labels, max_label=max_label)


def is_binary(t: pa.DataType) -> bool:
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


def _folder_index(src: Source) -> RowIndex:
    n = len(src.files)
    labels = np.asarray(src.file_labels if src.file_labels is not None else [-1] * n, dtype=np.int64)
    return RowIndex(
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


def _tar_index(src: Source) -> RowIndex:
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
    return RowIndex(src, np.asarray(pf, np.int64), np.asarray(pp, np.int64), np.asarray(pp, np.int64), rows,
                  np.asarray(pb, np.int64), total, has_labels=bool((lab >= 0).any()),
                  tar_offset=np.asarray(offs, np.int64), tar_size=np.asarray(sizes, np.int64), tar_label=lab,
                  tar_name=names, max_label=int(lab.max()) if len(lab) else -1)


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
