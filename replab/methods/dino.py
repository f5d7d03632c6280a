"""DINO (Caron et al., ICCV 2021): self-distillation with no labels. A student matches, on every crop, the
centred and sharpened output of an EMA teacher that sees only the global crops.

student: backbone -> DINO head (3-layer MLP 2048 hidden, GELU -> 256 bottleneck -> L2 normalise ->
weight-normalised linear to K outputs);  teacher: EMA copy of both (momentum cosine from 0.996 to 1).
    loss = mean over (global crop x, other crop x') of H( softmax((g_t(x) - c) / tau_t), softmax(g_s(x') / tau_s) )
The centre c follows the teacher outputs of the global batch (gathered over workers) with momentum 0.9.

Defaults (paper and facebookresearch/dino main_dino.py): tau_s 0.1; tau_t warmed up linearly from 0.04 to
0.07 over the first 10% of training (the paper's 30 of 300 epochs, scaled to the run); AdamW lr 5e-4 per 256,
wd 0.04 (constant: the official cosine weight-decay schedule to 0.4 and gradient clipping at 3 are not
implemented); last layer frozen during the first epoch (zero gradients, see ``zero_grad_through``); the
weight-normalised last layer keeps its norm fixed at 1 (``norm_last_layer=True``). Multi-crop: 2 global
crops (scale 0.4-1, blur 1.0 / 0.1 + solarize 0.2) and 8 local crops (scale 0.05-0.4, blur 0.5) of side
resolution * 96/224 rounded to a multiple of 8 (16 px at 32 px). Output dimension K = 4096 at CIFAR scale
instead of 65536 (``--set method.out_dim=65536`` on ImageNet). The official ResNet-50 recipe (SGD lr 0.03,
wd 1e-4, BN in the head) is available through ``train.optimizer`` and ``method.head_bn``.

The features evaluated and exported are the teacher's (``encoder``), as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from replab.methods import losses, registry
from replab.methods.base import Method, OptimizerDefaults, StepOutput, ema_momentum, ema_update, frozen_copy
from replab.methods.swav import local_crop_size, zero_grad_through
from replab.models.heads import mlp
from replab.platform.data.augment import ViewSpec


@dataclass
class DINOParams:
    out_dim: int = 4096
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_bn: bool = False
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_fraction: float = 0.1
    """Fraction of training over which tau_t rises linearly from ``warmup_teacher_temp`` to ``teacher_temp``."""
    center_momentum: float = 0.9
    tau_base: float = 0.996
    """Teacher EMA momentum at the start; cosine schedule to 1."""
    n_local_crops: int = 8
    freeze_last_layer_epochs: int = 1


class DINOHead(nn.Module):
    """MLP -> L2 normalisation -> weight-normalised linear layer (weight rows of norm 1, no bias)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int, bn: bool):
        super().__init__()
        self.mlp = mlp(in_dim, hidden_dim, bottleneck_dim, layers=3, batch_norm=bn, activation=nn.GELU)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor, freeze_last_layer: bool = False) -> torch.Tensor:
        weight = zero_grad_through(self.last_layer.weight) if freeze_last_layer else self.last_layer.weight
        x = self.mlp(x)
        with losses.full_precision(x):  # cosines divided by tau_t = 0.04: float32
            return F.linear(F.normalize(x.float(), dim=-1), F.normalize(weight.float(), dim=1))  # weight norm, g = 1


def dino_views(resolution: int, n_local: int) -> list[ViewSpec]:
    blur = resolution >= 64
    common = dict(jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, grayscale_p=0.2)
    global1 = ViewSpec(size=resolution, scale=(0.4, 1.0), blur_p=1.0 if blur else 0.0, **common)
    global2 = ViewSpec(size=resolution, scale=(0.4, 1.0), blur_p=0.1 if blur else 0.0, solarize_p=0.2, **common)
    local = ViewSpec(size=local_crop_size(resolution), scale=(0.05, 0.4), blur_p=0.5 if blur else 0.0, **common)
    return [global1, global2] + [local] * n_local


@registry.register
class DINO(Method):
    name = "dino"
    summary = "distillation: student matches a centred, sharpened EMA teacher across multi-crops (Caron et al. 2021)"
    Params = DINOParams
    optimizer = OptimizerDefaults(name="adamw", lr=5e-4, weight_decay=0.04)
    recipes = {"cpu": ("method.out_dim=1024", "method.n_local_crops=2", "method.head_bn=true", "method.tau_base=0.99",
                       "method.freeze_last_layer_epochs=0", "train.lr=2e-3")}
    """cpu: fewer outputs for a batch of 128, 2 local crops instead of 8, BN in the head (the official ResNet recipe), a
    teacher that moves within 780 steps (EMA from 0.99), AdamW at 4x the rate and no frozen last layer: at the CPU
    reference budget kNN +3.9 and +4.8 over init (two seeds) vs -0.9; the loss stays near ln K (docs/RESULTS.md)."""

    def __init__(self, backbone, params: DINOParams, resolution: int):
        super().__init__(backbone, params, resolution)
        p = params
        self.head = DINOHead(backbone.out_dim, p.out_dim, p.hidden_dim, p.bottleneck_dim, p.head_bn)
        self.teacher_backbone = frozen_copy(backbone)
        self.teacher_head = frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, p.out_dim))
        self._teacher_out: torch.Tensor | None = None

    def views(self) -> list[ViewSpec]:
        return dino_views(self.resolution, self.params.n_local_crops)

    @property
    def encoder(self) -> nn.Module:
        return self.teacher_backbone

    @property
    def tau(self) -> float:
        return ema_momentum(self.params.tau_base, self.progress)

    @property
    def teacher_temp(self) -> float:
        p = self.params
        if p.warmup_teacher_temp_fraction <= 0:
            return p.teacher_temp
        warmup = min(1.0, self.progress.fraction / p.warmup_teacher_temp_fraction)
        return p.warmup_teacher_temp + (p.teacher_temp - p.warmup_teacher_temp) * warmup

    def forward(self, views, labels=None) -> StepOutput:
        p, n = self.params, views[0].shape[0]
        frozen = self.progress.epoch < p.freeze_last_layer_epochs
        # Same-size crops go through the backbone together (the official MultiCropWrapper).
        features = [self.backbone(torch.cat(views[:2]))]
        if len(views) > 2:
            features.append(self.backbone(torch.cat(views[2:])))
        student = self.head(torch.cat(features), freeze_last_layer=frozen).split(n)
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(torch.cat(views[:2])))
        loss = losses.dino(list(student), list(teacher.split(n)), self.center, p.student_temp, self.teacher_temp)
        if self.training:
            self._teacher_out = teacher.float()
        with torch.no_grad():  # the loss is H(P_t) + KL(P_t || P_s): watch both (the paper's Fig. 7)
            log_p_t = F.log_softmax((teacher.float() - self.center) / self.teacher_temp, dim=1)
            entropy = -(log_p_t.exp() * log_p_t).sum(dim=1).mean()
        metrics = {"tau": torch.tensor(self.tau), "teacher_temp": torch.tensor(self.teacher_temp),
                   "teacher_entropy": entropy, "kl": loss.detach() - entropy}
        return StepOutput(loss, metrics=metrics, embeddings=features[0][:n].detach())

    @torch.no_grad()
    def update_teacher(self) -> None:
        ema_update(self.teacher_backbone, self.backbone, self.tau)
        ema_update(self.teacher_head, self.head, self.tau)
        if self._teacher_out is not None:
            self.center.copy_(losses.dino_center(self.center, self._teacher_out, self.params.center_momentum))
            self._teacher_out = None
