"""Counting visual primitives (Noroozi, Pirsiavash & Favaro, ICCV 2017): the whole counts what its parts count.

A counting vector phi(x) >= 0 (backbone -> linear -> ReLU, 1000 "primitives" in the paper) must be
invariant to scale and additive over tiles: the counts of an image downsampled by 2, D(x), equal the sum
of the counts of its four tiles T_1..T_4(x), each the same size as D(x). The trivial solution phi = 0 is
ruled out by a contrastive term with another image y (here: the next image of the batch):

    l(x, y) = ||phi(D(x)) - sum_j phi(T_j(x))||^2 + max(0, M - ||phi(D(y)) - sum_j phi(T_j(x))||^2),  M = 10.

Against a shortcut through the downsampling filter, D uses a filter drawn per image among bilinear,
bicubic (both antialiased) and area averaging (the paper draws among bilinear, bicubic, Lanczos and area;
torch has no Lanczos). The five inputs of an image (D(x) and four tiles) go through the backbone in one
batch at half the view's side.

``view_scale`` enlarges the view before it is cut, so that D(x) and the tiles can be as large as the images the
encoder is later evaluated on (at 32 px and scale 1 they are 16 px).

Defaults: 1000 counts, M = 10 (the paper). Views: crop (scale 0.2-1, ours) + flip. Optimizer: Adam, lr
1e-4 (a public re-implementation that reproduces the paper's AlexNet numbers, ahmdtaha/tf_learning_to_count;
the paper's own schedule is for Caffe), here AdamW with weight decay 1e-4 (ours).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from replab.methods import losses, registry
from replab.methods._pretext import VIEW_SCALE_RANGE, fit_to_backbone, view_side
from replab.methods.base import Method, OptimizerDefaults, StepOutput
from replab.platform.data.augment import ViewSpec


@dataclass
class CountingParams:
    count_dim: int = 1000
    margin: float = 10.0
    crop_scale_min: float = 0.2
    view_scale: float = field(default=1.0, metadata=VIEW_SCALE_RANGE)
    """The view's side over the resolution (``_pretext.view_side``): at 1, D(x) and the tiles are 16 px at 32 px
    (the paper's are 114 px); at 2 they are as large as the images the encoder is evaluated on."""


def random_downsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` resized to ``size`` with a filter drawn per image: bilinear, bicubic (antialiased) or area."""
    candidates = torch.stack([
        F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False),
        F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False),
        F.interpolate(x, size=(size, size), mode="area"),
    ])  # [3, B, C, s, s]
    choice = torch.randint(len(candidates), (x.shape[0],), device=x.device)
    return candidates[choice, torch.arange(x.shape[0], device=x.device)]


def quadrants(x: torch.Tensor) -> torch.Tensor:
    """The four non-overlapping tiles ``[4, B, C, H/2, W/2]`` of ``x`` (row-major)."""
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    return torch.stack([x[..., :h, :w], x[..., :h, w:2 * w], x[..., h:2 * h, :w], x[..., h:2 * h, w:2 * w]])


@registry.register
class Counting(Method):
    name = "counting"
    summary = "pretext: counts of the downsampled image = sum of its tiles' counts (Noroozi et al. 2017)"
    Params = CountingParams
    optimizer = OptimizerDefaults(name="adamw", lr=1e-4, weight_decay=1e-4)

    def __init__(self, backbone, params: CountingParams, resolution: int):
        super().__init__(backbone, params, resolution)
        self.counter = nn.Sequential(nn.Linear(backbone.out_dim, params.count_dim), nn.ReLU())

    def views(self) -> list[ViewSpec]:
        size = view_side(self.resolution, self.params.view_scale, multiple=2)  # four tiles cover it
        return [ViewSpec(size=size, scale=(self.params.crop_scale_min, 1.0), jitter_p=0.0, grayscale_p=0.0)]

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        return self.counter(self.backbone(fit_to_backbone(x, self.backbone)))

    def forward(self, views, labels=None) -> StepOutput:
        x = views[0]
        n = x.shape[0]
        tiles = quadrants(x)  # [4, B, C, s, s]
        downsampled = random_downsample(x, tiles.shape[-1])
        counts = self.phi(torch.cat([downsampled, tiles.flatten(0, 1)]))  # one pass over the 5B inputs
        image, tiles_sum = counts[:n], counts[n:].view(4, n, -1).sum(dim=0)
        other = image.roll(1, dims=0)  # phi(D(y)) for y = another image of the batch
        loss = losses.counting(image, tiles_sum, other, self.params.margin)
        equivariance = (image - tiles_sum).detach().pow(2).sum(dim=1).mean()
        metrics = {"count_mean": image.detach().mean(), "equivariance": equivariance}
        return StepOutput(loss, metrics=metrics, embeddings=image.detach())
