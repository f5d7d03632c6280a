"""The training stream on Ray Data: a source -> a shuffled, decoded ``ray.data.Dataset`` (:func:`build_train_dataset`).

A custom datasource plans the read per execution (:mod:`replab.platform.data.plan`): every epoch's
``iter_torch_batches`` draws a new permutation of pieces and windows; then ``repartition`` cuts the stream
into ``decode_batch_size`` blocks and ``map_batches`` decodes them in parallel CPU tasks (uint8 ``[R, R, 3]``
``image`` + int64 ``label``). Large corpora are streamed (memory bounded by the windows in flight) and
additionally mixed by the trainer-side local shuffle buffer (``TrainData.shuffle_buffer``).

``data.cache``: ``on``, or ``auto`` when the decoded corpus is under 25% of the object store, decodes once and
``materialize()`` s; every epoch then draws a new block order (``randomize_block_order``, seeded per
execution) and the trainer-side shuffle buffer mixes rows across blocks, so the first batch comes without
waiting for an all-to-all shuffle.
"""

from __future__ import annotations

import functools
import logging
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from replab.platform.data import decode as _decode
from replab.platform.data.datasets import DataError
from replab.platform.data.plan import ENCODED_SCHEMA, WINDOW_BYTES, ReadPlan, plan_for, read_window
from replab.platform.data.skips import skip_actor, skipped_count, skipped_summary

log = logging.getLogger(__name__)




CACHE_FRACTION = 0.25


def decode_udf(batch: pa.Table, resolution: int, counter: Any = None) -> dict[str, np.ndarray]:
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


@functools.lru_cache(maxsize=None)
def datasource_class():
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ImageWindowDatasource(Datasource):
        """Encoded rows in per-execution shuffle windows (see the module docstring)."""

        def __init__(self, plan: ReadPlan, seed: int, window_bytes: int):
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
                fn = functools.partial(read_window, self._plan.spec, pieces, (self._seed, execution, w))
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


def ingest_options(deterministic: bool):
    """Ray Train's ingest ``ExecutionOptions``: Ray's defaults, with ``preserve_order`` when ``deterministic``
    (without it, blocks reach the trainer in task-completion order, which changes from run to run)."""
    from ray.train import DataConfig

    with warnings.catch_warnings():  # Ray's own defaults set a field Ray deprecates: not the user's to act on
        warnings.filterwarnings("ignore", message=".*exclude_resources")
        options = DataConfig.default_ingest_options()
    options.preserve_order = bool(deterministic) or options.preserve_order
    return options


def torch_batches(dataset, batch_size: int, *, shuffle_buffer: int | None, shuffle_seed: int | None = None,
                  epoch: int = 0, rank: int = 0, pin_memory: bool = False):
    """One epoch of ``dataset`` (a Ray Dataset or a Ray Train shard) as torch batches for the training loop:
    full batches only, mixed by a trainer-side shuffle buffer of at least two batches (Ray 2.60 yields short
    batches mid-epoch when the buffer is under two). ``shuffle_seed`` (``train.deterministic``) seeds the buffer
    per (epoch, rank); None leaves it unseeded."""
    seed = None if shuffle_seed is None or not shuffle_buffer else shuffle_seed * 1_000_003 + epoch * 1009 + rank
    yield from dataset.iter_torch_batches(
        batch_size=batch_size, drop_last=True,
        local_shuffle_buffer_size=max(shuffle_buffer, 2 * batch_size) if shuffle_buffer else None,
        local_shuffle_seed=seed, prefetch_batches=2, pin_memory=pin_memory,
    )


def build_train_dataset(cfg, *, window_bytes: int | None = None, deterministic: bool = False) -> TrainData:
    """The training ``ray.data.Dataset`` for ``cfg`` (a :class:`replab.config.DataConfig`).

    Streams by default; caches decoded images in the object store when ``cfg.cache`` is ``on``, or
    ``auto`` and they take less than a quarter of it. See the module docstring for shuffling and skips.
    ``deterministic``: the blocks keep their planned order through repartition, decode and the cache
    (``preserve_order``), so one seed gives one row order (the ingest side: ``DataConfig(execution_options=
    ingest_options(True))``). Raises :class:`DataError` (before any Ray work) when the data cannot be found.
    Typical use::

        td = build_train_dataset(cfg.data)
        TorchTrainer(..., datasets={"train": td.dataset},
                     dataset_config=ray.train.DataConfig(datasets_to_split=["train"]))
        # in each worker (per-worker batch b):
        shard.iter_torch_batches(batch_size=b, drop_last=True,
                                 local_shuffle_buffer_size=td.local_shuffle_buffer(b))
        metrics["data/skipped"] = skipped_count(td.counter_name)   # or td.skipped()
    """
    import ray

    src, index, plan = plan_for(cfg)
    if plan.num_rows == 0:
        raise DataError(f"{src.uri}: no rows to train on (split {src.split!r}, limit {cfg.limit})")
    if not ray.is_initialized():
        ray.init()
    counter_name = f"replab-skips-{uuid.uuid4().hex[:12]}"
    counter = skip_actor(counter_name, create=True)
    ds = ray.data.read_datasource(
        datasource_class()(plan, cfg.seed, window_bytes or WINDOW_BYTES),
        override_num_blocks=max(1, len(plan.pieces)),
    )
    if deterministic:
        ds.context.execution_options.preserve_order = True
    ds = ds.repartition(target_num_rows_per_block=max(1, int(cfg.decode_batch_size)))
    ds = ds.map_batches(
        decode_udf,
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
