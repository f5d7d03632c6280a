"""Unlabeled pools (:func:`pool_manifest`, :func:`build_unlabeled_dataset`, :func:`load_unlabeled_arrays`).

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

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from replab.config import ConfigError
from replab.platform.data import arrays, indexes, pipeline, plan, skips
from replab.platform.data.labeled import (
    LabeledSplit,
    _source,
    is_semisupervised,
    labeled_split,
    load_rows,
    row_labels,
    validate,
)


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
            rows = indexes.subset_indices(len(labels), data.limit, data.seed)
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
            imgs, labs = arrays.load_arrays(s.dataset, data.root, s.split, res, image_column=data.image_column,
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
    out = pipeline.decode_udf(batch, resolution, counter)
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
    counter = skips.skip_actor(counter_name, create=True)
    parts = []
    num_rows = 0
    for i, s in enumerate(sources):
        src = _source(s.dataset, data.root, s.split, data.image_column, data.label_column)
        index = indexes.build_index(src)
        selected = None if len(s.rows) == index.total_rows else s.rows
        read_plan = plan.ReadPlan.build(index, selected)
        num_rows += read_plan.num_rows
        ds = ray.data.read_datasource(
            pipeline.datasource_class()(read_plan, int(data.seed) * 1000 + i, window_bytes or plan.WINDOW_BYTES),
            override_num_blocks=max(1, len(read_plan.pieces)),
        )
        ds = ds.repartition(target_num_rows_per_block=max(1, int(data.decode_batch_size)))
        ds = ds.map_batches(_decode_unlabeled, batch_size=max(1, int(data.decode_batch_size)),
                            batch_format="pyarrow", fn_kwargs={"resolution": int(data.resolution), "counter": counter})
        parts.append(ds)
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    cached = pipeline.should_cache(data.cache, num_rows, int(data.resolution))
    if len(parts) > 1 and not cached:  # interleave the sources' blocks (epoch_stream does it when cached)
        ds = ds.randomize_block_order(seed=int(data.seed))
    ds, buffer = pipeline.epoch_stream(ds, cached=cached, seed=int(data.seed), shuffle_buffer=data.shuffle_buffer)
    known = None
    if is_semisupervised(data):
        known = labeled_split(data).known_classes
    return pipeline.TrainData(
        dataset=ds, num_rows=num_rows, shuffle_buffer=buffer, counter_name=counter_name, cached=cached,
        source=" + ".join(s.description for s in sources), num_classes=len(known) if known else None,
        class_names=None, resolution=int(data.resolution),
    )
