"""VICReg (Bardes, Ponce & LeCun, ICLR 2022): Variance-Invariance-Covariance regularisation of the two views'
embeddings over the global batch.

encoder -> expander (3 Linear layers, BN + ReLU between) -> vicreg loss:
    L = 25 * mse(z1, z2) + 25 * [hinge on each dim's std at 1] + 1 * [squared off-diagonal covariances]

Defaults: the paper's coefficients (lambda = mu = 25, nu = 1; facebookresearch/vicreg) and optimizer (LARS,
base lr 0.2 per 256, wd 1e-6) with the expander narrowed from 8192-8192-8192 to 2048-2048-2048 for
CIFAR-scale runs (as solo-learn's CIFAR configuration; ``--set method.proj_dim=8192`` etc. for ImageNet).
Augmentation: BYOL's asymmetric pair (as the paper).
"""

from __future__ import annotations

from dataclasses import dataclass

from replab.methods import losses, registry
from replab.methods.base import Method, OptimizerDefaults, StepOutput
from replab.methods.byol import byol_views
from replab.models.heads import mlp
from replab.platform.data.augment import ViewSpec


@dataclass
class VICRegParams:
    inv_weight: float = 25.0
    var_weight: float = 25.0
    cov_weight: float = 1.0
    proj_hidden_dim: int = 2048
    proj_dim: int = 2048
    proj_layers: int = 3


@registry.register
class VICReg(Method):
    name = "vicreg"
    summary = "redundancy reduction: variance, invariance and covariance terms on the embeddings (Bardes et al. 2022)"
    Params = VICRegParams
    optimizer = OptimizerDefaults(name="lars", lr=0.2, weight_decay=1e-6)
    recipes = {"cpu": ("method.proj_dim=512", "method.proj_hidden_dim=512")}
    """cpu: the projector narrowed for a 128-d CPU encoder."""

    def __init__(self, backbone, params: VICRegParams, resolution: int):
        super().__init__(backbone, params, resolution)
        self.projector = mlp(backbone.out_dim, params.proj_hidden_dim, params.proj_dim, params.proj_layers, bias=False)

    def views(self) -> list[ViewSpec]:
        return byol_views(self.resolution)

    def forward(self, views, labels=None) -> StepOutput:
        z1, z2 = self.projector(self.backbone(views[0])), self.projector(self.backbone(views[1]))
        p = self.params
        loss = losses.vicreg(z1, z2, p.inv_weight, p.var_weight, p.cov_weight)
        return StepOutput(loss, embeddings=z1.detach())
