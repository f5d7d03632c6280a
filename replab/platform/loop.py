"""The per-worker training loop: plain PyTorch, with or without Ray.

:func:`train_worker` runs one worker's share of a run. Everything that differs between Ray Train and a plain
process sits behind :class:`WorkerEnv` (where batches come from, how a checkpoint is reported, where the
last one is), so tests and GPU benchmarks call the same loop directly through :class:`LocalEnv`, and
:mod:`replab.platform.train` wraps it in a Ray Train ``TorchTrainer``.

Per step: uint8 batch -> the method's views on the device (:func:`make_views`) -> ``forward`` under bf16
autocast where enabled -> backward -> optimizer step -> ``update_teacher``. The learning rate follows
warm-up + cosine per step. The host synchronises only on logging steps. At each epoch end rank 0 evaluates
when due, and every worker reports (a barrier under Ray) with a checkpoint every ``checkpoint_every`` epochs.
"""

from __future__ import annotations

import abc
import math
import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from replab.config import RunConfig, from_dict
from replab.methods import registry
from replab.methods.base import Method, Progress, Support
from replab.models.backbones import build_backbone
from replab.platform import optim
from replab.platform.augment import make_views
from replab.platform.evaluate import EvalData, autocast_context, evaluate_encoder

CHECKPOINT_FILE = "state.pt"


def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX), where autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())


class WorkerEnv(abc.ABC):
    """What the loop needs from its runtime (Ray Train or a plain process)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @abc.abstractmethod
    def batches(self, epoch: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """This worker's batches for ``epoch``: ``image`` uint8 [b, R, R, 3], ``label`` int64 [b]."""

    @abc.abstractmethod
    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        """End of epoch: publish metrics and (rank 0) a checkpoint folder; a barrier under Ray."""

    @abc.abstractmethod
    def latest_checkpoint(self) -> str | None:
        """A local folder holding the last checkpoint of this run, or None to start fresh."""

    def skipped(self) -> int:
        """Images the data pipeline could not decode so far."""
        return 0

    def wrap(self, model: nn.Module, find_unused_parameters: bool) -> nn.Module:
        """DDP when several workers share a process group."""
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(
                model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
            )
        return model


def prefetched(batches: Iterator[dict[str, torch.Tensor]], depth: int = 2,
               pin: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """``batches`` produced up to ``depth`` ahead by a background thread, each tensor in pinned host memory
    when ``pin`` (then ``.to("cuda", non_blocking=True)`` is a true async copy that overlaps the step).

    Gathering a batch (fancy indexing of the decoded arrays) releases the GIL, so it runs beside the training
    step's kernel launches. Exceptions from ``batches`` re-raise in the consumer; closing the generator
    early (the loop stops at ``steps_per_epoch``) stops the thread.
    """
    done = object()
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for batch in batches:
                if pin:
                    batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                if not put(batch):
                    return
            put(done)
        except BaseException as error:  # handed to the consumer, re-raised there
            put(error)

    worker = threading.Thread(target=produce, name="replab-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = slots.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)


class LocalEnv(WorkerEnv):
    """One process without Ray: decoded arrays in memory, checkpoints in ``checkpoint_root``.

    ``prefetch``: batches gathered ahead by a background thread (pinned on CUDA); default 2 on CUDA, where
    the copy and the gather overlap the step, and 0 on CPU, where the step already uses every core.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, checkpoint_root: str | os.PathLike,
                 device: str | torch.device = "cpu", seed: int = 0, skipped: int = 0, prefetch: int | None = None):
        from replab.platform.data import iterate_batches

        self._iterate = iterate_batches
        self.images, self.labels = images, labels
        self.root = Path(checkpoint_root)
        self.device = torch.device(device)
        self.seed = seed
        self._skipped = skipped
        self.prefetch = (2 if self.device.type == "cuda" else 0) if prefetch is None else prefetch
        self.reports: list[dict[str, Any]] = []

    def batches(self, epoch, batch_size):
        stream = self._iterate(self.images, self.labels, batch_size, self.seed, epoch, drop_last=True)
        if self.prefetch:
            stream = prefetched(stream, self.prefetch, pin=self.device.type == "cuda")
        yield from stream

    def report(self, metrics, checkpoint_dir):
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            final = self.root / f"checkpoint_epoch_{metrics['epoch']:06d}"
            self.root.mkdir(parents=True, exist_ok=True)
            if final.exists():
                shutil.rmtree(final)
            os.replace(checkpoint_dir, final)  # atomic: a folder is either complete or absent

    def latest_checkpoint(self):
        found = sorted(self.root.glob("checkpoint_epoch_*")) if self.root.exists() else []
        return str(found[-1]) if found else None

    def skipped(self):
        return self._skipped


@dataclass
class LoopResult:
    epochs_done: int
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)


def build_method(cfg: RunConfig) -> Method:
    backbone = build_backbone(
        cfg.model.backbone, cfg.data.resolution, cfg.model.width, cfg.model.cifar_stem, cfg.model.patch_size
    )
    return registry.build(cfg.method.name, cfg.method.params, backbone, cfg.data.resolution)


def optimizer_settings(cfg: RunConfig, method: Method) -> tuple[str, float, float]:
    """(optimizer name, peak lr, weight decay) after applying the config over the method's defaults."""
    defaults = method.optimizer
    name = defaults.name if cfg.train.optimizer == "auto" else cfg.train.optimizer
    base_lr = cfg.train.lr if cfg.train.lr is not None else defaults.lr
    wd = cfg.train.weight_decay if cfg.train.weight_decay is not None else defaults.weight_decay
    return name, base_lr * cfg.train.batch_size / 256, wd


def save_checkpoint(method: Method, optimizer: torch.optim.Optimizer, epoch: int, step: int, cfg: RunConfig) -> str:
    """Write a checkpoint into a fresh folder (``mkdtemp``: Ray uploads it after this returns)."""
    folder = tempfile.mkdtemp(prefix="replab-ckpt-")
    state = {
        "method": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "step": step,
        "config": cfg.to_dict(),
    }
    tmp = os.path.join(folder, CHECKPOINT_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(folder, CHECKPOINT_FILE))
    return folder


def load_checkpoint(folder: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    return torch.load(Path(folder) / CHECKPOINT_FILE, map_location=map_location, weights_only=True)


def train_worker(
    cfg: RunConfig | dict,
    env: WorkerEnv,
    num_rows: int,
    eval_data_fn: Callable[[], EvalData | None] | None = None,
    logger: Any = None,
) -> LoopResult:
    """Train one worker's share of a run described by ``cfg`` in the runtime ``env``.

    ``num_rows`` is the number of training images (after ``data.limit``); it fixes the steps per epoch so
    every worker runs the same number of steps. ``eval_data_fn`` (rank 0) loads the kNN / probe data once.
    ``logger`` (rank 0) is a :class:`replab.platform.tracking.RunLogger` or None.
    """
    if isinstance(cfg, dict):
        cfg = from_dict(cfg)
    device = env.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # input shapes are fixed per view: time the conv algorithms once
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg).to(device)
    bf16 = use_bf16(cfg.train.precision, device)
    channels_last = cfg.train.channels_last and device.type in ("cuda", "cpu")
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    opt_name, peak_lr, wd = optimizer_settings(cfg, method)
    optimizer = optim.build_optimizer(
        opt_name, method.parameter_groups(wd), peak_lr, method.optimizer.momentum, method.optimizer.betas,
        fused=device.type == "cuda",
    )

    local_batch = cfg.train.batch_size // env.world_size
    steps_per_epoch = num_rows // cfg.train.batch_size
    if cfg.train.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(
            f"train.batch_size: {cfg.train.batch_size} is larger than the {num_rows} training images; "
            "lower train.batch_size or raise data.limit"
        )
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup_steps = min(int(cfg.train.warmup_epochs * steps_per_epoch), total_steps // 10)

    start_epoch, step = 0, 0
    resume_dir = env.latest_checkpoint()
    if resume_dir is not None:
        state = load_checkpoint(resume_dir, map_location=device)
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = int(state["epoch"]), int(state["step"])

    model = env.wrap(method, method.find_unused_parameters)
    if cfg.train.compile:
        model = torch.compile(model)
    specs = method.views()
    support_spec = method.support()
    support_batches = None
    if support_spec is not None:
        from replab.platform.semisup import support_sampler

        support_batches = support_sampler(cfg, support_spec, env.rank, env.world_size, device, start_epoch)
    torch.manual_seed(cfg.train.seed * 1000 + env.rank + 7919 * start_epoch)  # per-worker augmentation stream

    is_chief = env.rank == 0
    eval_data = eval_data_fn() if (is_chief and eval_data_fn and (cfg.eval.knn or cfg.eval.linear)) else None
    history: list[dict[str, Any]] = []

    def run_eval(epoch: int) -> dict[str, float]:
        if eval_data is None:
            return {}
        return evaluate_encoder(
            method.encoder, eval_data, cfg.data.resolution, device, knn=cfg.eval.knn, linear=cfg.eval.linear,
            k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature, linear_epochs=cfg.eval.linear_epochs,
            linear_lr=cfg.eval.linear_lr, batch_size=cfg.eval.batch_size, bf16=bf16, channels_last=channels_last,
        )

    if start_epoch == 0 and cfg.eval.before_training and is_chief:
        baseline = run_eval(0)
        if baseline and logger is not None:
            logger.metrics({**baseline, **{k.replace("eval/", "eval/init_"): v for k, v in baseline.items()}}, step=0)
        history.append({"epoch": 0, **baseline})

    for epoch in range(start_epoch, cfg.train.epochs):
        method.train()
        loss_sum = torch.zeros((), device=device)
        steps_in_epoch = 0
        interval_images, interval_start = 0, time.perf_counter()
        epoch_start = interval_start
        for batch in env.batches(epoch, local_batch):
            if steps_in_epoch >= steps_per_epoch:
                break
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True) if "label" in batch else None
            lr = optim.lr_at(step, total_steps, warmup_steps, peak_lr, cfg.train.min_lr_ratio)
            optim.set_lr(optimizer, lr)
            method.progress = Progress(step=step, total_steps=total_steps, epoch=epoch, epochs=cfg.train.epochs)
            with torch.no_grad():
                views = make_views(images, specs)
                if channels_last:
                    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                extra = {}
                if support_batches is not None:
                    s_images, s_labels = next(support_batches)
                    s_views = make_views(s_images.to(device, non_blocking=True), list(support_spec.views))
                    if channels_last:
                        s_views = [v.contiguous(memory_format=torch.channels_last) for v in s_views]
                    extra["support"] = Support(s_views, s_labels.to(device, non_blocking=True))
            with autocast_context(device, bf16):
                out = model(views, labels, **extra)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            method.update_teacher()
            loss_sum += out.loss.detach().float()
            step += 1
            steps_in_epoch += 1
            interval_images += images.shape[0] * env.world_size
            if is_chief and step % cfg.train.log_every == 0:
                loss_value = out.loss.item()  # the one host sync, on logging steps only
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"train/loss became {loss_value} at step {step}; lower train.lr or use precision=fp32"
                    )
                now = time.perf_counter()
                metrics = {"train/loss": loss_value, "train/lr": lr,
                           "train/images_per_sec": interval_images / max(now - interval_start, 1e-9)}
                metrics.update({f"train/{k}": float(v) for k, v in out.metrics.items()})
                if out.embeddings is not None:
                    metrics["train/embedding_std"] = embedding_std(out.embeddings)
                if logger is not None:
                    logger.metrics(metrics, step=step)
                interval_images, interval_start = 0, now

        epoch_time = time.perf_counter() - epoch_start
        done = epoch + 1
        record: dict[str, Any] = {
            "epoch": done,
            "step": step,
            "train/epoch_loss": (loss_sum / max(steps_in_epoch, 1)).item(),
            "train/epoch_images_per_sec": steps_in_epoch * cfg.train.batch_size / max(epoch_time, 1e-9),
            "train/epoch_time_s": epoch_time,
            "data/skipped": env.skipped(),
        }
        due_eval = done == cfg.train.epochs or (cfg.eval.every and done % cfg.eval.every == 0)
        if due_eval and is_chief:
            record.update(run_eval(done))
        if is_chief:
            print(progress_line(record, cfg.train.epochs), flush=True)
            if logger is not None:
                logger.metrics({k: v for k, v in record.items() if k not in ("epoch", "step")} | {"epoch": done},
                               step=step)
        due_ckpt = done == cfg.train.epochs or (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0)
        checkpoint_dir = save_checkpoint(method, optimizer, done, step, cfg) if (due_ckpt and is_chief) else None
        env.report(record, checkpoint_dir)
        history.append(record)
    return LoopResult(epochs_done=cfg.train.epochs, steps=step, history=history)


def progress_line(record: dict[str, Any], epochs: int) -> str:
    """``epoch 3/10  loss 4.1234  812 img/s  knn 0.412  linear 0.455  skipped 0`` (rank 0, once per epoch)."""
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {record['train/epoch_loss']:.4f}",
             f"{record['train/epoch_images_per_sec']:.0f} img/s"]
    for key, label in (("eval/knn_top1", "knn"), ("eval/linear_top1", "linear")):
        if key in record:
            parts.append(f"{label} {record[key]:.3f}")
    parts.append(f"skipped {record['data/skipped']}")
    return "  ".join(parts)


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> float:
    """Mean over dimensions of the batch std of L2-normalised embeddings; ~1/sqrt(D) healthy, 0 collapsed."""
    z = torch.nn.functional.normalize(z.float(), dim=1)
    return z.std(dim=0).mean().item()
