"""SimCLR (Chen et al., ICML 2020): contrast two augmented views of each image against the batch.

encoder f -> projector g (2-layer MLP) -> NT-Xent over the 2N views of the global batch.
CIFAR-scale defaults follow the paper's CIFAR-10 appendix (B.9) and the lightly benchmark: temperature 0.5,
128-d output, SGD with momentum; strong colour jitter (strength 0.5 on CIFAR: 0.4/0.4/0.4/0.1), no blur
below 64 px.
"""

from __future__ import annotations

from dataclasses import dataclass

from replab.methods import losses, registry
from replab.methods.base import Method, OptimizerDefaults, StepOutput
from replab.models.heads import mlp
from replab.platform.data.augment import ViewSpec


@dataclass
class SimCLRParams:
    temperature: float = 0.5
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    proj_layers: int = 2


def simclr_view(resolution: int) -> ViewSpec:
    """SimCLR's augmentation: crop 0.08-1, flip, jitter 0.8, grayscale 0.2, blur 0.5 from 64 px up."""
    return ViewSpec(size=resolution, scale=(0.08, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4,
                    saturation=0.4, hue=0.1, grayscale_p=0.2, blur_p=0.5 if resolution >= 64 else 0.0)


@registry.register
class SimCLR(Method):
    name = "simclr"
    summary = "contrastive: NT-Xent between two views over the batch (Chen et al. 2020)"
    Params = SimCLRParams
    optimizer = OptimizerDefaults(name="sgd", lr=0.12, weight_decay=5e-4)
    recipes = {"cpu": ("method.proj_hidden_dim=512",)}
    """cpu: the projector narrowed for a 128-d CPU encoder (docs/RESULTS.md, the CPU reference budget)."""

    def __init__(self, backbone, params: SimCLRParams, resolution: int):
        super().__init__(backbone, params, resolution)
        self.projector = mlp(backbone.out_dim, params.proj_hidden_dim, params.proj_dim, params.proj_layers)

    def views(self) -> list[ViewSpec]:
        return [simclr_view(self.resolution)] * 2

    def forward(self, views, labels=None) -> StepOutput:
        h1, h2 = self.backbone(views[0]), self.backbone(views[1])
        z1, z2 = self.projector(h1), self.projector(h2)
        loss = losses.nt_xent(z1, z2, self.params.temperature)
        return StepOutput(loss, embeddings=z1.detach())
