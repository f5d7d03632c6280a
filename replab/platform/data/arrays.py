"""A source decoded to numpy arrays without Ray (:func:`load_arrays`), for evaluation, tests, benchmarks and the
training data a sweep shares between its trials (:func:`load_rows`, :class:`DecodedRows`), with an on-disk cache of
decoded arrays keyed by what defines them.

Skipped images fill ``stats={"skipped": n, "reasons": {...}, "examples": [...], "skipped_rows": [row ids],
"rows": selected rows, "total_rows": rows of the split}``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from replab.platform.data import decode as _decode
from replab.platform.data.indexes import build_index, subset_indices
from replab.platform.data.plan import Piece, ReadPlan, read_pieces
from replab.platform.data.skips import SkipCounter
from replab.platform.data.sources import resolve, resolve_for_split

log = logging.getLogger(__name__)




ARRAY_CACHE_MAX_BYTES = 2 << 30


def _cache_dir() -> str:
    return os.environ.get("REPLAB_CACHE_DIR") or str(Path("~/.cache/replab").expanduser())


def _array_cache_enabled(cache: bool | None) -> bool:
    if cache is not None:
        return cache
    return os.environ.get("REPLAB_ARRAY_CACHE", "1").lower() not in ("0", "false", "no", "off")


def decode_pieces(plan: ReadPlan, resolution: int, num_threads: int | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read + decode every piece of ``plan`` in row-id order (threads: Pillow releases the GIL)."""
    n = plan.num_rows
    images = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    reasons: Counter = Counter()
    examples: list[tuple[str, str]] = []
    skipped_rows: list[int] = []
    # Jobs: (output offset, pieces), ~decode_batch rows each, so threads share work evenly.
    jobs: list[tuple[int, list[Piece]]] = []
    offset, cur, cur_rows = 0, [], 0
    for piece in plan.pieces:
        cur.append(piece)
        cur_rows += piece.count
        if cur_rows >= 256:
            jobs.append((offset, cur))
            offset, cur, cur_rows = offset + cur_rows, [], 0
    if cur:
        jobs.append((offset, cur))

    def run(job: tuple[int, list[Piece]]):
        start, pieces = job
        table = read_pieces(plan.spec, pieces)
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
                row_ids = table.column("row").to_numpy()
                for i in np.flatnonzero(~mask):
                    skipped_rows.append(int(row_ids[i]))
                    reasons[_decode.category(why[i])] += 1
                    if len(examples) < SkipCounter.MAX_EXAMPLES:
                        examples.append((names[i], why[i]))
    skipped = int(n - ok.sum())
    if skipped:
        images, labels = images[ok], labels[ok]
    return images, labels, {"skipped": skipped, "reasons": dict(reasons), "examples": examples,
                            "skipped_rows": sorted(skipped_rows)}


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
    ``resolution`` defaults to 32. ``limit`` keeps the same nested seeded subset as training
    (:func:`~replab.platform.data.indexes.subset_indices`). Skipped images are left out; ``stats`` (a dict,
    filled in) gets ``skipped``, ``reasons``, ``examples``, ``skipped_rows`` (their row ids), ``rows`` (selected,
    skipped ones included) and ``total_rows`` (of the split). Decoded arrays up to 2 GiB are cached under
    ``$REPLAB_CACHE_DIR`` (default ``~/.cache/replab``)/arrays keyed by the files (size, mtime), split,
    resolution, limit and seed; ``cache=False`` or ``REPLAB_ARRAY_CACHE=0`` turns that off.
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
        src = resolve_for_split(cfg, split)
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
                if "total_rows" not in result_stats or "skipped_rows" not in result_stats:
                    raise ValueError("an array cache written before row ids were kept")  # decoded again below
                result_stats["cached"] = True
                if stats is not None:
                    stats.clear()
                    stats.update(result_stats)
                return images, labels
            except (OSError, ValueError, json.JSONDecodeError):
                shutil.rmtree(key_path, ignore_errors=True)
    index = build_index(src)
    selected = None if limit is None else subset_indices(index.total_rows, limit, seed)
    plan = ReadPlan.build(index, selected)
    images, labels, result_stats = decode_pieces(plan, int(resolution), num_threads)
    result_stats["rows"] = plan.num_rows
    result_stats["total_rows"] = index.total_rows
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


@dataclass
class DecodedRows:
    """A split decoded at one ``data.limit`` (:func:`load_rows`), placed among the split's rows so that a smaller
    nested limit can be taken out of it (:meth:`nested`) instead of decoded again.

    Shaped for the training loop like :class:`~replab.platform.data.pipeline.TrainData`: ``num_rows`` (selected
    rows, skipped ones included) and ``skipped()``."""

    images: np.ndarray
    """uint8 [n, R, R, 3], in row-id order, skipped rows left out."""
    labels: np.ndarray
    total_rows: int
    """Rows of the split before ``limit``."""
    limit: int | None
    seed: int
    skipped_rows: np.ndarray
    """Row ids of the selected rows that did not decode (sorted)."""

    @property
    def num_rows(self) -> int:
        return self.total_rows if self.limit is None else min(int(self.limit), self.total_rows)

    def skipped(self) -> int:
        return len(self.skipped_rows)

    def covers(self, limit: int | None) -> bool:
        """True when every row that ``limit`` selects (same split and seed) is in this decode."""
        return self.num_rows == self.total_rows or (limit is not None and limit <= self.num_rows)

    def row_ids(self) -> np.ndarray:
        """The row id of each image (sorted)."""
        selected = subset_indices(self.total_rows, self.limit, self.seed)
        return np.setdiff1d(selected, self.skipped_rows, assume_unique=True)

    def nested(self, limit: int | None) -> DecodedRows:
        """The rows ``data.limit=limit`` selects, taken out of this decode by row id: the same images, labels and
        skipped rows as :func:`load_arrays` at ``limit`` (:func:`subset_indices` subsets are nested: the first
        ``limit`` of one seeded permutation). Returns ``self`` when they are all of it (no copy); raises
        ValueError when ``limit`` selects rows outside this decode."""
        if not self.covers(limit):
            raise ValueError(f"limit {limit} is not inside a decode of {self.num_rows} of {self.total_rows} rows")
        if limit is None or min(int(limit), self.total_rows) == self.num_rows:
            return self
        wanted = subset_indices(self.total_rows, limit, self.seed)
        skipped = np.intersect1d(wanted, self.skipped_rows, assume_unique=True)
        have = self.row_ids()
        where = np.searchsorted(have, np.setdiff1d(wanted, skipped, assume_unique=True))
        return DecodedRows(self.images[where], self.labels[where], self.total_rows, int(limit), self.seed, skipped)


def load_rows(data, limit: int | None, **kwargs) -> DecodedRows:
    """:func:`load_arrays` of the DataConfig ``data`` (its dataset, root, split, resolution, columns and seed) at
    ``limit`` instead of ``data.limit`` (None: every row), as :class:`DecodedRows`. ``kwargs`` go to
    :func:`load_arrays` (``cache``, ``num_threads``)."""
    stats: dict = {}
    images, labels = load_arrays(dataclasses.replace(data, limit=limit), split=data.split, stats=stats, **kwargs)
    return DecodedRows(images, labels, int(stats["total_rows"]), limit, int(data.seed),
                       np.asarray(stats["skipped_rows"], dtype=np.int64))


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
