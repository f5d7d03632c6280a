"""MoCo v3 (Chen, Xie & He, ICCV 2021): symmetric InfoNCE between a query (encoder -> projector -> predictor)
and the momentum encoder's key of the other view, the keys of the whole global batch being the negatives.

    loss = 2 tau [ ctr(q1, k2) + ctr(q2, k1) ],    ctr = InfoNCE over the gathered keys (no queue)

The momentum encoder (EMA of backbone + projector) follows BYOL's cosine schedule from ``tau_base`` to 1.
Heads as in the official code (facebookresearch/moco-v3, moco/builder.py): Linear layers without bias,
BN + ReLU between them and a BN without affine after the projector's output; 4096 hidden, 256 out.

Defaults are picked from the backbone where the paper's recipes differ (``None`` = automatic):

=================  ================================  ====================================
                   ResNet (CONFIG.md, R-50 100 ep)   ViT (CONFIG.md, ViT-S/B 300 ep)
=================  ================================  ====================================
temperature        1.0                               0.2
projector layers   2 (official code; paper: 3)       3
crop scale         (0.2, 1)                          (0.08, 1)
optimizer          LARS lr 0.6 / 256, wd 1e-6        AdamW lr 1.5e-4 / 256, wd 0.1
patch projection   -                                 frozen at its random init ("stop-grad conv1")
=================  ================================  ====================================

``tau_base`` 0.99 for both (the official default for 100 and 300 epochs; 0.996 for 1000-epoch ResNet runs).
The optimizer is the class-level LARS one; a ViT instance overrides ``self.optimizer`` with AdamW, which
the training loop reads from the instance. Augmentation: BYOL's asymmetric pair (as the paper).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from replab.methods import losses, registry
from replab.methods.base import Method, OptimizerDefaults, StepOutput, ema_momentum, ema_update, frozen_copy
from replab.methods.byol import byol_views
from replab.models.backbones import is_vit
from replab.models.heads import mlp
from replab.platform.data.augment import ViewSpec


@dataclass
class MoCoV3Params:
    temperature: float | None = None
    """None: 1.0 for ResNets, 0.2 for ViTs."""
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    proj_layers: int | None = None
    """None: 2 for ResNets (official code), 3 for ViTs."""
    pred_hidden_dim: int = 4096
    tau_base: float = 0.99
    """Momentum-encoder EMA coefficient at the start; cosine schedule to 1."""
    crop_min: float | None = None
    """Random-resized-crop lower scale; None: 0.2 for ResNets, 0.08 for ViTs."""
    freeze_patch_embed: bool = True
    """ViT only: keep the random patch projection fixed (the paper's stability trick)."""


VIT_OPTIMIZER = OptimizerDefaults(name="adamw", lr=1.5e-4, weight_decay=0.1)


@registry.register
class MoCoV3(Method):
    name = "mocov3"
    summary = "contrastive: symmetric InfoNCE against a momentum encoder's in-batch keys (Chen, Xie & He 2021)"
    Params = MoCoV3Params
    optimizer = OptimizerDefaults(name="lars", lr=0.6, weight_decay=1e-6)

    def __init__(self, backbone, params: MoCoV3Params, resolution: int):
        super().__init__(backbone, params, resolution)
        vit = is_vit(backbone)
        self.temperature = params.temperature if params.temperature is not None else (0.2 if vit else 1.0)
        self.crop_min = params.crop_min if params.crop_min is not None else (0.08 if vit else 0.2)
        layers = params.proj_layers if params.proj_layers is not None else (3 if vit else 2)
        if vit:
            self.optimizer = VIT_OPTIMIZER
            if params.freeze_patch_embed:
                for p in backbone.conv_proj.parameters():
                    p.requires_grad_(False)
        self.projector = mlp(backbone.out_dim, params.proj_hidden_dim, params.proj_dim, layers,
                             last_bn=True, bias=False)
        self.predictor = mlp(params.proj_dim, params.pred_hidden_dim, params.proj_dim, 2, last_bn=vit, bias=False)
        self.momentum_backbone = frozen_copy(backbone)
        self.momentum_projector = frozen_copy(self.projector)

    def views(self) -> list[ViewSpec]:
        return [dataclasses.replace(spec, scale=(self.crop_min, 1.0)) for spec in byol_views(self.resolution)]

    def forward(self, views, labels=None) -> StepOutput:
        z1, z2 = self.projector(self.backbone(views[0])), self.projector(self.backbone(views[1]))
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(views[0]))
            k2 = self.momentum_projector(self.momentum_backbone(views[1]))
        t = self.temperature
        loss = 2 * t * (losses.infonce(q1, k2, t) + losses.infonce(q2, k1, t))
        return StepOutput(loss, metrics={"tau": torch.tensor(self.tau)}, embeddings=z1.detach())

    @property
    def tau(self) -> float:
        return ema_momentum(self.params.tau_base, self.progress)

    @torch.no_grad()
    def update_teacher(self) -> None:
        ema_update(self.momentum_backbone, self.backbone, self.tau)
        ema_update(self.momentum_projector, self.projector, self.tau)
