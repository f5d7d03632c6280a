"""RotNet (Gidaris et al., ICLR 2018): predict which of 0/90/180/270 degrees an image was rotated by.

Every image of the batch appears in all four rotations (the paper's best setting), a linear head on the
pooled features classifies the rotation, loss = cross entropy over the 4 classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from replab.methods import losses, registry
from replab.methods.base import Method, OptimizerDefaults, StepOutput
from replab.platform.data.augment import ViewSpec


@dataclass
class RotNetParams:
    crop_scale_min: float = 0.6
    """Random-crop area fraction lower bound (the paper crops and flips only; no colour changes)."""


@registry.register
class RotNet(Method):
    name = "rotnet"
    summary = "pretext: 4-way rotation classification (Gidaris et al. 2018)"
    Params = RotNetParams
    optimizer = OptimizerDefaults(name="sgd", lr=0.1, weight_decay=5e-4)

    def __init__(self, backbone, params: RotNetParams, resolution: int):
        super().__init__(backbone, params, resolution)
        self.head = nn.Linear(backbone.out_dim, 4)

    def views(self) -> list[ViewSpec]:
        return [ViewSpec(size=self.resolution, scale=(self.params.crop_scale_min, 1.0), jitter_p=0.0, grayscale_p=0.0)]

    def forward(self, views, labels=None) -> StepOutput:
        x = views[0]
        rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)], dim=0)
        targets = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])
        features = self.backbone(rotated)
        logits = self.head(features)
        loss = losses.rotation_cross_entropy(logits, targets)
        accuracy = (logits.argmax(dim=1) == targets).float().mean()
        return StepOutput(loss, metrics={"rotation_acc": accuracy.detach()}, embeddings=features[: x.shape[0]].detach())
