"""SimSiam (Chen & He, CVPR 2021): predict one view's projection from the other's, with a stop-gradient.

encoder f -> projector (BN on every layer, the output's without affine) -> predictor h (bottleneck MLP);
    loss = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2,   D = negative cosine similarity.
No negatives, no momentum encoder: the stop-gradient alone prevents collapse.

Defaults: the paper's CIFAR-10 setting (Appendix D: ResNet-18 variant, 2-layer projector with 2048-d
output, predictor bottleneck 512, SGD lr 0.03 per 256, wd 5e-4, momentum 0.9). ImageNet (Sec. 4 and
facebookresearch/simsiam): ``proj_layers=3``, SGD lr 0.05 per 256, wd 1e-4 (and a fixed learning rate
for the predictor, which is not implemented here). Augmentation: MoCo v2's (crop 0.2-1).
"""

from __future__ import annotations

from dataclasses import dataclass

from replab.methods import losses, registry
from replab.methods.base import Method, OptimizerDefaults, StepOutput
from replab.methods.mocov2 import moco_v2_view
from replab.models.heads import mlp
from replab.platform.data.augment import ViewSpec


@dataclass
class SimSiamParams:
    proj_hidden_dim: int = 2048
    proj_dim: int = 2048
    proj_layers: int = 2
    """2 on CIFAR, 3 on ImageNet."""
    pred_hidden_dim: int = 512


@registry.register
class SimSiam(Method):
    name = "simsiam"
    summary = "distillation: predict the other view's projection under a stop-gradient (Chen & He 2021)"
    Params = SimSiamParams
    optimizer = OptimizerDefaults(name="sgd", lr=0.03, weight_decay=5e-4)
    recipes = {"cpu": ("train.lr=0.12",)}
    """cpu: base learning rate 0.12 (0.06 at batch 128, lightly's CIFAR-10 SimSiam rate) instead of the paper's
    CIFAR 0.03: kNN 0.314 at the CPU reference budget (random init 0.270; docs/RESULTS.md)."""

    def __init__(self, backbone, params: SimSiamParams, resolution: int):
        super().__init__(backbone, params, resolution)
        self.projector = mlp(backbone.out_dim, params.proj_hidden_dim, params.proj_dim, params.proj_layers,
                             last_bn=True)
        self.predictor = mlp(params.proj_dim, params.pred_hidden_dim, params.proj_dim, 2)

    def views(self) -> list[ViewSpec]:
        return [moco_v2_view(self.resolution)] * 2

    def forward(self, views, labels=None) -> StepOutput:
        z1, z2 = self.projector(self.backbone(views[0])), self.projector(self.backbone(views[1]))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = losses.negative_cosine(p1, z2) / 2 + losses.negative_cosine(p2, z1) / 2  # stop-grad inside
        return StepOutput(loss, embeddings=z1.detach())
