"""The per-worker training loop: plain PyTorch, with or without Ray.

:func:`train_worker` runs one worker's share of a run. Everything that differs between Ray Train and a plain
process sits behind :class:`WorkerEnv` (where batches come from, how a checkpoint is reported, where the
last one is), so tests and GPU benchmarks call the same loop directly through :class:`LocalEnv`, and
:mod:`replab.platform.train.ray_train` wraps it in a Ray Train ``TorchTrainer``.

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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from replab.config import RunConfig
from replab.methods import registry
from replab.methods.base import Method, Progress, Support
from replab.models.backbones import build_backbone
from replab.platform.data.augment import make_views
from replab.platform.probes.frozen import EvalData, autocast_context, evaluate_encoder
from replab.platform.progress import bar
from replab.platform.train import encoder_init, optim
from replab.platform.train.checkpoints import load_checkpoint, save_checkpoint
from replab.platform.train.collapse import CollapseMonitor, embedding_signals
from replab.validate import from_dict


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
        from replab.platform.data.arrays import iterate_batches

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


def build_method(cfg: RunConfig, init_encoder: bool = False) -> Method:
    """The method of ``cfg`` on a fresh backbone; with ``init_encoder``, the backbone first takes the encoder
    weights of ``model.init`` (:mod:`~replab.platform.train.encoder_init`), before the method copies it."""
    backbone = build_backbone(
        cfg.model.backbone, cfg.data.resolution, cfg.model.width, cfg.model.cifar_stem, cfg.model.patch_size
    )
    if init_encoder and cfg.model.init:
        state, source_model, source = encoder_init.initial_encoder(cfg, build_method)
        encoder_init.load_into(backbone, state, source_model, cfg, source.target)
    return registry.build(cfg.method.name, cfg.method.params, backbone, cfg.data.resolution)


def optimizer_settings(cfg: RunConfig, method: Method) -> tuple[str, float, float]:
    """(optimizer name, peak lr, weight decay) after applying the config over the method's defaults."""
    defaults = method.optimizer
    name = defaults.name if cfg.train.optimizer == "auto" else cfg.train.optimizer
    base_lr = cfg.train.lr if cfg.train.lr is not None else defaults.lr
    wd = cfg.train.weight_decay if cfg.train.weight_decay is not None else defaults.weight_decay
    return name, base_lr * cfg.train.batch_size / 256, wd


@dataclass
class Schedule:
    """Steps and learning rate of a run: every worker runs ``steps_per_epoch`` steps of ``local_batch`` images."""

    local_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    min_lr_ratio: float

    def lr(self, step: int) -> float:
        return optim.lr_at(step, self.total_steps, self.warmup_steps, self.peak_lr, self.min_lr_ratio)


def schedule_for(cfg: RunConfig, num_rows: int, world_size: int, peak_lr: float) -> Schedule:
    """The :class:`Schedule` of ``cfg`` over ``num_rows`` training images (``train.steps_per_epoch`` caps an
    epoch; warm-up is ``train.warmup_epochs`` but at most a tenth of the run)."""
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
    return Schedule(cfg.train.batch_size // world_size, steps_per_epoch, total_steps, warmup_steps, peak_lr,
                    cfg.train.min_lr_ratio)


@dataclass
class Worker:
    """Everything one worker trains with: the method (and its wrapped / compiled ``model``), the optimizer,
    the schedule, the view specs and the precision switches."""

    cfg: RunConfig
    env: WorkerEnv
    method: Method
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    bf16: bool
    channels_last: bool
    specs: list = field(default_factory=list)
    """The method's view specs (``method.views()``)."""
    support_spec: Any = None
    """The method's :class:`SupportSpec` (semi-supervised methods) or None."""
    support_batches: Iterator | None = None
    logger: Any = None
    collapse: CollapseMonitor = field(default_factory=CollapseMonitor)

    @property
    def is_chief(self) -> bool:
        return self.env.rank == 0


def build_worker(cfg: RunConfig, env: WorkerEnv, num_rows: int, logger: Any = None) -> tuple[Worker, int, int]:
    """The seeded :class:`Worker` of ``cfg`` in ``env``, restored from the env's latest checkpoint when there is
    one; returns it with the (epoch, step) to start from."""
    device = env.device
    if device.type == "cuda" and cfg.train.deterministic:
        # cuDNN's autotuner and atomics-based kernels change the sums from run to run; cuBLAS needs a fixed
        # workspace to be reproducible (set before its first use in this process).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # input shapes are fixed per view: time the conv algorithms once
    torch.manual_seed(cfg.train.seed)
    resume_dir = env.latest_checkpoint()
    method = build_method(cfg, init_encoder=resume_dir is None).to(device)  # model.init: fresh runs only
    channels_last = cfg.train.channels_last and device.type in ("cuda", "cpu")
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    opt_name, peak_lr, wd = optimizer_settings(cfg, method)
    optimizer = optim.build_optimizer(
        opt_name, method.parameter_groups(wd), peak_lr, method.optimizer.momentum, method.optimizer.betas,
        fused=device.type == "cuda",
    )
    schedule = schedule_for(cfg, num_rows, env.world_size, peak_lr)

    start_epoch, step = 0, 0
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
        from replab.platform.data.support import support_sampler

        support_batches = support_sampler(cfg, support_spec, env.rank, env.world_size, device, start_epoch)
    torch.manual_seed(cfg.train.seed * 1000 + env.rank + 7919 * start_epoch)  # per-worker augmentation stream
    worker = Worker(cfg, env, method, model, optimizer, schedule, use_bf16(cfg.train.precision, device),
                    channels_last, specs, support_spec, support_batches, logger)
    return worker, start_epoch, step


def _views(worker: Worker, images: torch.Tensor, specs) -> list[torch.Tensor]:
    views = make_views(images, specs)
    if worker.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    return views


def train_step(worker: Worker, batch: dict[str, torch.Tensor], step: int, epoch: int) -> tuple[Any, float]:
    """One optimisation step on ``batch`` at global step ``step``: views (and the labeled support of
    semi-supervised methods) made on the device, forward under autocast, backward, optimizer and teacher
    update. Returns the method's :class:`StepOutput` and the learning rate used."""
    cfg, method, device = worker.cfg, worker.method, worker.env.device
    images = batch["image"].to(device, non_blocking=True)
    labels = batch["label"].to(device, non_blocking=True) if "label" in batch else None
    lr = worker.schedule.lr(step)
    optim.set_lr(worker.optimizer, lr)
    method.progress = Progress(step=step, total_steps=worker.schedule.total_steps, epoch=epoch,
                               epochs=cfg.train.epochs)
    with torch.no_grad():
        views = _views(worker, images, worker.specs)
        extra = {}
        if worker.support_batches is not None:
            s_images, s_labels = next(worker.support_batches)
            s_views = _views(worker, s_images.to(device, non_blocking=True), list(worker.support_spec.views))
            extra["support"] = Support(s_views, s_labels.to(device, non_blocking=True))
    with autocast_context(device, worker.bf16):
        out = worker.model(views, labels, **extra)
    worker.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    worker.optimizer.step()
    method.update_teacher()
    return out, lr


def step_metrics(out: Any, step: int, lr: float, images_per_sec: float) -> dict[str, float]:
    """The per-step record of a logging step; raises FloatingPointError on a non-finite loss."""
    loss_value = out.loss.item()  # the one host sync, on logging steps only
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"train/loss became {loss_value} at step {step}; lower train.lr or use precision=fp32")
    metrics = {"train/loss": loss_value, "train/lr": lr, "train/images_per_sec": images_per_sec}
    metrics.update({f"train/{k}": float(v) for k, v in out.metrics.items()})
    if out.embeddings is not None:
        metrics.update(embedding_signals(out.embeddings))
    return metrics


def _watch_collapse(worker: Worker, metrics: dict[str, float], dim: int, step: int) -> None:
    """Warn once, in the terminal and as the run's ``replab.collapsed`` tag, when the encoder collapses."""
    warning = worker.collapse.update(metrics, dim, step)
    if warning is None:
        return
    print(warning, flush=True)
    if worker.logger is not None:
        worker.logger.tag("replab.collapsed", warning.removeprefix("warning: "))


def train_epoch(worker: Worker, epoch: int, step: int) -> tuple[dict[str, Any], int]:
    """One epoch of ``steps_per_epoch`` steps from global step ``step``: (the epoch's record, the new step)."""
    cfg, env = worker.cfg, worker.env
    worker.method.train()
    loss_sum = torch.zeros((), device=env.device)
    steps_in_epoch = 0
    interval_images, interval_start = 0, time.perf_counter()
    epoch_start = interval_start
    progress = bar(total=worker.schedule.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="step",
                   disable=None if worker.is_chief else True)
    for batch in env.batches(epoch, worker.schedule.local_batch):
        if steps_in_epoch >= worker.schedule.steps_per_epoch:
            break
        out, lr = train_step(worker, batch, step, epoch)
        loss_sum += out.loss.detach().float()
        step += 1
        steps_in_epoch += 1
        progress.update(1)
        interval_images += batch["image"].shape[0] * env.world_size
        if worker.is_chief and step % cfg.train.log_every == 0:
            now = time.perf_counter()
            metrics = step_metrics(out, step, lr, interval_images / max(now - interval_start, 1e-9))
            if worker.logger is not None:
                worker.logger.metrics(metrics, step=step)
            if out.embeddings is not None:
                _watch_collapse(worker, metrics, out.embeddings.flatten(1).shape[1], step)
            interval_images, interval_start = 0, now
    epoch_time = time.perf_counter() - epoch_start
    epoch_loss = (loss_sum / max(steps_in_epoch, 1)).item()
    if not math.isfinite(epoch_loss):  # logging steps may miss it: the epoch mean cannot
        raise FloatingPointError(f"train/loss became {epoch_loss} in epoch {epoch + 1} (by step {step}); "
                                 "lower train.lr, check the method's parameters, or use train.precision=fp32")
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "step": step,
        "train/epoch_loss": epoch_loss,
        "train/epoch_images_per_sec": steps_in_epoch * cfg.train.batch_size / max(epoch_time, 1e-9),
        "train/epoch_time_s": epoch_time,
        "data/skipped": env.skipped(),
    }
    return record, step


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
    worker, start_epoch, step = build_worker(cfg, env, num_rows, logger)
    eval_data = None
    if worker.is_chief and eval_data_fn and (cfg.eval.knn or cfg.eval.linear):
        eval_data = eval_data_fn()
    history: list[dict[str, Any]] = []

    def run_eval() -> dict[str, float]:
        if eval_data is None:
            return {}
        return evaluate_encoder(
            worker.method.encoder, eval_data, cfg.data.resolution, env.device, knn=cfg.eval.knn,
            linear=cfg.eval.linear, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature,
            linear_epochs=cfg.eval.linear_epochs, linear_lr=cfg.eval.linear_lr, batch_size=cfg.eval.batch_size,
            bf16=worker.bf16, channels_last=worker.channels_last,
        )

    if start_epoch == 0 and cfg.eval.before_training and worker.is_chief:
        baseline = run_eval()
        if baseline and logger is not None:
            logger.metrics({**baseline, **{k.replace("eval/", "eval/init_"): v for k, v in baseline.items()}}, step=0)
        history.append({"epoch": 0, **baseline})

    for epoch in range(start_epoch, cfg.train.epochs):
        record, step = train_epoch(worker, epoch, step)
        done = epoch + 1
        due_eval = done == cfg.train.epochs or (cfg.eval.every and done % cfg.eval.every == 0)
        due_ckpt = done == cfg.train.epochs or (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0)
        # The checkpoint is written before evaluating: an evaluation error must not lose the epoch's training.
        checkpoint_dir = (save_checkpoint(worker.method, worker.optimizer, done, step, cfg)
                          if (due_ckpt and worker.is_chief) else None)
        eval_error = None
        if due_eval and worker.is_chief:
            try:
                record.update(run_eval())
            except Exception as exc:  # reported below, after the epoch's checkpoint is
                eval_error = exc
                if checkpoint_dir is None:
                    checkpoint_dir = save_checkpoint(worker.method, worker.optimizer, done, step, cfg)
        if worker.is_chief:
            print(progress_line(record, cfg.train.epochs), flush=True)
            if logger is not None:
                logger.metrics({k: v for k, v in record.items() if k not in ("epoch", "step")} | {"epoch": done},
                               step=step)
        env.report(record, checkpoint_dir)
        history.append(record)
        if eval_error is not None:
            raise eval_error
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
