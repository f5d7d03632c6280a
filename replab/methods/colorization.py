"""Colorization (Zhang, Isola & Efros, ECCV 2016): predict the colours (ab) of a photo from its lightness (L).

- Colour space: sRGB (D65) -> CIE Lab with the exact formulas (sRGB gamma, the sRGB-to-XYZ D65 matrix, the
  cube-root f with its linear toe), batched in torch; :func:`lab_to_rgb` inverts it.
- Input: the lightness L / 100 replicated to 3 channels and normalised like every other view, so the
  backbone keeps its 3-channel stem and is evaluated on colour images unchanged (the paper's network
  takes the 1-channel L; replication is the usual way to reuse a standard encoder).
- Output: ab quantised on a grid of side 10, keeping the bins the sRGB gamut reaches (261 bins, from a
  64^3 RGB lattice; the paper's own gamut estimate has 313). A small head on the backbone's spatial features
  (``feature_map`` of a ResNet, patch tokens of a ViT) upsamples them to 1/4 of the input side (the
  paper predicts at 1/4 too), then conv3x3-BN-ReLU and a 1x1 conv to the Q bin logits.
- Target: the view's ab downsampled (area) to the output side, soft-encoded over its 5 nearest bins with
  Gaussian weights of sigma 5 (the paper's soft encoding; ``soft_neighbours=1`` gives hard labels).
- Loss: multinomial cross entropy with class rebalancing (Eq. 2-4): each pixel is weighted by w of its
  nearest bin, w proportional to ((1 - lambda) p~ + lambda / Q)^-1 with lambda 0.5, normalised so that
  E_p~[w] = 1, where p~ is the empirical bin distribution smoothed by a Gaussian of sigma 5 in ab space.
  The paper estimates p from all of ImageNet beforehand; here it is estimated online: the counts of the
  nearest bins of every training pixel so far (summed over workers) live in the buffer ``bin_counts``, so
  the first step uses its own batch's distribution and the estimate converges to the dataset's. The counts
  are saved with the checkpoint.

Defaults: the paper's (grid 10, 5 neighbours, sigma 5, lambda 0.5, crops of 176 of 256 px with flips).
Optimizer: the paper's Adam (betas 0.9, 0.99, weight decay 1e-3, lr 3e-5 at batch 40), here AdamW with the
lr scaled linearly to a batch of 256: 3e-5 * 256 / 40 = 1.92e-4.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from replab.methods import losses, registry
from replab.methods._pretext import spatial_features
from replab.methods.base import Method, OptimizerDefaults, StepOutput
from replab.methods.distributed import all_reduce_sum
from replab.platform.data.augment import ViewSpec, normalize

# Linear sRGB -> XYZ under D65 (as in OpenCV and scikit-image); the white point is its row sums, so that
# white has a = b = 0 exactly.
RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
DELTA = 6 / 29


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB ``[B, 3, H, W]`` in [0, 1] -> CIE Lab ``[B, 3, H, W]`` (L in [0, 100], a and b roughly +-110).

    linear c = ((c + 0.055) / 1.055)^2.4 above 0.04045 else c / 12.92;  (X, Y, Z) = M c / white;
    f(t) = t^(1/3) above (6/29)^3 else t / (3 (6/29)^2) + 4/29;
    L = 116 f(Y) - 16,  a = 500 (f(X) - f(Y)),  b = 200 (f(Y) - f(Z)).
    """
    rgb = rgb.float()
    m = torch.tensor(RGB_TO_XYZ, device=rgb.device)
    linear = torch.where(rgb > 0.04045, ((rgb.clamp(min=0) + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = torch.einsum("ij,bjhw->bihw", m, linear) / m.sum(dim=1).view(1, 3, 1, 1)
    f = torch.where(xyz > DELTA**3, xyz.clamp(min=DELTA**3) ** (1 / 3), xyz / (3 * DELTA**2) + 4 / 29)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_lab` (not clipped to the gamut)."""
    lab = lab.float()
    m = torch.tensor(RGB_TO_XYZ, device=lab.device)
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], dim=1)
    xyz = torch.where(f > DELTA, f**3, 3 * DELTA**2 * (f - 4 / 29)) * m.sum(dim=1).view(1, 3, 1, 1)
    linear = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(m), xyz)
    return torch.where(linear > 0.0031308, 1.055 * linear.clamp(min=0) ** (1 / 2.4) - 0.055, 12.92 * linear)


@functools.lru_cache(maxsize=None)
def _gamut_bins(grid: float) -> tuple[tuple[float, float], ...]:
    v = torch.linspace(0, 1, 64)
    rgb = torch.stack(torch.meshgrid(v, v, v, indexing="ij")).reshape(1, 3, -1, 1)
    ab = rgb_to_lab(rgb)[0, 1:, :, 0]  # [2, 64^3]
    cells = torch.unique(torch.round(ab / grid).T, dim=0)  # sorted by a, then b
    return tuple(map(tuple, (cells * grid).tolist()))


def ab_gamut_bins(grid: float = 10.0) -> torch.Tensor:
    """``[Q, 2]`` centres of the ab grid cells (side ``grid``) that in-gamut sRGB colours fall in."""
    return torch.tensor(_gamut_bins(grid))


@dataclass
class ColorizationParams:
    grid_size: float = 10.0
    soft_neighbours: int = 5
    """Soft-encode each target over its k nearest bins (1: hard labels)."""
    soft_sigma: float = 5.0
    rebalance_lambda: float = 0.5
    prior_sigma: float = 5.0
    """Gaussian smoothing of the empirical bin distribution, in ab units."""
    out_stride: int = 4
    """Predict ab at 1/out_stride of the input side."""
    head_dim: int = 256
    crop_scale: float = (176 / 256) ** 2
    """Area of the square training crop (176 px of 256 in the paper)."""


@registry.register
class Colorization(Method):
    name = "colorization"
    summary = "pretext: predict quantised ab colours from lightness, class-rebalanced (Zhang et al. 2016)"
    Params = ColorizationParams
    optimizer = OptimizerDefaults(name="adamw", lr=1.92e-4, weight_decay=1e-3, betas=(0.9, 0.99))

    def __init__(self, backbone, params: ColorizationParams, resolution: int):
        super().__init__(backbone, params, resolution)
        centres = ab_gamut_bins(params.grid_size)
        self.num_bins = len(centres)
        self.out_size = max(1, resolution // params.out_stride)
        self.register_buffer("bin_centres", centres, persistent=False)
        kernel = torch.exp(-torch.cdist(centres, centres) ** 2 / (2 * params.prior_sigma**2))
        self.register_buffer("prior_kernel", kernel, persistent=False)
        self.register_buffer("bin_counts", torch.zeros(self.num_bins, dtype=torch.float64))
        self.head = nn.Sequential(
            nn.Conv2d(backbone.out_dim, params.head_dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(params.head_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(params.head_dim, self.num_bins, 1),
        )

    def views(self) -> list[ViewSpec]:
        scale = self.params.crop_scale
        return [ViewSpec(size=self.resolution, scale=(scale, scale), ratio=(1.0, 1.0), jitter_p=0.0,
                         grayscale_p=0.0, normalize=False)]  # raw [0, 1] pixels: the colours are the target

    def encode(self, ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ab ``[B, 2, h, w]`` -> soft targets ``[B, Q, h, w]`` over the k nearest bins, and the nearest bin
        ``[B, h, w]``."""
        n, _, h, w = ab.shape
        d2 = torch.cdist(ab.permute(0, 2, 3, 1).reshape(-1, 2), self.bin_centres) ** 2  # [B*h*w, Q]
        dist, nearest = d2.topk(self.params.soft_neighbours, dim=1, largest=False)
        weights = torch.softmax(-dist / (2 * self.params.soft_sigma**2), dim=1)  # Gaussian, normalised
        soft = torch.zeros_like(d2).scatter_(1, nearest, weights)
        return soft.view(n, h, w, -1).permute(0, 3, 1, 2), nearest[:, 0].view(n, h, w)

    @torch.no_grad()
    def class_weights(self, nearest: torch.Tensor) -> torch.Tensor:
        """Eq. 4 from the running bin counts (updated with this batch when training)."""
        if self.training:
            counts = torch.bincount(nearest.flatten(), minlength=self.num_bins).to(self.bin_counts.dtype)
            self.bin_counts += all_reduce_sum(counts)
        if self.bin_counts.sum() == 0:
            return torch.ones(self.num_bins, device=nearest.device)
        empirical = (self.bin_counts / self.bin_counts.sum()).float()
        prior = (self.prior_kernel * empirical).sum(dim=1)  # Gaussian smoothing (elementwise: fp32 under autocast)
        return losses.colorization_weights(prior, self.params.rebalance_lambda)

    def forward(self, views, labels=None) -> StepOutput:
        lab = rgb_to_lab(views[0])
        lightness = normalize((lab[:, :1] / 100).expand(-1, 3, -1, -1))
        features = spatial_features(self.backbone, lightness)
        logits = self.head(F.interpolate(features, size=self.out_size, mode="bilinear", align_corners=False))
        ab = F.interpolate(lab[:, 1:], size=self.out_size, mode="area")
        soft, nearest = self.encode(ab)
        loss = losses.colorization(logits, soft, self.class_weights(nearest))
        accuracy = (logits.argmax(dim=1) == nearest).float().mean()
        return StepOutput(loss, metrics={"bin_acc": accuracy.detach()}, embeddings=features.mean(dim=(2, 3)).detach())
