"""Jigsaw puzzles (Noroozi & Favaro, ECCV 2016): recognise which permutation shuffled an image's 3x3 tiles.

- Tiles: the view is split into a 3x3 grid of cells and one tile of 64/75 of a cell's side is cut at a
  random position in each (the paper: 64x64 tiles from 75x75 cells of a 225x225 crop), so tiles are
  separated by random gaps and edge continuity is no shortcut. Each tile is normalised by its own mean
  and standard deviation (against low-level statistics shortcuts) and 30% of the images are grey
  (against chromatic aberration), as in the paper.
- Puzzle: a permutation is drawn from a fixed set of ``num_permutations`` and the tiles are placed in that
  order; the label is the permutation's index.
- Network (context-free, siamese): the shared backbone embeds every tile alone, a per-tile layer (the
  paper's fc6, 1024 units) follows, the nine are concatenated in order, then fc7 (4096) and a classifier
  over the permutations (fc8). Loss: cross entropy.
- Permutation set: the paper's greedy Algorithm 1: start from a random permutation, then repeatedly add the
  one of the 9! farthest in Hamming distance from those chosen. The paper's "farthest" is the largest
  summed (average) distance, which for 100 permutations reaches an average of 8.08 but leaves pairs at
  distance 2 (a single swap); here "farthest" is the largest MINIMUM distance to the chosen set,
  ties broken by the largest summed distance: the same 8.08 average and a minimum distance of 6. Deterministic given ``permutation_seed``; computed once per
  process and cached (~3 s for 100, ~30 s for 1000).

Defaults: 100 permutations (the paper ablates the set's size and minimal/average distance; its final
model uses 1000), SGD with lr 0.01 (the paper's; per 256 here), weight decay 5e-4. The paper also jitters
each colour channel by up to 2 px per tile; that is not done here (the tiles at 32 px are ~8 px wide).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from replab.methods import registry
from replab.methods._pretext import VIEW_SCALE_RANGE, crop_tiles, fit_to_backbone, grid_corners, view_side
from replab.methods.base import Method, OptimizerDefaults, StepOutput
from replab.platform.data.augment import ViewSpec


@dataclass
class JigsawParams:
    num_permutations: int = 100
    permutation_seed: int = 0
    tile_fraction: float = 64 / 75
    """Tile side as a fraction of the grid cell's side (64 px tiles in 75 px cells in the paper)."""
    tile_dim: int = 1024
    """Per-tile fully connected layer (fc6)."""
    hidden_dim: int = 4096
    """fc7 on the nine concatenated tiles."""
    crop_scale: float = (225 / 256) ** 2
    """Area of the square crop the puzzle is cut from (225 px of 256 in the paper)."""
    grayscale_p: float = 0.3
    view_scale: float = field(default=1.0, metadata=VIEW_SCALE_RANGE)
    """The view's side over the resolution (``_pretext.view_side``): at 32 px and 1 the tiles are 8 px (the
    paper's 64 px); at 2 they are 17 px."""


@functools.lru_cache(maxsize=None)
def _hamming_set(count: int, seed: int, tiles: int = 9) -> np.ndarray:
    everything = np.array(list(itertools.permutations(range(tiles))), dtype=np.int8)  # [9!, 9]
    if not 1 <= count <= len(everything):
        raise ValueError(f"method.num_permutations: {count} must be between 1 and {len(everything)}")
    total = np.zeros(len(everything), dtype=np.int64)  # summed Hamming distance to the chosen set
    nearest = np.full(len(everything), tiles + 1, dtype=np.int64)  # minimum Hamming distance to it
    available = np.ones(len(everything), dtype=bool)
    chosen = []
    j = int(np.random.default_rng(seed).integers(len(everything)))
    for _ in range(count):
        chosen.append(j)
        available[j] = False
        distance = (everything != everything[j]).sum(axis=1)
        total += distance
        np.minimum(nearest, distance, out=nearest)
        score = nearest * (tiles * count + 1) + total  # max-min first, then max-sum
        j = int(np.where(available, score, -1).argmax())
    return everything[chosen]


def hamming_permutations(count: int = 100, seed: int = 0) -> torch.Tensor:
    """``[count, 9]`` permutations far apart in Hamming distance (Noroozi & Favaro's greedy Algorithm 1)."""
    return torch.from_numpy(_hamming_set(count, seed).astype(np.int64))


def normalize_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """Each tile ``[..., C, t, t]`` to zero mean and unit standard deviation over its own pixels."""
    mean = tiles.mean(dim=(-3, -2, -1), keepdim=True)
    std = tiles.std(dim=(-3, -2, -1), keepdim=True)
    return (tiles - mean) / (std + 1e-5)


@registry.register
class Jigsaw(Method):
    name = "jigsaw"
    summary = "pretext: which of N permutations shuffled the 3x3 tiles (Noroozi & Favaro 2016)"
    Params = JigsawParams
    optimizer = OptimizerDefaults(name="sgd", lr=0.01, weight_decay=5e-4)

    def __init__(self, backbone, params: JigsawParams, resolution: int):
        super().__init__(backbone, params, resolution)
        self.side = view_side(resolution, params.view_scale)
        cell = self.side // 3
        self.tile = max(1, int(cell * params.tile_fraction))
        self.jitter = (cell - self.tile) // 2  # the tile anywhere in its cell
        self.register_buffer("permutations", hamming_permutations(params.num_permutations, params.permutation_seed))
        self.tile_fc = nn.Sequential(nn.Linear(backbone.out_dim, params.tile_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(
            nn.Linear(9 * params.tile_dim, params.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(params.hidden_dim, params.num_permutations),
        )

    def views(self) -> list[ViewSpec]:
        scale = self.params.crop_scale
        return [ViewSpec(size=self.side, scale=(scale, scale), ratio=(1.0, 1.0), jitter_p=0.0,
                         grayscale_p=self.params.grayscale_p)]

    def forward(self, views, labels=None) -> StepOutput:
        x = views[0]
        n = x.shape[0]
        corners = grid_corners(n, x.shape[-1], self.tile, self.jitter, x.device)
        tiles = normalize_tiles(crop_tiles(x, corners, self.tile))  # [B, 9, C, t, t], row-major cells
        targets = torch.randint(len(self.permutations), (n,), device=x.device)
        order = self.permutations[targets]  # position i shows tile order[i]
        shuffled = tiles.gather(1, order.view(n, 9, 1, 1, 1).expand_as(tiles))
        features = self.backbone(fit_to_backbone(shuffled.flatten(0, 1), self.backbone))  # [9B, D], siamese
        logits = self.classifier(self.tile_fc(features).view(n, -1))  # tiles concatenated in order
        loss = F.cross_entropy(logits.float(), targets)
        accuracy = (logits.argmax(dim=1) == targets).float().mean()
        return StepOutput(loss, metrics={"jigsaw_acc": accuracy.detach()},
                          embeddings=features.view(n, 9, -1).mean(dim=1).detach())
