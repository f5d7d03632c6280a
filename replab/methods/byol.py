"""BYOL (Grill et al., NeurIPS 2020): predict an EMA teacher's projection of the other view.

online: encoder -> projector -> predictor q;  target: EMA copy of encoder + projector (no gradient).
loss = 2 - 2 cos(q(z1), z'2) + the symmetric term, i.e. 2 * (negative_cosine + 1) per direction.
EMA momentum tau goes from tau_base to 1 with a cosine schedule. Views are asymmetric: the first always
blurred, the second blurred with p 0.1 and solarized with p 0.2 (blur only from 64 px up, as CIFAR
re-implementations do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from replab.methods import losses, registry
from replab.methods.base import Method, OptimizerDefaults, StepOutput, ema_momentum, ema_update, frozen_copy
from replab.models.heads import mlp
from replab.platform.data.augment import ViewSpec


@dataclass
class BYOLParams:
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    pred_hidden_dim: int = 4096
    tau_base: float = 0.99
    """EMA momentum at the start (0.996 on ImageNet; 0.99 in CIFAR re-implementations)."""


def byol_views(resolution: int) -> list[ViewSpec]:
    blur = resolution >= 64
    common = dict(size=resolution, scale=(0.08, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4,
                  saturation=0.2, hue=0.1, grayscale_p=0.2)
    return [
        ViewSpec(**common, blur_p=1.0 if blur else 0.0, solarize_p=0.0),
        ViewSpec(**common, blur_p=0.1 if blur else 0.0, solarize_p=0.2),
    ]


@registry.register
class BYOL(Method):
    name = "byol"
    summary = "distillation: predict an EMA teacher's projection of the other view (Grill et al. 2020)"
    Params = BYOLParams
    optimizer = OptimizerDefaults(name="lars", lr=0.2, weight_decay=1.5e-6)
    recipes = {"cpu": ("method.proj_hidden_dim=512", "method.pred_hidden_dim=512", "train.optimizer=sgd",
                       "train.lr=0.12", "train.weight_decay=5e-4")}
    """cpu: narrower heads, and SGD with weight decay 5e-4 (lightly's CIFAR-10 recipe) instead of LARS with
    1.5e-6: at the CPU reference budget kNN 0.308 vs 0.247 (random init 0.270; docs/RESULTS.md)."""

    def __init__(self, backbone, params: BYOLParams, resolution: int):
        super().__init__(backbone, params, resolution)
        self.projector = mlp(backbone.out_dim, params.proj_hidden_dim, params.proj_dim)
        self.predictor = mlp(params.proj_dim, params.pred_hidden_dim, params.proj_dim)
        self.teacher_backbone = frozen_copy(backbone)
        self.teacher_projector = frozen_copy(self.projector)

    def views(self) -> list[ViewSpec]:
        return byol_views(self.resolution)

    def forward(self, views, labels=None) -> StepOutput:
        z1, z2 = self.projector(self.backbone(views[0])), self.projector(self.backbone(views[1]))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1 = self.teacher_projector(self.teacher_backbone(views[0]))
            t2 = self.teacher_projector(self.teacher_backbone(views[1]))
        # 2 - 2 cos per direction, summed over the two directions (BYOL Eq. 2 + its symmetrised term).
        loss = (2 + 2 * losses.negative_cosine(p1, t2)) + (2 + 2 * losses.negative_cosine(p2, t1))
        return StepOutput(loss, metrics={"tau": torch.tensor(self.tau)}, embeddings=z1.detach())

    @property
    def tau(self) -> float:
        return ema_momentum(self.params.tau_base, self.progress)

    @torch.no_grad()
    def update_teacher(self) -> None:
        ema_update(self.teacher_backbone, self.backbone, self.tau)
        ema_update(self.teacher_projector, self.projector, self.tau)
