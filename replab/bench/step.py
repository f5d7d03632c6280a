"""``bench --only step``: SimCLR ResNet-18 (CIFAR stem, 32 px) through :func:`train_worker` + :class:`LocalEnv`
(and, with ``ray``, through :func:`replab.platform.train.ray_train.fit` on Ray Train, tracking off): images/s
(``train/epoch_images_per_sec`` of the last epoch) and peak memory.
"""

from __future__ import annotations

import resource
import tempfile
import time
from typing import Any, Callable

import torch

from replab.bench.common import PeakRSS, interleaved, mib, ratio


def step_overrides(quick: bool, batch: int | None = None, steps: int | None = None) -> list[str]:
    """SimCLR ResNet-18 CIFAR stem at 32 px; --quick shrinks the width and batch so it fits a CI budget."""
    batch = batch or (32 if quick else 256)
    steps = steps or (2 if quick else 3)
    ov = ["method.name=simclr", "model.backbone=resnet18", "model.cifar_stem=on", "data.dataset=cifar10",
          "data.resolution=32", f"train.batch_size={batch}", "train.epochs=2", f"train.steps_per_epoch={steps}",
          "train.warmup_epochs=0", "train.log_every=1000000", "train.checkpoint_every=0", "eval.knn=false",
          "eval.linear=false", "eval.before_training=false", "tracking.enabled=false"]
    if quick:
        ov += ["model.width=0.25", "method.proj_hidden_dim=128", "method.proj_dim=64"]
    return ov


def direct_run(overrides: list[str], images, labels, device) -> tuple[float, int]:
    """One train_worker run (2 epochs; the last epoch's images/s) and its peak memory in bytes."""
    from replab.platform.train.loop import LocalEnv, train_worker
    from replab.validate import load_config

    cfg = load_config(None, overrides)
    with tempfile.TemporaryDirectory(prefix="replab-bench-ckpt-") as tmp:
        env = LocalEnv(images, labels, tmp, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as mem:
            res = train_worker(cfg, env, len(images))
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else mem.delta
    return res.history[-1]["train/epoch_images_per_sec"], peak


def _ray_run(overrides: list[str], root: str, n: int, use_gpu: bool) -> tuple[float, int]:
    from replab.platform.train.ray_train import fit
    from replab.validate import load_config

    with tempfile.TemporaryDirectory(prefix="replab-bench-ray-") as tmp:
        cfg = load_config(None, overrides + [f"data.root={root}", f"data.limit={n}", f"train.storage_path={tmp}",
                                             f"train.use_gpu={str(use_gpu).lower()}", "data.cache=on",
                                             "train.name=bench-ray-" + str(time.time_ns())])
        with PeakRSS(match="RayTrainWorker") as mem:
            result = fit(cfg)
    return result.metrics["train/epoch_images_per_sec"], mem.peak


def bench_step(root: str, quick: bool, use_ray: bool, device: torch.device, repeats: int,
               steps: int | None = None) -> dict[str, Any]:
    from replab.platform.data.arrays import load_arrays

    ov = step_overrides(quick, steps=steps)
    batch = int(next(o for o in ov if o.startswith("train.batch_size=")).split("=")[1])
    steps = int(next(o for o in ov if o.startswith("train.steps_per_epoch=")).split("=")[1])
    n = batch * steps
    images, labels = load_arrays("cifar10", root, "train", 32, limit=n, seed=0)
    mem_kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS growth (psutil, 50 ms)"
    cases: dict[str, Callable[[], float]] = {}
    peaks: dict[str, list[int]] = {"direct": [], "ray_train": []}

    def direct():
        rate, peak = direct_run(ov, images, labels, device)
        peaks["direct"].append(peak)
        return rate

    cases["direct"] = direct
    if use_ray:
        def on_ray():
            rate, peak = _ray_run(ov, root, n, device.type == "cuda")
            peaks["ray_train"].append(peak)
            return rate

        cases["ray_train"] = on_ray
    rates = interleaved(cases, repeats)
    out: dict[str, Any] = {
        "config": ov, "device": str(device), "processes": 1, "images_per_sec": rates,
        "metric": "train/epoch_images_per_sec of epoch 2 (epoch 1 is warm-up)",
        "peak_memory_mib": {k: mib(max(v)) for k, v in peaks.items() if v}, "peak_memory_kind": mem_kind,
        "process_maxrss_mib": mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
    }
    if use_ray:
        out["ratio_ray_over_direct"] = ratio(rates["ray_train"]["median"], rates["direct"]["median"])
        out["peak_memory_kind_ray"] = "sum of RSS of RayTrainWorker processes (peak, psutil)"
    else:
        out["ray_train"] = "skipped (--quick without --only ...,ray, or 'ray' not in --only)"
    return out
