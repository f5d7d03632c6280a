"""``replab bench``: throughput of every stage, compared side by side in one run.

Sections (``--only`` picks some; ``ray`` adds the Ray halves of ``data`` and ``step``):

- ``data``: decoded images/s per CPU core from parquet shards (cifar10, imagenette128) and from a temporary
  image folder of JPEGs written from the same parquet bytes; single-threaded :mod:`replab.platform.decode`
  through :func:`replab.platform.data.load_arrays` (``num_threads=1``), and through Ray Data
  (:func:`replab.platform.data.build_train_dataset`) when ``ray`` is selected.
- ``augment``: batched per-sample views on the trainer's device (:func:`make_views`) against the torchvision
  per-image pipeline (``transforms.v2`` on PIL images in a ``DataLoader`` with one worker per core), for a
  SimCLR view pair at 32 px (cifar10) and a DINO multi-crop set on imagenette128 (2 globals of 128 px +
  6 locals of 48 px), same images, images/s and the ratio.
- ``step``: SimCLR ResNet-18 (CIFAR stem, 32 px) through :func:`train_worker` + :class:`LocalEnv` (and, with
  ``ray``, through :func:`replab.platform.train.fit` on Ray Train, tracking off): images/s
  (``train/epoch_images_per_sec`` of the last epoch) and peak memory.
- ``peer``: replab's SimCLR loop against the same configuration written as lightly's SimCLR example
  (per-image transforms in DataLoader workers + the same ResNet-18 CIFAR-stem model + NT-Xent). Uses the
  real ``lightly`` transforms and loss when importable, else a torchvision re-creation of them.
- ``gpu``: on CUDA only: MFU (FlopCounterMode FLOPs of one step over the measured bf16 matmul rate) and
  images/s for ResNet-18@32, ResNet-50@224, ViT-S/16@224 (MAE, DINO) and ViT-B/16@224 (MAE) with bf16 /
  channels_last / fused optimizer each switched off in turn, all off, and compiled.
- ``epoch``: on CUDA only: whole CIFAR-10 epochs of SimCLR ResNet-18 at batch 512 through the direct loop
  (eager and compiled): seconds per epoch and the GPU's busy % over the timed epoch (NVML).

Compared configurations are always measured interleaved (A, B, A, B, ...) in the same process, and medians
of the repeats are reported; ratios are of medians.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

SECTIONS = ("data", "augment", "step", "peer", "gpu", "epoch", "ray")


# ================================================================================================ helpers


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


def _mib(n: float) -> float:
    return round(n / 2**20, 1)


def _data_root(root: str = "") -> str:
    from replab.platform.datasets import data_root

    return data_root(root)


def _encoded(dataset: str, root: str, n: int) -> tuple[list[bytes], np.ndarray]:
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
    items, labels = _encoded(dataset, root, n)
    base = Path(folder)
    for i, (data, label) in enumerate(zip(items, labels)):
        d = base / f"class_{int(label):03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.jpg").write_bytes(data)
    return base


# ================================================================================================ data


def bench_data(root: str, quick: bool, use_ray: bool, repeats: int) -> dict[str, Any]:
    """Decoded images/s per core: raw decode, parquet -> arrays, image folder -> arrays (, Ray Data)."""
    from replab.platform.data import load_arrays
    from replab.platform.decode import decode_batch

    sets = {"cifar10": (32, 256 if quick else 2048), "imagenette128": (128, 64 if quick else 512)}
    result: dict[str, Any] = {"cores": cores(), "note": "single-threaded rates are per core"}
    with tempfile.TemporaryDirectory(prefix="replab-bench-") as tmp:
        for name, (res, n) in sets.items():
            items, _ = _encoded(name, root, n)
            folder = write_image_folder(name, root, n, Path(tmp) / name)

            def raw():
                t = time.perf_counter()
                images, ok, _ = decode_batch(items, res)
                return len(images) / (time.perf_counter() - t)

            def parquet():
                t = time.perf_counter()
                images, _ = load_arrays(name, root, "train", res, limit=n, cache=False, num_threads=1)
                return len(images) / (time.perf_counter() - t)

            def image_folder():
                t = time.perf_counter()
                images, _ = load_arrays(str(folder), "", "train", res, cache=False, num_threads=1)
                return len(images) / (time.perf_counter() - t)

            cases = {"decode_only": raw, "parquet_load_arrays": parquet, "image_folder_load_arrays": image_folder}
            rates = interleaved(cases, repeats)
            entry: dict[str, Any] = {"resolution": res, "images": n, "images_per_sec_per_core": rates}
            if use_ray:
                entry["ray_data"] = _ray_data_rate(name, root, res, n)
            result[name] = entry
    return result


def _ray_data_rate(dataset: str, root: str, res: int, n: int) -> dict[str, Any]:
    """Images/s through the training Ray Data pipeline (read + decode map_batches), streamed (no cache)."""
    from replab.config import load_config
    from replab.platform import data as data_lib
    from replab.platform.train import ensure_ray

    ensure_ray(0)
    import ray

    cpus = int(ray.available_resources().get("CPU", 1))
    cfg = load_config(None, [f"data.dataset={dataset}", f"data.root={root}", f"data.resolution={res}",
                             f"data.limit={n}", "data.cache=off"]).data
    rates = []
    for _ in range(2):  # the first pass includes Ray Data's start-up; report the second
        t = time.perf_counter()
        train = data_lib.build_train_dataset(cfg)
        rows = sum(len(b["label"]) for b in train.dataset.iter_batches(batch_size=256, batch_format="numpy"))
        rates.append(rows / (time.perf_counter() - t))
    used = min(cpus, cores())
    return {"images_per_sec": round(rates[-1], 1), "first_pass_images_per_sec": round(rates[0], 1),
            "cpus": used, "images_per_sec_per_core": round(rates[-1] / used, 1)}


# ================================================================================================ augment


def torchvision_transform(spec):
    """The torchvision ``transforms.v2`` per-image pipeline equivalent to one :class:`ViewSpec`."""
    from torchvision.transforms import v2

    from replab.platform.augment import IMAGENET_MEAN, IMAGENET_STD

    ops: list[Any] = [v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, antialias=True)]
    if spec.flip_p > 0:
        ops.append(v2.RandomHorizontalFlip(spec.flip_p))
    if spec.jitter_p > 0:
        ops.append(v2.RandomApply([v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)],
                                  p=spec.jitter_p))
    if spec.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(spec.grayscale_p))
    if spec.blur_p > 0:
        k = max(3, int(0.1 * spec.size) // 2 * 2 + 1)
        sigma = tuple(s * spec.size / 224 for s in spec.blur_sigma)
        ops.append(v2.RandomApply([v2.GaussianBlur(k, sigma=sigma)], p=spec.blur_p))
    if spec.solarize_p > 0:
        ops.append(v2.RandomSolarize(128, p=spec.solarize_p))
    ops += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)]
    if spec.normalize:
        ops.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return v2.Compose(ops)


class PILViews(torch.utils.data.Dataset):
    """Decoded uint8 images served as PIL images through per-image transforms (one per view)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transforms: list[Callable] | Callable,
                 multi: bool = False):
        self.images, self.labels, self.transforms, self.multi = images, labels, transforms, multi

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        im = Image.fromarray(self.images[i])
        views = self.transforms(im) if self.multi else [t(im) for t in self.transforms]
        return views, int(self.labels[i])


def _loader(dataset, batch_size: int, workers: int, drop_last: bool = True):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=drop_last,
        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        multiprocessing_context="fork" if workers > 0 and os.name == "posix" else None,
    )


def bench_augment(root: str, quick: bool, device: torch.device, repeats: int) -> dict[str, Any]:
    from replab.methods.dino import dino_views
    from replab.methods.simclr import simclr_view
    from replab.platform.augment import make_views
    from replab.platform.data import load_arrays

    workers = cores()
    setups = {
        "simclr_pair_32px": ("cifar10", 32, [simclr_view(32)] * 2, 256 if quick else 2048, 256),
        "dino_multicrop_128px_2x128_6x48": (
            "imagenette128", 128,
            [dino_views(128, 0)[0], dino_views(128, 0)[1]]
            + [dataclasses.replace(dino_views(128, 1)[2], size=48)] * 6,
            32 if quick else 256, 32 if quick else 64),
    }
    result: dict[str, Any] = {"device": str(device), "dataloader_workers": workers,
                              "note": "images/s = source images per second (all of their views)"}
    for name, (dataset, res, specs, n, batch) in setups.items():
        images, labels = load_arrays(dataset, root, "train", res, limit=n, seed=0)
        gpu_images = torch.from_numpy(images).to(device)
        loader = _loader(PILViews(images, labels, [torchvision_transform(s) for s in specs]), batch, workers)
        for _ in loader:  # start the persistent workers outside the timed passes
            break

        def batched():
            sync(device)
            t = time.perf_counter()
            for start in range(0, n - batch + 1, batch):
                views = make_views(gpu_images[start:start + batch], specs)
            sync(device)
            assert len(views) == len(specs)
            return (n // batch) * batch / (time.perf_counter() - t)

        def per_image():
            t = time.perf_counter()
            count = 0
            for views, _ in loader:
                views = [v.to(device, non_blocking=True) for v in views]
                count += views[0].shape[0]
            sync(device)
            return count / (time.perf_counter() - t)

        rates = interleaved({"replab_make_views": batched, "torchvision_dataloader": per_image}, repeats)
        del loader
        result[name] = {
            "dataset": dataset, "images": n, "batch": batch, "views": [s.size for s in specs],
            "images_per_sec": rates,
            "ratio_replab_over_torchvision": ratio(rates["replab_make_views"]["median"],
                                                   rates["torchvision_dataloader"]["median"]),
        }
    return result


# ================================================================================================ step


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


def _direct_run(overrides: list[str], images, labels, device) -> tuple[float, int]:
    """One train_worker run (2 epochs; the last epoch's images/s) and its peak memory in bytes."""
    from replab.config import load_config
    from replab.platform.loop import LocalEnv, train_worker

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
    from replab.config import load_config
    from replab.platform.train import fit

    with tempfile.TemporaryDirectory(prefix="replab-bench-ray-") as tmp:
        cfg = load_config(None, overrides + [f"data.root={root}", f"data.limit={n}", f"train.storage_path={tmp}",
                                             f"train.use_gpu={str(use_gpu).lower()}", "data.cache=on",
                                             "train.name=bench-ray-" + str(time.time_ns())])
        with PeakRSS(match="RayTrainWorker") as mem:
            result = fit(cfg)
    return result.metrics["train/epoch_images_per_sec"], mem.peak


def bench_step(root: str, quick: bool, use_ray: bool, device: torch.device, repeats: int,
               steps: int | None = None) -> dict[str, Any]:
    from replab.platform.data import load_arrays

    ov = step_overrides(quick, steps=steps)
    batch = int(next(o for o in ov if o.startswith("train.batch_size=")).split("=")[1])
    steps = int(next(o for o in ov if o.startswith("train.steps_per_epoch=")).split("=")[1])
    n = batch * steps
    images, labels = load_arrays("cifar10", root, "train", 32, limit=n, seed=0)
    mem_kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS growth (psutil, 50 ms)"
    cases: dict[str, Callable[[], float]] = {}
    peaks: dict[str, list[int]] = {"direct": [], "ray_train": []}

    def direct():
        rate, peak = _direct_run(ov, images, labels, device)
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
        "peak_memory_mib": {k: _mib(max(v)) for k, v in peaks.items() if v}, "peak_memory_kind": mem_kind,
        "process_maxrss_mib": _mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
    }
    if use_ray:
        out["ratio_ray_over_direct"] = ratio(rates["ray_train"]["median"], rates["direct"]["median"])
        out["peak_memory_kind_ray"] = "sum of RSS of RayTrainWorker processes (peak, psutil)"
    else:
        out["ray_train"] = "skipped (--quick without --only ...,ray, or 'ray' not in --only)"
    return out


# ================================================================================================ peer


def lightly_baseline(size: int) -> tuple[Callable, Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str]:
    """(per-image two-view transform, NT-Xent loss, description) of lightly's SimCLR CIFAR-10 example."""
    try:
        import lightly
        from lightly.loss import NTXentLoss
        from lightly.transforms import SimCLRTransform

        transform = SimCLRTransform(input_size=size, gaussian_blur=0.0)
        return transform, NTXentLoss(temperature=0.5), f"lightly {lightly.__version__} (SimCLRTransform, NTXentLoss)"
    except ImportError:
        from replab.methods import losses
        from replab.methods.simclr import simclr_view

        t = torchvision_transform(simclr_view(size))
        return (lambda im: [t(im), t(im)], lambda a, b: losses.nt_xent(a, b, 0.5),
                "torchvision re-creation of lightly's SimCLRTransform + NT-Xent (lightly not importable)")


def bench_peer(root: str, quick: bool, device: torch.device, repeats: int) -> dict[str, Any]:
    """replab's loop vs lightly's SimCLR example pipeline on the same model, batch and images.

    The baseline runs as lightly's example is written (fp32, contiguous tensors); where replab's default
    precision picks bf16 (a GPU, or a CPU with native bf16), a second baseline adds bf16 autocast and
    channels_last to lightly's loop by hand, so the table shows how much of the gap is the data path
    (batched views on the trainer's device vs per-image transforms in workers) and how much the precision.
    """
    from replab.config import load_config
    from replab.platform.data import load_arrays
    from replab.platform.evaluate import autocast_context
    from replab.platform.loop import build_method, optimizer_settings, use_bf16

    batch = 64 if quick else 256
    steps = 2
    ov = step_overrides(quick, batch=batch, steps=steps)
    n = batch * steps
    images, labels = load_arrays("cifar10", root, "train", 32, limit=n, seed=0)
    transform, loss_fn, baseline = lightly_baseline(32)
    loader = _loader(PILViews(images, labels, transform, multi=True), batch, cores())
    cfg = load_config(None, ov)
    replab_bf16 = use_bf16(cfg.train.precision, device)

    def lightly_style(bf16_channels_last: bool):
        def run():
            torch.manual_seed(0)
            method = build_method(cfg).to(device)
            if bf16_channels_last:
                method = method.to(memory_format=torch.channels_last)
            _, lr, wd = optimizer_settings(cfg, method)
            opt = torch.optim.SGD(method.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
            times = []
            for epoch in range(2):  # epoch 1 warms up, epoch 2 is timed, as in train_worker
                t = time.perf_counter()
                for views, _ in loader:
                    x0, x1 = views[0].to(device), views[1].to(device)
                    if bf16_channels_last:
                        x0, x1 = (x.contiguous(memory_format=torch.channels_last) for x in (x0, x1))
                    with autocast_context(device, bf16_channels_last):
                        z0 = method.projector(method.backbone(x0))
                        z1 = method.projector(method.backbone(x1))
                        loss = loss_fn(z0, z1)
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                loss.item()
                times.append(time.perf_counter() - t)
            return steps * batch / times[-1]
        return run

    def replab_loop():
        rate, _ = _direct_run(ov, images, labels, device)
        return rate

    cases = {"replab": replab_loop, "lightly_style": lightly_style(False)}
    if replab_bf16:
        cases["lightly_style_bf16_channels_last"] = lightly_style(True)
    rates = interleaved(cases, repeats)
    del loader
    r = ratio(rates["replab"]["median"], rates["lightly_style"]["median"])
    out = {"baseline": baseline, "config": ov, "batch": batch, "steps_timed": steps, "device": str(device),
           "replab_precision": "bf16 autocast + channels_last" if replab_bf16 else "fp32 + channels_last",
           "dataloader_workers": cores(), "images_per_sec": rates, "ratio_replab_over_lightly_style": r,
           "target_ratio": 1.5, "meets_target": bool(r is not None and r >= 1.5)}
    if replab_bf16:
        out["ratio_replab_over_lightly_style_bf16_channels_last"] = ratio(
            rates["replab"]["median"], rates["lightly_style_bf16_channels_last"]["median"])
    return out


# ================================================================================================ step switches


def fixed_step(overrides: list[str], images: torch.Tensor, *, bf16: bool = False, channels_last: bool = False,
               compile: bool | str = False, fused: bool | None = None, steps: int = 1, seed: int = 0,
               device: str | torch.device = "cpu") -> dict[str, Any]:
    """Losses of ``steps`` training steps on one fixed batch with fixed views (seeded), one switch set.

    ``compile``: True = ``torch.compile`` (inductor), a string = that ``torch.compile`` backend (e.g.
    ``"aot_eager"``: the same graph capture and AOT autograd without code generation).
    ``fused``: True = fused optimizer kernel, False = foreach, None = the plain per-parameter loop. Returns
    ``{"losses": [...], "params": flat parameter vector after the steps, "flops": FLOPs of step 1}``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from replab.config import load_config
    from replab.platform import optim
    from replab.platform.augment import make_views
    from replab.platform.evaluate import autocast_context
    from replab.platform.loop import build_method, optimizer_settings

    device = torch.device(device)
    cfg = load_config(None, overrides)
    torch.manual_seed(seed)
    method = build_method(cfg).to(device)
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    name, lr, wd = optimizer_settings(cfg, method)
    groups = method.parameter_groups(wd)
    if fused is None and name in ("sgd", "adamw"):
        clean = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]
        opt = (torch.optim.SGD(clean, lr=lr, momentum=method.optimizer.momentum, foreach=False) if name == "sgd"
               else torch.optim.AdamW(clean, lr=lr, betas=method.optimizer.betas, foreach=False))
    else:
        opt = optim.build_optimizer(name, groups, lr, method.optimizer.momentum, method.optimizer.betas,
                                    fused=bool(fused))
    if compile:
        model = torch.compile(method, backend=compile) if isinstance(compile, str) else torch.compile(method)
    else:
        model = method
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        views = make_views(images.to(device), method.views(), generator=gen)
    if channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    losses, flops = [], None
    method.train()
    for i in range(steps):
        counter = FlopCounterMode(display=False) if (i == 0 and not compile) else contextlib.nullcontext()
        with counter:
            with autocast_context(device, bf16):
                out = model(views, None)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
        if isinstance(counter, FlopCounterMode):
            flops = counter.get_total_flops()
        opt.step()
        method.update_teacher()
        losses.append(float(out.loss.detach()))
    params = torch.cat([p.detach().float().flatten().cpu() for p in method.parameters()])
    return {"losses": losses, "params": params, "flops": flops}


# ================================================================================================ gpu


def matmul_peak_flops(device: torch.device, dtype=torch.bfloat16, n: int = 8192, iters: int = 20) -> float:
    """Measured dense matmul FLOP/s on ``device`` (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t)


GPU_MODELS = {  # the targets first: a run stopped by its time limit keeps them
    "simclr_resnet18_32px": (["method.name=simclr", "model.backbone=resnet18", "model.cifar_stem=on",
                              "data.resolution=32"], 512),
    "mae_vit_base16_224px": (["method.name=mae", "model.backbone=vit_base", "model.patch_size=16",
                              "data.resolution=224"], 128),
    "simclr_resnet50_224px": (["method.name=simclr", "model.backbone=resnet50", "data.resolution=224"], 128),
    "mae_vit_small16_224px": (["method.name=mae", "model.backbone=vit_small", "model.patch_size=16",
                               "data.resolution=224"], 128),
    "dino_vit_small16_224px": (["method.name=dino", "model.backbone=vit_small", "model.patch_size=16",
                                "data.resolution=224"], 64),
}
SWITCHES = ("bf16", "channels_last", "compile", "fused")
EAGER_ON = {"bf16": True, "channels_last": True, "compile": False, "fused": True}
GPU_VARIANTS = {
    "all_on": {**EAGER_ON, "compile": True},
    "eager": EAGER_ON,  # = all_on with compile off
    "no_bf16": {**EAGER_ON, "bf16": False},
    "no_channels_last": {**EAGER_ON, "channels_last": False},
    "no_fused": {**EAGER_ON, "fused": False},
    "all_off": dict.fromkeys(SWITCHES, False),
}
"""Each switch off in turn from the eager all-on set (compile is measured once, as all_on vs eager: every
compiled variant costs a compile of tens of seconds per model)."""


def _gpu_rate(overrides, batch, device, switches: dict[str, bool], steps: int) -> tuple[float, float]:
    """(images/s, FLOPs per step) of the training step with the given switches, on random uint8 images."""
    from replab.config import load_config
    from replab.platform import optim
    from replab.platform.augment import make_views
    from replab.platform.evaluate import autocast_context
    from replab.platform.loop import build_method, optimizer_settings

    cfg = load_config(None, overrides + [f"train.batch_size={batch}"])
    res = cfg.data.resolution
    torch.manual_seed(0)
    method = build_method(cfg).to(device)
    if switches["channels_last"]:
        method = method.to(memory_format=torch.channels_last)
    name, lr, wd = optimizer_settings(cfg, method)
    opt = optim.build_optimizer(name, method.parameter_groups(wd), lr, method.optimizer.momentum,
                                method.optimizer.betas, fused=switches["fused"])
    if switches["compile"]:
        torch._dynamo.reset()  # a fresh model each case: without this Dynamo recompiles until its cache limit
    model = torch.compile(method) if switches["compile"] else method
    images = torch.randint(0, 256, (batch, res, res, 3), dtype=torch.uint8, device=device)
    specs = method.views()
    flops = 0.0

    def one(count_flops=False):
        nonlocal flops
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad():
            views = make_views(images, specs)
            if switches["channels_last"]:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        ctx = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
        with ctx:
            with autocast_context(device, switches["bf16"]):
                out = model(views, None)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
        if count_flops:
            flops = float(ctx.get_total_flops())
        opt.step()
        method.update_teacher()

    if not switches["compile"]:
        one(count_flops=True)
    for _ in range(3):
        one()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        one()
    sync(device)
    return steps * batch / (time.perf_counter() - t), flops


def bench_gpu(quick: bool, repeats: int, device: torch.device | None = None, models: dict | None = None,
              on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """MFU and images/s per model and switch set; ``on_update`` gets the partial result after each model
    (a long run on a lent GPU keeps what it measured if it is stopped). ``device``/``models`` let the tests
    run the same code on the CPU with small models."""
    if device is None:
        if not torch.cuda.is_available():
            return {"skipped": "no GPU: torch.cuda.is_available() is False; MFU and GPU images/s not measured"}
        device = torch.device("cuda")
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    peak = matmul_peak_flops(device, n=8192 if on_gpu else 512, iters=20 if on_gpu else 2)
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if on_gpu else str(device),
        "bf16_matmul_tflops": round(peak / 1e12, 3), "variants": dict(GPU_VARIANTS),
        "mfu_definition": "FlopCounterMode FLOPs of one eager step (forward + backward) x steps/s / bf16 matmul rate",
    }
    steps = 5 if quick else 20
    for name, (ov, batch) in (models or GPU_MODELS).items():
        flops_per_step: dict[str, float] = {}
        peak_mib: dict[str, float] = {}

        def case(sw, key, ov=ov, batch=batch, flops_per_step=flops_per_step, peak_mib=peak_mib):
            def run():
                if on_gpu:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                rate, flops = _gpu_rate(ov, batch, device, sw, steps)
                if flops:
                    flops_per_step[key] = flops
                if on_gpu:
                    peak_mib[key] = max(peak_mib.get(key, 0.0), _mib(torch.cuda.max_memory_allocated()))
                return rate
            return run

        rates = interleaved({k: case(sw, k) for k, sw in GPU_VARIANTS.items()}, repeats)
        flops = flops_per_step.get("eager") or flops_per_step.get("all_off") or 0.0
        entry = {"batch": batch, "images_per_sec": rates, "flops_per_step": flops, "peak_memory_mib": peak_mib}
        entry["mfu"] = {k: round(flops * (v["median"] / batch) / peak, 4) for k, v in rates.items()} if flops else None
        entry["speedup_all_on_over_all_off"] = ratio(rates["all_on"]["median"], rates["all_off"]["median"])
        entry["speedup_compile"] = ratio(rates["all_on"]["median"], rates["eager"]["median"])
        out[name] = entry
        if on_update:
            on_update(out)
    return out


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
    from replab.config import load_config
    from replab.platform.data import load_arrays
    from replab.platform.loop import LocalEnv, train_worker

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


# ================================================================================================ driver


def run_bench(quick: bool = False, only: list[str] | None = None, out: str | None = None, root: str = "",
              repeats: int | None = None, device: str | None = None, threads: int | None = None,
              steps: int | None = None, models: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen sections; ``threads`` sets torch's intra-op threads in this process for the run
    (default: torch's own choice, 1 with ``quick``: on a shared, oversubscribed CPU OpenMP spin-waits make
    2 threads several times slower than 1). ``steps``: steps per timed epoch of the step / Ray cases (more
    steps amortise the per-epoch start of the input stream, as a real epoch does). ``models``: a subset of
    :data:`GPU_MODELS` for the gpu section; ``device="cpu"`` runs that section on the CPU."""
    previous_threads = torch.get_num_threads()
    if threads or quick:
        torch.set_num_threads(threads or 1)
    try:
        return _run(quick, only, out, root, repeats, device, steps, models)
    finally:
        torch.set_num_threads(previous_threads)


def _run(quick, only, out, root, repeats, device, steps=None, models=None) -> dict[str, Any]:
    chosen = list(only) if only else [s for s in SECTIONS if not (quick and s == "ray")]
    bad = [s for s in chosen if s not in SECTIONS]
    if bad:
        raise ValueError(f"--only: {', '.join(bad)} not valid; choose from {', '.join(SECTIONS)}")
    unknown = [m for m in models or [] if m not in GPU_MODELS]
    if unknown:
        raise ValueError(f"--models: {', '.join(unknown)} not valid; choose from {', '.join(GPU_MODELS)}")
    gpu_models = {m: GPU_MODELS[m] for m in models} if models else None
    use_ray = "ray" in chosen  # --quick leaves Ray out unless --only names it
    root = _data_root(root)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reps = repeats or (1 if quick else 3)
    result: dict[str, Any] = {
        "meta": {
            "date": datetime.date.today().isoformat(), "quick": quick, "sections": chosen, "repeats": reps,
            "cpu": cpu_name(), "cores": cores(), "device": str(dev), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "load_avg_at_start": os.getloadavg(), "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "data_root": root,
        }
    }
    started = time.perf_counter()
    walls = result["meta"]["section_wall_s"] = {}

    def save(section: str | None = None, partial: Any = None) -> None:
        """Write what is measured so far: a run stopped by a time limit keeps its finished parts."""
        if section is not None:
            result[section] = partial
        result["meta"]["wall_s"] = round(time.perf_counter() - started, 1)
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result, indent=2, default=str))

    jobs = {
        "data": lambda: bench_data(root, quick, use_ray, reps),
        "augment": lambda: bench_augment(root, quick, dev, reps),
        "step": lambda: bench_step(root, quick, use_ray, dev, reps, steps),
        "peer": lambda: bench_peer(root, quick, dev, reps),
        "gpu": lambda: bench_gpu(quick, reps, device=dev if device else None, models=gpu_models,
                                 on_update=lambda partial: save("gpu", partial)),
        "epoch": lambda: (bench_epoch(root, quick, dev, on_update=lambda partial: save("epoch", partial))
                          if dev.type == "cuda" else {"skipped": "no GPU: the CIFAR-10 epoch target is for the H200"}),
    }
    for name, job in jobs.items():
        if name in chosen or (name == "step" and use_ray):
            t = time.perf_counter()
            result[name] = job()
            walls[name] = round(time.perf_counter() - t, 1)
            save()
    save()
    return result


def table(result: dict[str, Any]) -> str:
    """The medians (and ratios) of a result as an aligned text table."""
    rows: list[tuple[str, str, str]] = []

    def walk(prefix: str, node: Any):
        if isinstance(node, dict):
            if "median" in node:
                rows.append((prefix, f"{node['median']:.1f}", ""))
                return
            for k, v in node.items():
                if k in ("config", "meta", "views", "runs"):
                    continue
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(node, (int, float)) and not isinstance(node, bool) and (
                "ratio" in prefix or "peak_memory" in prefix or "mfu" in prefix or "ray_data" in prefix
                or "tflops" in prefix or "speedup" in prefix or prefix.startswith("epoch.")):
            rows.append((prefix, f"{node:g}", ""))
        elif isinstance(node, str) and (prefix.endswith("skipped") or prefix.endswith("ray_train")
                                        or prefix.endswith("baseline")):
            rows.append((prefix, node, ""))

    for section in ("data", "augment", "step", "peer", "gpu", "epoch"):
        if section in result:
            walk(section, result[section])
    width = max((len(r[0]) for r in rows), default=10)
    m = result.get("meta", {})
    head = f"replab bench  {m.get('date')}  {m.get('cpu')}  {m.get('cores')} cores  device={m.get('device')}"
    lines = [head, "-" * len(head)] + [f"{k:<{width}}  {v}" for k, v, _ in rows]
    return "\n".join(lines)
