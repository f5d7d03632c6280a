"""Helpers shared by the pretext-task methods (MAE, Jigsaw, relative patch location, colorization,
inpainting, Exemplar, counting): pixels back from normalised views, tiles cut from a grid, and spatial
features from either backbone family. Not a method (the registry skips modules starting with ``_``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from replab.models.backbones import is_vit
from replab.platform.data.augment import IMAGENET_MEAN, IMAGENET_STD


VIEW_SCALE_RANGE = {"range": (1.0, 4.0, False)}
"""``metadata`` of a tile task's ``view_scale`` parameter (see :func:`view_side`)."""


def view_side(resolution: int, view_scale: float, multiple: int = 1) -> int:
    """Side of a tile task's view: the crop resized to ``resolution * view_scale`` (a multiple of ``multiple``).

    A tile task cuts its tiles from the view, so at 32 px they are 7-16 px wide while the encoder is later read
    on whole 32 px images; ``view_scale`` 2 makes each tile about half (jigsaw, relative patch) or all (counting)
    of the evaluation image's side, at about ``view_scale**2`` the compute.
    """
    return max(multiple, multiple * round(resolution * view_scale / multiple))


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    """Undo the views' ImageNet normalisation: ``x * std + mean``, pixels in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return x * std + mean


def spatial_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, out_dim, h, w]``: a ResNet's last feature map, or a ViT's patch tokens laid out on their grid."""
    if is_vit(backbone):
        tokens = backbone.tokens(fit_to_backbone(x, backbone))[:, 1:]  # drop the class token
        side = math.isqrt(tokens.shape[1])
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
    return backbone.feature_map(x)


def fit_to_backbone(x: torch.Tensor, backbone: nn.Module) -> torch.Tensor:
    """Tiles for a ViT must be a whole number of patches: resize to the nearest multiple (ResNets: as is)."""
    if not is_vit(backbone):
        return x
    p = backbone.patch_size
    side = max(p, round(x.shape[-1] / p) * p)
    if side == x.shape[-1] and side == x.shape[-2]:
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


def grid_corners(n: int, size: int, tile: int, jitter: int, device, grid: int = 3) -> torch.Tensor:
    """Top-left corners ``[n, grid * grid, 2]`` (row, col) of one ``tile``-px square per cell of a grid.

    The image of side ``size`` is split into ``grid x grid`` cells of side ``size // grid`` (centred); each
    tile sits at its cell's centre moved by an integer offset uniform in [-jitter, jitter] per axis, so
    neighbouring tiles are separated by a random gap and never overlap (jitter is capped to fit the cell).
    Cells are numbered row-major: 0 1 2 / 3 4 5 / 6 7 8.
    """
    cell = size // grid
    if tile > cell:
        raise ValueError(f"a {tile}-px tile does not fit a {cell}-px cell")
    jitter = min(jitter, (cell - tile) // 2)
    margin = (size - grid * cell) // 2
    idx = torch.arange(grid, device=device)
    rows, cols = torch.meshgrid(idx, idx, indexing="ij")
    base = torch.stack([rows.flatten(), cols.flatten()], dim=1) * cell + margin + (cell - tile) // 2
    offset = torch.randint(-jitter, jitter + 1, (n, grid * grid, 2), device=device)
    return base.unsqueeze(0) + offset


def crop_tiles(x: torch.Tensor, corners: torch.Tensor, tile: int) -> torch.Tensor:
    """Cut ``[B, K, C, tile, tile]`` squares from ``x`` ``[B, C, H, W]`` at the corners ``[B, K, 2]`` (row, col)."""
    n, k = corners.shape[:2]
    steps = torch.arange(tile, device=x.device)
    rows = (corners[..., 0:1] + steps).view(n, k, tile, 1)
    cols = (corners[..., 1:2] + steps).view(n, k, 1, tile)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    return x.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 1, 4, 2, 3)  # [B, K, t, t, C] -> [B, K, C, t, t]


HASH_SIDE, HASH_LEVELS, HASH_PRIME = 8, 32, 2**31 - 1


def hash_coefficients(seed: int = 0) -> torch.Tensor:
    """The fixed random coefficients ``[3 * 8 * 8]`` of :func:`image_slots`' universal hash (same everywhere)."""
    return torch.randint(1, HASH_PRIME, (3 * HASH_SIDE * HASH_SIDE,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def image_slots(plain: torch.Tensor, coefficients: torch.Tensor, slots: int) -> torch.Tensor:
    """A stable slot ``[B]`` in ``0 .. slots-1`` per image from its plain (normalised) view, for memory banks
    when batches carry no row index (Exemplar's scheme): the view averaged to 8 x 8, [0, 1] pixels quantised
    to 32 levels, the 192 integers hashed as ((sum_k a_k q_k) mod (2^31 - 1)) mod slots."""
    pixels = F.adaptive_avg_pool2d(unnormalize(plain.float()).clamp(0, 1), HASH_SIDE)
    levels = torch.round(pixels * (HASH_LEVELS - 1)).long().flatten(1)
    return (levels * coefficients).sum(dim=1) % HASH_PRIME % slots
