"""Supports: the class-stratified labeled images of every step (:func:`support_sampler`, called by the
training loop for methods whose ``support()`` returns a :class:`~replab.methods.base.SupportSpec`).

The labeled images are decoded once per worker (a few thousand at most). Every step yields C classes x M
images (uint8 ``[C*M, R, R, 3]``, labels int64 ``[C*M]`` remapped to 0..C-1 over the known classes in
``known_classes`` order), class-balanced and independent of the unlabeled epoch: each class is drawn from
its own stream of shuffled passes over its labeled images (no repeat within a pass, new order every
pass: PAWS's ``ClassStratifiedSampler``), so with k < M labels an image recurs within a step. The
``classes_per_step`` of the spec is all known classes when 0 or >= C, else a fresh random subset per
step. Streams are seeded by ``(train.seed, data.split_seed, rank)``: workers draw different images.
The streams are not checkpointed: a resumed run starts them afresh (same distribution, other draws).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from replab.config import ConfigError
from replab.platform.data.labeled import is_semisupervised, load_labeled

SUPPORT_ON_DEVICE_MAX_BYTES = 256 << 20


class SupportSampler:
    """An infinite iterator of class-balanced support batches over labeled arrays (see the module docstring).

    ``labels`` are 0..C-1. Each step: ``classes_per_step`` classes (all when 0 or >= C) x
    ``images_per_class`` images, grouped by class in increasing label order.
    """

    def __init__(self, images, labels, classes_per_step: int, images_per_class: int, seed=0,
                 device: torch.device | str = "cpu"):
        if images_per_class < 1:
            raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
        labels = np.asarray(labels, np.int64)
        self.classes = np.unique(labels)
        if len(self.classes) == 0:
            raise ValueError("no labeled images to draw supports from")
        self.num_classes = len(self.classes)
        self.classes_per_step = self.num_classes if classes_per_step <= 0 else min(classes_per_step, self.num_classes)
        self.images_per_class = int(images_per_class)
        self.rng = np.random.default_rng(seed if isinstance(seed, (list, tuple)) else [int(seed)])
        self.members = [np.flatnonzero(labels == c) for c in self.classes]
        self.streams: list[np.ndarray] = [np.zeros(0, np.int64) for _ in self.classes]
        device = torch.device(device)
        tensor = torch.as_tensor(np.ascontiguousarray(images))
        if device.type != "cpu" and tensor.numel() <= SUPPORT_ON_DEVICE_MAX_BYTES:
            tensor = tensor.to(device)
        self.images = tensor
        self.labels = torch.as_tensor(labels).to(tensor.device)

    def _take(self, j: int, m: int) -> np.ndarray:
        out = []
        while m > 0:
            if len(self.streams[j]) == 0:
                self.streams[j] = self.members[j][self.rng.permutation(len(self.members[j]))]
            got = self.streams[j][:m]
            self.streams[j] = self.streams[j][m:]
            out.append(got)
            m -= len(got)
        return np.concatenate(out)

    def next_indices(self) -> np.ndarray:
        if self.classes_per_step < self.num_classes:
            chosen = np.sort(self.rng.choice(self.num_classes, self.classes_per_step, replace=False))
        else:
            chosen = np.arange(self.num_classes)
        return np.concatenate([self._take(int(j), self.images_per_class) for j in chosen])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(self.next_indices()).to(self.images.device)
        return self.images[idx], self.labels[idx]


def support_sampler(cfg, spec, rank: int, world_size: int, device,
                    start_epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training loop's support stream for ``spec`` (a SupportSpec): ``(uint8 [S, R, R, 3], int64 [S])``.

    Labels are 0..C-1 over ``data.known_classes``. Raises ConfigError when the run has no labeled split.
    The stream is seeded by (train seed, split seed, rank, ``start_epoch``): a run resumed at epoch e draws a
    stream of its own instead of replaying the supports of epoch 0 (as the augmentation stream does).
    """
    data = cfg.data
    if not is_semisupervised(data):
        raise ConfigError(f"data.labels_per_class: method {cfg.method.name!r} trains on labeled supports; set "
                          "data.labels_per_class (or data.label_fraction / data.split_file)")
    images, labels = load_labeled(data)
    if len(images) == 0:
        raise ConfigError(f"data.labels_per_class: no labeled images could be decoded from {data.dataset}")
    seed = [int(cfg.train.seed), int(data.split_seed), int(rank), 0x5A9]
    if start_epoch:
        seed.append(int(start_epoch))
    return SupportSampler(images, labels, spec.classes_per_step, spec.images_per_class, seed=seed, device=device)
