"""``bench --only epoch``: on CUDA only: whole CIFAR-10 epochs of SimCLR ResNet-18 at batch 512 through the
direct loop (eager and compiled): seconds per epoch and the GPU's busy % over the timed epoch (NVML).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any, Callable

import torch

from replab.bench.common import Sampler
from replab.bench.step import step_overrides


class BusySampler(Sampler):
    """GPU busy percentage (NVML's utilization.gpu: the share of each sample period in which a kernel ran),
    sampled every ``interval`` s with timestamps, so a caller can keep the samples of one time window."""

    def __init__(self, device: torch.device, interval: float = 0.1):
        super().__init__(interval)
        self.device = device
        self.samples: list[tuple[float, int]] = []
        self.error: str | None = None

    def tick(self):
        try:
            self.samples.append((time.perf_counter(), int(torch.cuda.utilization(self.device))))
        except Exception as e:  # no NVML (pynvml missing): say so instead of a number
            self.error = f"{type(e).__name__}: {e}"
            return False

    def __enter__(self):
        if self.device.type != "cuda":
            self.error = "not a CUDA device"
            return self
        return super().__enter__()

    def mean_between(self, start: float, stop: float) -> float | None:
        window = [u for t, u in self.samples if start <= t <= stop]
        return round(statistics.mean(window), 1) if window else None


def bench_epoch(root: str, quick: bool, device: torch.device, overrides: list[str] | None = None,
                limit: int | None = None, on_update: Callable[[dict[str, Any]], None] | None = None
                ) -> dict[str, Any]:
    """Whole epochs of SimCLR ResNet-18 (CIFAR stem, batch 512, 2 views of 32 px) on CIFAR-10 through
    :func:`train_worker` + :class:`LocalEnv` (decoded uint8 in memory, pinned prefetch): seconds of the
    second epoch (the first warms up cuDNN and, with compile, compiles) and the GPU's mean busy % over it,
    eager and compiled. The issue's targets: <= 5 s per 50,000-image epoch, > 90 % busy, on an H200."""
    from replab.platform.data.arrays import load_arrays
    from replab.platform.train.loop import LocalEnv, train_worker
    from replab.validate import load_config

    if device.type != "cuda" and limit is None:
        return {"skipped": "needs a GPU (a CPU epoch of CIFAR-10 takes many minutes); pass limit= to smoke-test"}
    t = time.perf_counter()
    images, labels = load_arrays("cifar10", root, "train", 32, limit=limit or (10240 if quick else None), seed=0)
    load_s = time.perf_counter() - t
    base = overrides or step_overrides(False, batch=512)
    base = [o for o in base if not o.startswith("train.steps_per_epoch=")]
    out: dict[str, Any] = {"images": len(images), "decode_s": round(load_s, 1), "config": base,
                           "target": "epoch_time_s <= 5 and gpu_busy_percent > 90 (H200, 50,000 images)"}

    class TimedEnv(LocalEnv):
        """Notes when each epoch's report returns: the next epoch's clock starts right after it."""

        reported_at: list[float]

        def report(self, metrics, checkpoint_dir):
            super().report(metrics, checkpoint_dir)
            self.reported_at.append(time.perf_counter())

    for name, extra in (("eager", ["train.compile=false"]), ("compiled", ["train.compile=true"])):
        cfg = load_config(None, base + extra + ["train.epochs=2"])
        if cfg.train.compile:
            torch._dynamo.reset()
        with tempfile.TemporaryDirectory(prefix="replab-bench-epoch-") as tmp:
            env = TimedEnv(images, labels, tmp, device)
            env.reported_at = []
            with BusySampler(device) as busy:
                res = train_worker(cfg, env, len(images))
        epoch = res.history[-1]
        # epoch 2 runs from epoch 1's report to epoch_time_s later (its own report comes after the final
        # checkpoint is written, GPU idle, so it is not the window's end)
        start = env.reported_at[-2]
        stop = start + epoch["train/epoch_time_s"]
        out[name] = {"epoch_time_s": round(epoch["train/epoch_time_s"], 2),
                     "images_per_sec": round(epoch["train/epoch_images_per_sec"], 1),
                     "first_epoch_time_s": round(res.history[0]["train/epoch_time_s"], 2),
                     "gpu_busy_percent": busy.mean_between(start, stop), "busy_error": busy.error,
                     "epoch_time_s_at_50000": round(50000 / epoch["train/epoch_images_per_sec"], 2)}
        if on_update:
            on_update(out)
    return out
