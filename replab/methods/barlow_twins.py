"""Barlow Twins (Zbontar, Jing, Misra, LeCun & Deny, ICML 2021): make the cross-correlation matrix of the two
views' embeddings, standardised over the global batch, close to the identity.

encoder -> projector (3 Linear layers, BN + ReLU between, no bias) -> barlow_twins loss:
    L = sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2,   lambda = 0.0051.

Defaults: the paper's (Sec. 4 / facebookresearch/barlowtwins: lambda 0.0051, LARS lr 0.2 per 256 for the
weights, wd 1.5e-6) with the projector narrowed from 8192-8192-8192 to 2048-2048-2048 for CIFAR-scale runs
(as solo-learn's and lightly's CIFAR-10 configurations; ``--set method.proj_dim=8192`` etc. for ImageNet).
The paper's separate bias learning rate (0.0048) is not reproduced: biases and BN parameters are excluded
from LARS adaptation and weight decay instead. Augmentation: BYOL's asymmetric pair (as the paper).
"""

from __future__ import annotations

from dataclasses import dataclass

from replab.methods import losses, registry
from replab.methods.base import Method, OptimizerDefaults, StepOutput
from replab.methods.byol import byol_views
from replab.models.heads import mlp
from replab.platform.data.augment import ViewSpec


@dataclass
class BarlowTwinsParams:
    lambda_offdiag: float = 0.0051
    proj_hidden_dim: int = 2048
    proj_dim: int = 2048
    proj_layers: int = 3


@registry.register
class BarlowTwins(Method):
    name = "barlow_twins"
    summary = "redundancy reduction: cross-correlation of the two views towards the identity (Zbontar et al. 2021)"
    Params = BarlowTwinsParams
    optimizer = OptimizerDefaults(name="lars", lr=0.2, weight_decay=1.5e-6)
    recipes = {"cpu": ("method.proj_dim=512", "method.proj_hidden_dim=512")}
    """cpu: the projector narrowed for a 128-d CPU encoder."""

    def __init__(self, backbone, params: BarlowTwinsParams, resolution: int):
        super().__init__(backbone, params, resolution)
        self.projector = mlp(backbone.out_dim, params.proj_hidden_dim, params.proj_dim, params.proj_layers, bias=False)

    def views(self) -> list[ViewSpec]:
        return byol_views(self.resolution)

    def forward(self, views, labels=None) -> StepOutput:
        z1, z2 = self.projector(self.backbone(views[0])), self.projector(self.backbone(views[1]))
        loss = losses.barlow_twins(z1, z2, self.params.lambda_offdiag)
        return StepOutput(loss, embeddings=z1.detach())
