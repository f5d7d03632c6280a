"""Exemplar-CNN (Dosovitskiy et al., NIPS 2014) as instance discrimination with a memory bank (Wu et al. 2018).

Every training image (a "seed") is its own surrogate class and heavily augmented copies of it must be
recognised as that class. Exemplar-CNN trains a parametric softmax over a few thousand seeds; Wu et al.'s
non-parametric form scales it to every image: a memory bank holds one L2-normalised 128-d prototype per
image, the loss is the softmax over all prototypes at temperature 0.07 (Eq. 2), and after each step the
prototypes of the batch's images move towards their new features, v <- normalize(0.5 v + 0.5 f).

Image ids. Batches carry only images and labels, so the method derives a stable id from the image itself:
an extra plain view (the whole image, no randomness) is averaged down to 8x8, its [0, 1] pixels quantised
to 32 levels, and the 192 integers hashed with a fixed random universal hash ((sum_k a_k q_k) mod p, p the
prime 2^31 - 1) into ``memory_size`` slots. The same image always lands in the same slot (on a given
device and resolution); distinct images collide like balls in bins: with N images in M slots a slot's
expected load is N/M and M (1 - exp(-N/M)) slots are used, e.g. 31.6k distinct classes for CIFAR-10's
50k images in the default 50k slots. A collision merges a few images into one surrogate class, which is
how Exemplar-CNN itself worked (far fewer classes than images; its accuracy saturates at several thousand
surrogate classes).

Defaults: memory 50000 slots, temperature 0.07, memory momentum 0.5, 128-d linear projection (Wu et al. and
their code);
views: crop 0.2-1, flip, colour jitter 0.4 (hue 0.4; ``method.hue``), grayscale 0.2 (Wu et al.'s code) plus
Exemplar-CNN's rotation of up to 20 degrees; SGD lr 0.03 per 256, momentum 0.9, weight decay 5e-4 (Wu et al.).
The memory update uses the batches of every worker (gathered), so all workers hold the same memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from replab.methods import losses, registry
from replab.methods._pretext import unnormalize
from replab.methods.base import Method, OptimizerDefaults, StepOutput
from replab.methods.distributed import gather
from replab.platform.data.augment import ViewSpec

HASH_SIDE = 8
HASH_LEVELS = 32
HASH_PRIME = 2**31 - 1


@dataclass
class ExemplarParams:
    memory_size: int = 50000
    """Slots of the memory bank (surrogate classes); images are hashed into them."""
    temperature: float = 0.07
    memory_momentum: float = 0.5
    proj_dim: int = 128
    rotate_degrees: float = 20.0
    hue: float = field(default=0.4, metadata={"range": (0.0, 0.5, False)})
    """Colour jitter's hue range (Wu et al.'s CIFAR code: 0.4, always applied; MoCo v2 / PIRL: 0.1 with p 0.8)."""


@registry.register
class Exemplar(Method):
    name = "exemplar"
    summary = "instance discrimination: every image its own class, memory-bank softmax (Dosovitskiy 2014, Wu 2018)"
    Params = ExemplarParams
    optimizer = OptimizerDefaults(name="sgd", lr=0.03, weight_decay=5e-4)
    recipes = {"cpu": ("method.hue=0.1",)}
    """cpu: hue jitter 0.1 (MoCo v2 / PIRL) instead of Wu et al.'s 0.4: at the CPU reference budget kNN 0.306 vs 0.278
    (random init 0.270); with 0.4 no stage of the encoder moves in 780 steps (docs/RESULTS.md)."""

    def __init__(self, backbone, params: ExemplarParams, resolution: int):
        super().__init__(backbone, params, resolution)
        self.head = nn.Linear(backbone.out_dim, params.proj_dim)
        seeded = torch.Generator().manual_seed(0)  # identical on every worker and every run
        memory = F.normalize(torch.randn(params.memory_size, params.proj_dim, generator=seeded), dim=1)
        self.register_buffer("memory", memory)
        coefficients = torch.randint(1, HASH_PRIME, (3 * HASH_SIDE * HASH_SIDE,), generator=seeded)
        self.register_buffer("hash_coefficients", coefficients, persistent=False)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def views(self) -> list[ViewSpec]:
        p = self.params
        heavy = ViewSpec(size=self.resolution, scale=(0.2, 1.0), jitter_p=1.0, brightness=0.4, contrast=0.4,
                         saturation=0.4, hue=p.hue, grayscale_p=0.2, rotate_degrees=p.rotate_degrees)
        return [heavy, ViewSpec.plain(self.resolution)]  # the plain view only identifies the image

    @torch.no_grad()
    def image_ids(self, plain: torch.Tensor) -> torch.Tensor:
        """A stable memory slot ``[B]`` per image from its plain view (see the module docstring)."""
        pixels = F.adaptive_avg_pool2d(unnormalize(plain.float()).clamp(0, 1), HASH_SIDE)
        levels = torch.round(pixels * (HASH_LEVELS - 1)).long().flatten(1)  # [B, 192] in 0..31
        return (levels * self.hash_coefficients).sum(dim=1) % HASH_PRIME % self.params.memory_size

    def forward(self, views, labels=None) -> StepOutput:
        ids = self.image_ids(views[1])
        features = F.normalize(self.head(self.backbone(views[0])), dim=1)
        loss = losses.instance_discrimination(features, self.memory, ids, self.params.temperature)
        if self.training:  # applied after the optimizer step, when the memory is no longer needed by backward
            self._pending = (gather(ids), gather(features.detach()))
        return StepOutput(loss, embeddings=features.detach())

    @torch.no_grad()
    def update_teacher(self) -> None:
        """Memory update (Wu et al.'s code): v_i <- normalize(m v_i + (1 - m) f_i) for the batch's ids."""
        if self._pending is None:
            return
        ids, features = self._pending
        self._pending = None
        m = self.params.memory_momentum
        updated = F.normalize(m * self.memory[ids] + (1 - m) * features.to(self.memory.dtype), dim=1)
        self.memory.index_copy_(0, ids, updated)  # colliding ids in one batch: one of them wins
