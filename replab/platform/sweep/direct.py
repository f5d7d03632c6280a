"""A single-worker trial without Ray Train: the training loop runs in the Tune trial's own process.

Ray Train's worker group costs a controller, a worker actor, a process group and a dataset split per trial (tens
of seconds on a small CPU); a trial with one worker needs none of it. Its
:class:`~replab.platform.train.loop.WorkerEnv` reports each epoch's record to Tune (``ray.tune.report``, so ASHA
sees it) and keeps checkpoints in the trial's own folder ``<sweep dir>/train/<trial name>`` (where the Ray Train path
keeps its own), so a resumed trial (``Tuner.restore`` or a re-run after a killed driver) continues from its last
epoch whatever Tune's snapshot of the experiment holds (:class:`TuneTrialReports`). Batches come from the sweep's
shared decode held in memory (:class:`ArrayTrialEnv`, see :mod:`replab.platform.sweep.shared`), else from the
trial's Ray dataset (:class:`TrialEnv`: ``iter_torch_batches``, the same stream a Ray Train worker reads).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from replab.platform.data import pipeline, skips
from replab.platform.data.arrays import DecodedRows
from replab.platform.train.checkpoints import latest_checkpoint
from replab.platform.train.loop import LocalEnv, WorkerEnv

KEEP_CHECKPOINTS = 2


class TuneTrialReports:
    """The Tune side of a direct trial's env (a mixin before a :class:`WorkerEnv`; it needs ``self.root``): each
    epoch's record reported to Tune, checkpoints moved to ``root/checkpoint_epoch_<n>`` (the newest
    ``KEEP_CHECKPOINTS`` kept), the newest readable one found for a resume."""

    root: Path

    def report(self, metrics, checkpoint_dir):
        import ray.tune

        if checkpoint_dir is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            final = self.root / f"checkpoint_epoch_{int(metrics['epoch']):06d}"
            if final.exists():
                shutil.rmtree(final)
            shutil.move(checkpoint_dir, final)  # a rename on one filesystem: the folder is complete or absent
            for old in sorted(self.root.glob("checkpoint_epoch_*"))[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
        ray.tune.report(dict(metrics))

    def latest_checkpoint(self):
        return latest_checkpoint(str(self.root))


class TrialEnv(TuneTrialReports, WorkerEnv):
    """One worker in the Tune trial process: rank 0 of 1, batches from ``dataset``, checkpoints under
    ``checkpoint_root``, skips counted by the dataset's :class:`~replab.platform.data.skips.SkipCounter` actor
    ``skip_counter``."""

    def __init__(self, dataset, shuffle_buffer: int | None, checkpoint_root: str | os.PathLike,
                 device: str | torch.device = "cpu", skip_counter: str | None = None,
                 shuffle_seed: int | None = None):
        self.dataset = dataset
        self.shuffle_seed = shuffle_seed
        """Seed of the shuffle buffer (``train.deterministic``), None: unseeded."""
        self.shuffle_buffer = shuffle_buffer
        self.root = Path(checkpoint_root)
        self.device = torch.device(device)
        self.skip_counter = skip_counter

    def batches(self, epoch, batch_size):
        # each call re-executes the pipeline: a new seeded order per epoch, as in a Ray Train worker
        yield from pipeline.torch_batches(self.dataset, batch_size, shuffle_buffer=self.shuffle_buffer,
                                          shuffle_seed=self.shuffle_seed, epoch=epoch,
                                          pin_memory=self.device.type == "cuda")

    def skipped(self):
        return skips.skipped_count(self.skip_counter) if self.skip_counter else 0


class ArrayTrialEnv(TuneTrialReports, LocalEnv):
    """One worker in the Tune trial process on decoded arrays in memory: :class:`LocalEnv`'s batches (a new
    order per (``seed``, epoch), full batches only) and skip count (``skipped``: the decode's, known up front),
    :class:`TuneTrialReports`' reports and checkpoints."""


def trial_env(cfg, train_data, checkpoint_root: str, device: str) -> WorkerEnv:
    """The env of a direct trial: :class:`ArrayTrialEnv` on the sweep's shared decode (``train_data`` a
    :class:`~replab.platform.data.arrays.DecodedRows`), else :class:`TrialEnv` on the trial's ``TrainData``."""
    if isinstance(train_data, DecodedRows):
        return ArrayTrialEnv(train_data.images, train_data.labels, checkpoint_root, device, seed=cfg.train.seed,
                             skipped=train_data.skipped())
    return TrialEnv(train_data.dataset, train_data.shuffle_buffer, checkpoint_root, device,
                    train_data.counter_name, cfg.train.seed if cfg.train.deterministic else None)


@dataclass
class DirectResult:
    """What :func:`fit_direct` hands back, shaped like the part of Ray's ``Result`` the trial reads."""

    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: Any = None
    """A ``ray.tune.Checkpoint`` of the newest checkpoint folder, or None."""


def fit_direct(cfg, checkpoint_root: str, train_data, run_id: str) -> DirectResult:
    """Run :func:`~replab.platform.train.loop.train_worker` for ``cfg`` in this process (see the module doc) on
    ``train_data``: the trial's ``TrainData`` or its rows of the sweep's shared decode (``DecodedRows``)."""
    import ray.tune

    from replab.platform import tracking
    from replab.platform.train.loop import train_worker
    from replab.platform.train.ray_train import load_eval_data

    device = "cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu"
    threads = max(1, int(round(cfg.train.cpus_per_worker)))
    torch.set_num_threads(threads)  # what a Ray Train worker of train.cpus_per_worker CPUs would use
    env = trial_env(cfg, train_data, checkpoint_root, device)
    logger = tracking.RunLogger(cfg.tracking.uri, run_id)
    loop = train_worker(cfg, env, train_data.num_rows, eval_data_fn=lambda: load_eval_data(cfg), logger=logger)
    newest = env.latest_checkpoint()
    checkpoint = ray.tune.Checkpoint.from_directory(newest) if newest else None
    return DirectResult(dict(loop.history[-1]) if loop.history else {}, checkpoint)
