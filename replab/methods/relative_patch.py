"""Relative patch location (Doersch, Gupta & Efros, ICCV 2015): where is this patch relative to the centre one?

- Patches: the view is split into a 3x3 grid; the centre patch and one of its 8 neighbours (drawn at
  random per image) are cut out. The paper uses 96 px patches with 48 px gaps, each moved by up to 7 px;
  here the patch side is 96/144 of the grid pitch and each patch is moved by up to 7/144 of it (at least
  1 px, within its cell), so the two never overlap and are separated by a gap that varies from image to
  image: neither continuing edges nor a fixed gap gives the answer away.
- Chromatic aberration (lenses shift the colour channels towards the image centre, which gives a patch's
  absolute position away): ``chromatic="drop"`` (default) is the paper's colour dropping, two of the three
  channels of every patch are replaced by Gaussian noise of 1/100 the standard deviation of the kept one;
  ``"project"`` is the paper's other remedy, projecting every pixel onto the plane orthogonal to the
  green-magenta axis a = (-1, 2, -1) (done on [0, 1] RGB, so grey is unchanged); ``"none"`` does neither.
  The paper's third counter-measure, randomly downsampling patches to ~100 pixels, is moot at 32 px.
- Network: the shared (siamese) backbone embeds each patch, fc6 per patch, the two are concatenated
  (centre first), fc7 and an 8-way classifier. Loss: cross entropy over the 8 positions, numbered
  row-major 0 1 2 / 3 . 4 / 5 6 7.

Defaults: the paper's geometry and colour dropping, 4096-wide fully connected layers as in its AlexNet-style
heads; crop (scale 0.5-1, ours) + flip, no colour jitter. Optimizer: SGD, lr 0.1 per 256, weight decay 5e-4
(the platform's pretext-task setting, as RotNet; the paper trained a Caffe AlexNet with its own schedule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from replab.methods import registry
from replab.methods._pretext import VIEW_SCALE_RANGE, crop_tiles, fit_to_backbone, grid_corners, unnormalize, view_side
from replab.methods.base import Method, OptimizerDefaults, StepOutput
from replab.platform.data.augment import ViewSpec, normalize


@dataclass
class RelativePatchParams:
    patch_fraction: float = 96 / 144
    """Patch side as a fraction of the grid pitch (96 px patches, 48 px gaps in the paper)."""
    jitter_fraction: float = 7 / 144
    """Largest random shift of each patch, as a fraction of the pitch (7 px in the paper; at least 1 px)."""
    chromatic: Literal["drop", "project", "none"] = "drop"
    patch_dim: int = 4096
    """Per-patch fully connected layer (fc6)."""
    hidden_dim: int = 4096
    """Fully connected layer on the concatenated pair (fc7)."""
    crop_scale_min: float = 0.5
    view_scale: float = field(default=1.0, metadata=VIEW_SCALE_RANGE)
    """The view's side over the resolution (``_pretext.view_side``): at 32 px and 1 the patches are 7 px (the
    paper's 96 px); at 2 they are 14 px."""


def drop_colours(patches: torch.Tensor) -> torch.Tensor:
    """Keep one random channel of each patch ``[M, 3, p, p]``; the other two become Gaussian noise with 1/100
    of the kept channel's standard deviation (Doersch et al. 2015, Sec. 3.1, "color dropping")."""
    m = patches.shape[0]
    keep = torch.randint(3, (m,), device=patches.device)
    kept = patches[torch.arange(m, device=patches.device), keep]  # [M, p, p]
    noise = torch.randn_like(patches) * kept.flatten(1).std(dim=1).view(m, 1, 1, 1) / 100
    return torch.where(F.one_hot(keep, 3).bool().view(m, 3, 1, 1), patches, noise)


def project_colours(patches: torch.Tensor) -> torch.Tensor:
    """Remove the green-magenta component of every pixel: x <- (I - a a^T / a^T a) x, a = (-1, 2, -1)."""
    rgb = unnormalize(patches)
    a = torch.tensor([-1.0, 2.0, -1.0], device=patches.device, dtype=patches.dtype).view(1, 3, 1, 1) / 6**0.5
    return normalize(rgb - (rgb * a).sum(dim=1, keepdim=True) * a)


@registry.register
class RelativePatch(Method):
    name = "relative_patch"
    summary = "pretext: which of 8 neighbours a patch is relative to the centre (Doersch et al. 2015)"
    Params = RelativePatchParams
    optimizer = OptimizerDefaults(name="sgd", lr=0.1, weight_decay=5e-4)

    def __init__(self, backbone, params: RelativePatchParams, resolution: int):
        super().__init__(backbone, params, resolution)
        self.side = view_side(resolution, params.view_scale)
        pitch = self.side // 3
        self.patch = max(1, round(pitch * params.patch_fraction))
        self.jitter = max(1, round(pitch * params.jitter_fraction))
        self.patch_fc = nn.Sequential(nn.Linear(backbone.out_dim, params.patch_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(
            nn.Linear(2 * params.patch_dim, params.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(params.hidden_dim, 8),
        )

    def views(self) -> list[ViewSpec]:
        return [ViewSpec(size=self.side, scale=(self.params.crop_scale_min, 1.0), jitter_p=0.0, grayscale_p=0.0)]

    def forward(self, views, labels=None) -> StepOutput:
        x = views[0]
        n, rows = x.shape[0], torch.arange(x.shape[0], device=x.device)
        corners = grid_corners(n, x.shape[-1], self.patch, self.jitter, x.device)
        patches = crop_tiles(x, corners, self.patch)  # [B, 9, C, p, p], cell 4 is the centre
        targets = torch.randint(8, (n,), device=x.device)
        neighbour = targets + (targets >= 4).long()  # positions 0..7 -> cells 0..3, 5..8
        pair = torch.cat([patches[:, 4], patches[rows, neighbour]])  # [2B, C, p, p]: centres, then neighbours
        if self.params.chromatic == "drop":
            pair = drop_colours(pair)
        elif self.params.chromatic == "project":
            pair = project_colours(pair)
        features = self.backbone(fit_to_backbone(pair, self.backbone))
        h = self.patch_fc(features)
        logits = self.classifier(torch.cat([h[:n], h[n:]], dim=1))
        loss = F.cross_entropy(logits.float(), targets)
        accuracy = (logits.argmax(dim=1) == targets).float().mean()
        return StepOutput(loss, metrics={"location_acc": accuracy.detach()}, embeddings=features[:n].detach())
