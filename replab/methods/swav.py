"""SwAV (Caron et al., NeurIPS 2020): swap assignments between views. Each crop's embedding is scored
against K learnable prototypes; the codes of the two global crops, equipartitioned over the batch by a few
Sinkhorn-Knopp iterations, are predicted from every other crop (multi-crop).

encoder -> projector (2048 -> 128) -> L2 normalise -> prototypes (K linear units, normalised after every step)
    codes q_s = sinkhorn(scores of crop s [, queue])
    loss = mean over (s in global crops, t != s) of CE(q_s, softmax(scores_t / tau))

Defaults (facebookresearch/swav, scripts/swav_200ep_bs256_pretrain.sh, the batch-256 recipe): K = 3000
prototypes, 128-d features, tau 0.1, epsilon 0.05, 3 Sinkhorn iterations (sums all-reduced over workers),
LARS lr 0.6 per 256, wd 1e-6, prototypes frozen for the first epoch (5005 iterations at batch 256), multi-crop
2 global crops (scale 0.14-1) + 6 local crops (scale 0.05-0.14) of side resolution * 96/224 rounded to a
multiple of 8 (16 px at 32 px). K = 3000 is kept at CIFAR scale, as solo-learn's CIFAR configuration.

The queue of past embeddings (needed when the batch is small compared to K) is off by default at CIFAR
scale (``queue_length=0``); ImageNet recipe: ``queue_length=3840 queue_start_epoch=15``. Unlike the official
per-GPU queue of ``queue_length / world_size`` rows, each worker here keeps ``queue_length`` rows of its
own past embeddings; the queue is not checkpointed (it refills after a resume, as it is only used full).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from replab.methods import losses, registry
from replab.methods.base import Method, OptimizerDefaults, StepOutput
from replab.models.heads import mlp
from replab.platform.data.augment import ViewSpec


@dataclass
class SwAVParams:
    num_prototypes: int = 3000
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    n_local_crops: int = 6
    freeze_prototypes_epochs: int = 1
    queue_length: int = 0
    """Past embeddings per worker added to the Sinkhorn batch (0: no queue)."""
    queue_start_epoch: int = 15
    color_jitter_strength: float = 1.0
    """s in the official colour jitter (0.8 s, 0.8 s, 0.8 s, 0.2 s); lightly's CIFAR-10 benchmark uses 0.5."""


def local_crop_size(resolution: int) -> int:
    """The multi-crop local side: 96 px at 224 px, scaled to ``resolution`` and rounded to a multiple of 8."""
    return max(8, round(resolution * 96 / 224 / 8) * 8)


def swav_views(resolution: int, n_local: int, jitter: float = 1.0) -> list[ViewSpec]:
    """SwAV's multi-crop: 2 x (resolution, scale 0.14-1) + n_local x (local size, scale 0.05-0.14); colour jitter
    of strength ``jitter``."""
    common = dict(jitter_p=0.8, brightness=0.8 * jitter, contrast=0.8 * jitter, saturation=0.8 * jitter,
                  hue=0.2 * jitter, grayscale_p=0.2)
    blur = 0.5 if resolution >= 64 else 0.0
    global_view = ViewSpec(size=resolution, scale=(0.14, 1.0), blur_p=blur, **common)
    local_view = ViewSpec(size=local_crop_size(resolution), scale=(0.05, 0.14), blur_p=blur, **common)
    return [global_view] * 2 + [local_view] * n_local


def zero_grad_through(w: torch.Tensor) -> torch.Tensor:
    """``w`` in value, but a zero gradient to it: a frozen parameter that stays in the graph (so DDP needs no
    ``find_unused_parameters``). The optimizer's weight decay on it only rescales it, which the
    normalisation that follows (prototypes / weight-normalised layer) cancels."""
    return w.detach() + 0 * w


@registry.register
class SwAV(Method):
    name = "swav"
    summary = "clustering: swapped prediction of Sinkhorn codes over prototypes, multi-crop (Caron et al. 2020)"
    Params = SwAVParams
    optimizer = OptimizerDefaults(name="lars", lr=0.6, weight_decay=1e-6)
    recipes = {"cpu": ("method.num_prototypes=512", "method.n_local_crops=0", "method.freeze_prototypes_epochs=0",
                       "method.proj_hidden_dim=512", "method.color_jitter_strength=0.5", "train.optimizer=adamw",
                       "train.lr=2e-3", "train.weight_decay=1e-6")}
    """cpu: lightly's CIFAR-10 SwAV settings (512 prototypes never frozen, 2 crops, a 512-wide projector, colour
    jitter strength 0.5, Adam 1e-3 at batch 128). With the official jitter (strength 1) the predictions went
    uniform (loss = ln K) with LARS, with AdamW, and with all the other settings here; at strength 0.5 kNN 0.354 at
    the CPU reference budget (random init 0.270, lightly 0.333; docs/RESULTS.md)."""

    def __init__(self, backbone, params: SwAVParams, resolution: int):
        super().__init__(backbone, params, resolution)
        self.projector = mlp(backbone.out_dim, params.proj_hidden_dim, params.proj_dim)
        self.prototypes = nn.Linear(params.proj_dim, params.num_prototypes, bias=False)
        self._normalize_prototypes()
        self.queue: torch.Tensor | None = None  # [2, queue_length, proj_dim], newest first; not a buffer
        self._queued = 0
        self._new_embeddings: torch.Tensor | None = None

    def views(self) -> list[ViewSpec]:
        return swav_views(self.resolution, self.params.n_local_crops, self.params.color_jitter_strength)

    def forward(self, views, labels=None) -> StepOutput:
        p, n = self.params, views[0].shape[0]
        # Same-size crops go through the encoder together (as the official multi-crop wrapper).
        z = torch.cat([self.projector(self.backbone(torch.cat(views[:2])))]
                      + ([self.projector(self.backbone(torch.cat(views[2:])))] if len(views) > 2 else []))
        prototypes = self.prototypes.weight
        if self.progress.epoch < p.freeze_prototypes_epochs:
            prototypes = zero_grad_through(prototypes)
        with losses.full_precision(z):  # scores / epsilon: float32
            z = F.normalize(z.float(), dim=1)
            scores = list((z @ prototypes.float().T).split(n))  # one [n, K] block per crop
        with torch.no_grad():
            codes = [self._codes(scores[s].detach(), s) for s in range(2)]
        loss = losses.swav(scores, codes, p.temperature)
        if self.training:
            self._new_embeddings = z[: 2 * n].detach().view(2, n, -1)
        return StepOutput(loss, embeddings=z[:n].detach())

    @torch.no_grad()
    def _codes(self, scores: torch.Tensor, crop: int) -> torch.Tensor:
        """Sinkhorn codes of one global crop, with the queued embeddings' scores joining the batch when full."""
        n = scores.shape[0]
        if self.queue is not None and self._queued >= self.queue.shape[1]:
            scores = torch.cat([self.queue[crop] @ self.prototypes.weight.float().T, scores])
        return losses.sinkhorn(scores, self.params.epsilon, self.params.sinkhorn_iterations)[-n:]

    @torch.no_grad()
    def _normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    @torch.no_grad()
    def update_teacher(self) -> None:
        self._normalize_prototypes()
        p, new = self.params, self._new_embeddings
        self._new_embeddings = None
        if p.queue_length <= 0 or new is None or self.progress.epoch < p.queue_start_epoch:
            return
        if self.queue is None:
            self.queue = torch.zeros(2, p.queue_length, new.shape[2], device=new.device)
        self.queue = torch.cat([new, self.queue], dim=1)[:, : p.queue_length]
        self._queued += new.shape[1]
