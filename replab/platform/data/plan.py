"""The read plan: a source's rows cut into *pieces* (a parquet row group, a run of tar members, one loose file)
and packed into *shuffle windows* of at most :data:`WINDOW_BYTES` encoded bytes.

Every execution draws a new permutation of the pieces from ``(seed, execution index)`` (the mechanism of Ray's
``FileShuffleConfig(reseed_after_execution=True)``), and each read permutes the rows of its whole window.
Reading encoded bytes is cheap, so windows can span many row groups (all of CIFAR-10 is one 55 MB window: a
full shuffle each epoch; loose files are drawn :data:`FOLDER_WINDOW_FILES` at a time from a global
permutation).
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from replab.platform.data.indexes import RowIndex, build_index, is_binary, subset_indices
from replab.platform.data.sources import Source, resolve_for_split

log = logging.getLogger(__name__)




WINDOW_BYTES = int(float(os.environ.get("REPLAB_SHUFFLE_WINDOW_MB", "128")) * (1 << 20))
"""Encoded bytes per shuffle window (one read task); env ``REPLAB_SHUFFLE_WINDOW_MB``."""


FOLDER_WINDOW_FILES = 256
"""Loose files per read task (drawn from a global permutation of the files each epoch)."""


ENCODED_SCHEMA = pa.schema([("bytes", pa.large_binary()), ("label", pa.int64()), ("row", pa.int64()),
                            ("name", pa.string())])


@dataclass
class Piece:
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
class ReadSpec:
    kind: str
    filesystem: pafs.FileSystem
    base: str
    image_column: str
    label_column: str
    has_labels: bool
    label_values: list[str] | None


@dataclass
class ReadPlan:
    """Everything a read needs, computed once on the driver: pieces with their selected rows.

    Loose files (``folder``) are kept as arrays rather than one piece per file: pieces of up to
    :data:`FOLDER_WINDOW_FILES` files are cut on demand, in row order (``pieces``) or from a fresh
    permutation per execution (``windows``), so every read task gets a uniform random sample of files.
    """

    spec: ReadSpec
    pieces: list[Piece]
    num_rows: int
    encoded_bytes: int
    file_paths: list[str] | None = None
    file_ids: np.ndarray | None = None
    file_labels: np.ndarray | None = None
    file_sizes: np.ndarray | None = None

    @classmethod
    def build(cls, index: RowIndex, selected: np.ndarray | None) -> "ReadPlan":
        src = index.source
        spec = ReadSpec(src.kind, src.filesystem, src.base, src.image_column, src.label_column,
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
        pieces: list[Piece] = []
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
            piece = Piece(src.kind, path, int(index.piece_part[k]), int(starts[k]), local, nbytes, n)
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

    def _files_piece(self, ids: np.ndarray) -> Piece:
        paths = [self.file_paths[int(i)] for i in ids]
        base = self.spec.base.rstrip("/") + "/"
        piece = Piece("files", "", 0, 0, np.asarray(ids, np.int64), int(self.file_sizes[ids].sum()), len(ids))
        piece.labels = self.file_labels[ids]
        piece.names = [p[len(base):] if p.startswith(base) else p for p in paths]
        piece.paths = paths
        return piece

    def windows(self, rng: np.random.Generator, window_bytes: int) -> list[list[Piece]]:
        if self.spec.kind == "folder":
            ids = self.file_ids[rng.permutation(len(self.file_ids))]
            return [[self._files_piece(ids[i:i + FOLDER_WINDOW_FILES])]
                    for i in range(0, len(ids), FOLDER_WINDOW_FILES)]
        order = rng.permutation(len(self.pieces))
        out: list[list[Piece]] = []
        cur: list[Piece] = []
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
    bname = "bytes" if "bytes" in names else next(f.name for f in col.type if is_binary(f.type))
    data = pc.struct_field(col, names.index(bname))
    path = pc.struct_field(col, names.index("path")) if "path" in names else None
    return data, path


def labels_from(table: pa.Table, spec: ReadSpec) -> np.ndarray:
    if not spec.has_labels or spec.label_column not in table.column_names:
        return np.full(table.num_rows, -1, dtype=np.int64)
    col = table.column(spec.label_column)
    if spec.label_values is not None:
        idx = pc.index_in(col.cast(pa.string()), value_set=pa.array(spec.label_values, pa.string()))
        return np.asarray(pc.fill_null(idx, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
    col = pc.fill_null(col.cast(pa.int64()), -1)
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.int64)


def _read_piece(spec: ReadSpec, piece: Piece) -> pa.Table:
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
                "label": pa.array(labels_from(table, spec)),
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


def read_pieces(spec: ReadSpec, pieces: Sequence[Piece]) -> pa.Table:
    tables = [_read_piece(spec, p) for p in pieces]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def read_window(spec: ReadSpec, pieces: list[Piece], perm_seed: tuple[int, ...]) -> Iterator[pa.Table]:
    table = read_pieces(spec, pieces)
    perm = np.random.default_rng(list(perm_seed)).permutation(table.num_rows)
    yield table.take(pa.array(perm))


def plan_for(cfg, split: str | None = None) -> tuple[Source, RowIndex, ReadPlan]:
    src = resolve_for_split(cfg, split or cfg.split)
    index = build_index(src)
    selected = None if cfg.limit is None else subset_indices(index.total_rows, cfg.limit, cfg.seed)
    return src, index, ReadPlan.build(index, selected)
