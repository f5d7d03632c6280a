"""Split-brain autoencoder (Zhang, Isola & Efros, CVPR 2017): cross-channel prediction with two half-networks.

The image in CIE Lab (colorization's exact conversion) is split into its lightness L and its colour ab:

    F_1: L  -> ab    (colourisation)       F_2: ab -> L    (the reverse)
    loss = CE(F_1(L), q_ab(ab)) + CE(F_2(ab), q_L(L))         (classification over quantised bins, per pixel)
    the representation: F(x) = [F_1(L), F_2(ab)]  (the two halves' features concatenated)

- Halves: the given backbone is F_1; F_2 is a second backbone of the same architecture, freshly initialised
  (the paper splits one network's channels in two halves; here each half is a whole backbone, so the
  encoder has twice the parameters and twice the feature width of the other methods' encoders).
- Inputs keep the backbones' 3-channel stems: L / 100 replicated to 3 channels, ab / 110 in 2 channels with a
  third channel of zeros, then the usual normalisation.
- Outputs: like colorization, each half's spatial features (1/4 of the input side) go through conv3x3-BN-ReLU
  and a 1x1 conv to bin logits. ab: colorization's gamut bins on a grid of 10 (261 bins; the paper's 313);
  L: 100 bins of width 1. Targets are the nearest bin of the area-downsampled channels; plain cross entropy
  (colorization's class rebalancing is not applied).

Defaults: colorization's crops (176 of 256 px), Adam lr 3e-5 at batch 40 as colorization (scaled:
1.92e-4 per 256), weight decay 1e-3, head width 256. CPU variant: ``head_dim=64``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from replab.methods import registry
from replab.methods._pretext import spatial_features, unnormalize
from replab.methods.base import Method, OptimizerDefaults, StepOutput
from replab.methods.colorization import ab_gamut_bins, rgb_to_lab
from replab.platform.data.augment import ViewSpec, normalize


@dataclass
class SplitBrainParams:
    grid_size: float = 10.0
    """Side of the ab bins."""
    lightness_bins: int = 100
    out_stride: int = 4
    head_dim: int = 256
    crop_scale: float = (176 / 256) ** 2


def lab_inputs(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L input, ab input) for 3-channel stems: L / 100 replicated; (a / 110, b / 110, 0); both normalised."""
    lightness = normalize((lab[:, :1] / 100).expand(-1, 3, -1, -1))
    ab = normalize(torch.cat([lab[:, 1:] / 110, torch.zeros_like(lab[:, :1])], dim=1))
    return lightness, ab


def bin_head(in_dim: int, hidden: int, bins: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_dim, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                         nn.ReLU(inplace=True), nn.Conv2d(hidden, bins, 1))


def fresh_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s architecture with every layer re-initialised."""
    clone = copy.deepcopy(module)
    for layer in clone.modules():
        if hasattr(layer, "reset_parameters") and layer is not clone:
            layer.reset_parameters()
    return clone


class SplitBrainEncoder(nn.Module):
    """The evaluated encoder: an ImageNet-normalised RGB batch -> Lab -> [F_1(L), F_2(ab)] ``[B, 2 D]``."""

    def __init__(self, lightness_net: nn.Module, colour_net: nn.Module):
        super().__init__()
        self.lightness_net, self.colour_net = lightness_net, colour_net
        self.out_dim = 2 * lightness_net.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lightness, ab = lab_inputs(rgb_to_lab(unnormalize(x.float()).clamp(0, 1)))
        return torch.cat([self.lightness_net(lightness.to(x.dtype)), self.colour_net(ab.to(x.dtype))], dim=1)


@registry.register
class SplitBrain(Method):
    name = "split_brain"
    summary = "pretext: two half-networks predict L -> ab and ab -> L, features concatenated (Zhang et al. 2017)"
    Params = SplitBrainParams
    optimizer = OptimizerDefaults(name="adamw", lr=1.92e-4, weight_decay=1e-3, betas=(0.9, 0.99))

    def __init__(self, backbone, params: SplitBrainParams, resolution: int):
        super().__init__(backbone, params, resolution)
        self.colour_backbone = fresh_copy(backbone)  # F_2: ab -> L
        self.out_size = max(1, resolution // params.out_stride)
        self.register_buffer("ab_centres", ab_gamut_bins(params.grid_size), persistent=False)
        self.ab_head = bin_head(backbone.out_dim, params.head_dim, len(self.ab_centres))
        self.l_head = bin_head(backbone.out_dim, params.head_dim, params.lightness_bins)

    @property
    def encoder(self) -> nn.Module:
        return SplitBrainEncoder(self.backbone, self.colour_backbone)  # a view on the two halves, not a copy

    def views(self) -> list[ViewSpec]:
        scale = self.params.crop_scale
        return [ViewSpec(size=self.resolution, scale=(scale, scale), ratio=(1.0, 1.0), jitter_p=0.0,
                         grayscale_p=0.0, normalize=False)]  # raw [0, 1] pixels: the channels are the targets

    def _logits(self, net: nn.Module, head: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = spatial_features(net, x)
        up = F.interpolate(features, size=self.out_size, mode="bilinear", align_corners=False)
        return head(up), features.mean(dim=(2, 3))

    def forward(self, views, labels=None) -> StepOutput:
        lab = rgb_to_lab(views[0])
        lightness, ab = lab_inputs(lab)
        ab_logits, f1 = self._logits(self.backbone, self.ab_head, lightness)
        l_logits, f2 = self._logits(self.colour_backbone, self.l_head, ab)
        small = F.interpolate(lab, size=self.out_size, mode="area")
        n, _, h, w = small.shape
        ab_target = torch.cdist(small[:, 1:].permute(0, 2, 3, 1).reshape(-1, 2), self.ab_centres).argmin(dim=1)
        ab_target = ab_target.view(n, h, w)
        l_target = (small[:, 0] / 100 * self.params.lightness_bins).long().clamp(0, self.params.lightness_bins - 1)
        loss_ab = F.cross_entropy(ab_logits.float(), ab_target)
        loss_l = F.cross_entropy(l_logits.float(), l_target)
        metrics = {"loss_ab": loss_ab.detach(), "loss_l": loss_l.detach(),
                   "ab_acc": (ab_logits.argmax(dim=1) == ab_target).float().mean().detach(),
                   "l_acc": (l_logits.argmax(dim=1) == l_target).float().mean().detach()}
        return StepOutput(loss_ab + loss_l, metrics=metrics, embeddings=torch.cat([f1, f2], dim=1).detach())
