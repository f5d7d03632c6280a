"""What every benchmark section shares: the machine's name and cores, interleaved timing of compared cases
(A, B, A, B, ... in one process; medians of the repeats, ratios of medians), samplers of peak memory, and
the encoded images the sections read.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(cases: dict[str, Callable[[], float]], repeats: int) -> dict[str, dict[str, Any]]:
    """Run each case ``repeats`` times in the order A, B, A, B, ...; each call returns a rate (items/s)."""
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            runs[name].append(float(fn()))
    return {name: {"median": statistics.median(v), "runs": [round(x, 3) for x in v]} for name, v in runs.items()}


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


class Sampler:
    """Calls :meth:`tick` every ``interval`` seconds in a daemon thread while its ``with`` block runs
    (``tick`` returning False stops the sampling early)."""

    def __init__(self, interval: float):
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> bool | None:
        raise NotImplementedError

    def _loop(self):
        while not self._stop.wait(self.interval):
            if self.tick() is False:
                return

    def __enter__(self):
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class PeakRSS(Sampler):
    """Peak resident memory (bytes) over a block, sampled every 50 ms; of this process, or of the processes
    whose command line contains ``match`` (Ray workers). ``delta`` subtracts the level at entry."""

    def __init__(self, match: str | None = None, interval: float = 0.05):
        super().__init__(interval)
        self.match = match
        self.peak = self.start = 0

    def _sample(self) -> int:
        import psutil

        if self.match is None:
            return psutil.Process().memory_info().rss
        total = 0
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(self.match in part for part in (p.info["cmdline"] or [])):
                    total += p.memory_info().rss
            except (psutil.Error, OSError):
                continue
        return total

    def tick(self):
        self.peak = max(self.peak, self._sample())

    def __enter__(self):
        self.start = self._sample() if self.match is None else 0
        self.peak = self.start
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.tick()

    @property
    def delta(self) -> int:
        return self.peak - self.start


def mib(n: float) -> float:
    return round(n / 2**20, 1)


def bench_data_root(root: str = "") -> str:
    from replab.platform.data.datasets import data_root

    return data_root(root)


def encoded_images(dataset: str, root: str, n: int) -> tuple[list[bytes], np.ndarray]:
    """The first ``n`` encoded images (bytes) and labels of ``dataset``'s train parquet shards."""
    import pyarrow.parquet as pq

    files = sorted(Path(root, dataset).glob("train-*.parquet"))
    out, labels = [], []
    for f in files:
        pf = pq.ParquetFile(f)
        for g in range(pf.metadata.num_row_groups):
            t = pf.read_row_group(g, columns=["image", "label"])
            col = t.column("image").combine_chunks()
            out.extend(col.field("bytes").to_pylist())
            labels.extend(t.column("label").to_pylist())
            if len(out) >= n:
                return out[:n], np.asarray(labels[:n], dtype=np.int64)
    return out, np.asarray(labels, dtype=np.int64)


def write_image_folder(dataset: str, root: str, n: int, folder: str | os.PathLike) -> Path:
    """A class-per-subfolder image folder of ``n`` JPEGs (the parquet bytes, written as they are)."""
    items, labels = encoded_images(dataset, root, n)
    base = Path(folder)
    for i, (data, label) in enumerate(zip(items, labels)):
        d = base / f"class_{int(label):03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.jpg").write_bytes(data)
    return base
