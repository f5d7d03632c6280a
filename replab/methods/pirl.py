"""PIRL (Misra & van der Maaten, CVPR 2020): pretext-invariant representations; an image and its jigsaw
puzzle must embed alike, contrasted against a memory bank of the pool's embeddings.

    f(v_I)  = normalize(W_f backbone(I))                                     (the image, augmented)
    g(v_It) = normalize(W_g [ W_t backbone(tile_p(1)); ...; W_t backbone(tile_p(9)) ])  (3x3 tiles, random order p)
    h(u, v) = (exp(u . v / tau) / Z) / (exp(u . v / tau) / Z + N / |D|)       (Eq. 3: NCE, noise uniform on the bank)
    L_NCE(m_I, v) = -log h(m_I, v) - sum_{I' in D_N} log(1 - h(m_I', v))      (Eq. 4; N negatives from the bank)
    L = lambda L_NCE(m_I, g(v_It)) + (1 - lambda) L_NCE(m_I, f(v_I))          (Eq. 5)

Z is the partition function of the model distribution exp(s)/Z over the |D| bank rows, fixed at the first
training step as |D| x the mean of exp(s) over that step's scores (the reference code: VISSL's ``NCEAverage``
with ``norm_constant: -1``, after lemniscate's). Eq. 3 of the paper leaves Z out; without it h is ~1 for every
bank row (exp(1/0.07) ~ 1e6 against N/|D| < 1), the negatives' term dominates, and training collapses (every
f(v_I) and bank row align: the loss grows to ~N x 14).

m_I is the memory-bank row of image I, an exponential moving average of its past f(v_I):
m_I <- normalize(0.5 m_I + 0.5 f(v_I)) after each step; the N negatives are bank rows drawn uniformly.
The batch carries no row index, so I's bank row is a hash of its pixels (Exemplar's scheme,
:func:`~replab.methods._pretext.image_slots`; ``memory_size`` slots, rare collisions merge two images).
The batch's ids and embeddings are gathered before the bank update, so every worker holds the same bank.

Tiles: Jigsaw's (:mod:`replab.methods.jigsaw`): a 3 x 3 grid of cells, one tile of 64/85 of a cell at a
random place in each (64 px tiles from 85 px cells of a 255 px crop in the paper), each normalised by its
own statistics. The paper's per-tile augmentation (independent colour jitter and flips per tile) is not done.

``loss="cross_entropy"`` is the reference code's other loss (VISSL ``loss_type: cross_entropy``, "InfoNCE"): the
softmax cross entropy of the positive among itself and the N negatives, -log(exp(s_pos) / (exp(s_pos) +
sum_n exp(s_n))) with s = u . v / tau, which needs no partition function.

Defaults (the paper): NCE, tau 0.07, lambda 0.5, 32,000 negatives, bank momentum 0.5, 128-d embeddings, SGD lr
0.12 at batch 1024 (0.03 per 256), weight decay 1e-4. The ``cpu`` recipe is InfoNCE (measured: NCE collapses there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from replab.methods import registry
from replab.methods._pretext import crop_tiles, fit_to_backbone, grid_corners, hash_coefficients, image_slots
from replab.methods.base import Method, OptimizerDefaults, StepOutput
from replab.methods.distributed import gather
from replab.methods.jigsaw import normalize_tiles
from replab.platform.data.augment import ViewSpec


@dataclass
class PIRLParams:
    temperature: float = 0.07
    loss_lambda: float = 0.5
    """Weight of the jigsaw term; 1 - lambda on the image term."""
    num_negatives: int = 32000
    memory_size: int = 50000
    memory_momentum: float = 0.5
    proj_dim: int = 128
    tile_fraction: float = 64 / 85
    loss: Literal["nce", "cross_entropy"] = "nce"
    """The paper's NCE (Eq. 4) or the reference code's InfoNCE alternative (softmax over positive + negatives)."""


def nce_scores(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_pos [B], s_neg [B, N]): ``anchor . positive / tau`` per row and ``positive . negatives / tau``, in
    float32."""
    with torch.autocast(anchor.device.type, enabled=False):
        pos = (anchor.float() * positive.float()).sum(dim=1) / temperature
        neg = positive.float() @ negatives.float().T / temperature
    return pos, neg


def log_partition(pos: torch.Tensor, neg: torch.Tensor, memory_size: int) -> torch.Tensor:
    """log Z = log(|D| x mean of exp(s) over every score of the step), the lemniscate / VISSL estimate."""
    scores = torch.cat([pos.reshape(-1), neg.reshape(-1)]).detach()
    return torch.logsumexp(scores, dim=0) - math.log(scores.numel()) + math.log(memory_size)


def pirl_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, temperature: float,
             noise_ratio: float, log_z: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Mean over the batch of Eq. 4 with unit ``anchor`` ``[B, D]`` (the bank rows m_I), ``positive`` ``[B, D]``
    and ``negatives`` ``[N, D]`` (bank rows m_I'), c = N / |D| = ``noise_ratio``:
    -log h(m_I, v) - sum_n log(1 - h(m_n, v)), with log h = s' - logaddexp(s', log c), log(1 - h) = log c -
    logaddexp(s', log c) for the normalised score s' = u . v / tau - log Z."""
    log_c = math.log(noise_ratio)
    pos, neg = nce_scores(anchor, positive, negatives, temperature)
    pos, neg = pos - log_z, neg - log_z
    c = torch.full_like(pos, log_c)
    loss_pos = -(pos - torch.logaddexp(pos, c))
    loss_neg = -(log_c - torch.logaddexp(neg, c.unsqueeze(1))).sum(dim=1)
    return (loss_pos + loss_neg).mean()


def pirl_info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """Mean over the batch of -log softmax(s)_0 over s = [m_I . v, m_n . v for the N negatives] / tau."""
    pos, neg = nce_scores(anchor, positive, negatives, temperature)
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


@registry.register
class PIRL(Method):
    name = "pirl"
    summary = "contrastive: image vs its jigsaw tiles, NCE against a memory bank (Misra & van der Maaten 2020)"
    Params = PIRLParams
    optimizer = OptimizerDefaults(name="sgd", lr=0.03, weight_decay=1e-4)
    recipes = {"cpu": ("method.loss=cross_entropy",)}
    """cpu: the reference code's InfoNCE loss instead of the paper's NCE: at the CPU reference budget kNN 0.302 vs
    0.190 (random init 0.270; with NCE every image embedding and bank row align, docs/RESULTS.md)."""

    def __init__(self, backbone, params: PIRLParams, resolution: int):
        super().__init__(backbone, params, resolution)
        p, dim = params, backbone.out_dim
        cell = resolution // 3
        self.tile = max(1, int(cell * p.tile_fraction))
        self.jitter = (cell - self.tile) // 2
        self.image_head = nn.Linear(dim, p.proj_dim)  # W_f
        self.tile_head = nn.Linear(dim, p.proj_dim)  # W_t, per tile
        self.jigsaw_head = nn.Linear(9 * p.proj_dim, p.proj_dim)  # W_g on the concatenated tiles
        seeded = torch.Generator().manual_seed(0)
        self.register_buffer("memory", F.normalize(torch.randn(p.memory_size, p.proj_dim, generator=seeded), dim=1))
        self.register_buffer("hash_coefficients", hash_coefficients(), persistent=False)
        self.register_buffer("log_z", torch.tensor(float("nan")))  # log Z, set at the first training step
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def views(self) -> list[ViewSpec]:
        aug = ViewSpec(size=self.resolution, scale=(0.2, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4,
                       saturation=0.4, hue=0.1, grayscale_p=0.2)
        return [aug, aug, ViewSpec.plain(self.resolution)]  # image, puzzle source, id

    def jigsaw_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """g(v_It): the nine tiles of ``x`` embedded alone, concatenated in a random order per image."""
        n = x.shape[0]
        corners = grid_corners(n, x.shape[-1], self.tile, self.jitter, x.device)
        tiles = normalize_tiles(crop_tiles(x, corners, self.tile))  # [B, 9, C, t, t]
        order = torch.argsort(torch.rand(n, 9, device=x.device), dim=1)
        tiles = tiles.gather(1, order.view(n, 9, 1, 1, 1).expand_as(tiles))
        per_tile = self.tile_head(self.backbone(fit_to_backbone(tiles.flatten(0, 1), self.backbone)))
        return F.normalize(self.jigsaw_head(per_tile.view(n, -1)).float(), dim=1)

    def forward(self, views, labels=None) -> StepOutput:
        p = self.params
        ids = image_slots(views[2], self.hash_coefficients, p.memory_size)
        f = F.normalize(self.image_head(self.backbone(views[0])).float(), dim=1)
        g = self.jigsaw_embedding(views[1])
        m_i = self.memory[ids].float()
        negatives = self.memory[torch.randint(p.memory_size, (p.num_negatives,), device=f.device)]
        loss_jigsaw, loss_image = (self.bank_loss(m_i, v, negatives) for v in (g, f))
        loss = p.loss_lambda * loss_jigsaw + (1 - p.loss_lambda) * loss_image
        if self.training:  # applied after the optimizer step
            self._pending = (gather(ids), gather(f.detach()))
        metrics = {"loss_jigsaw": loss_jigsaw.detach(), "loss_image": loss_image.detach(),
                   "image_jigsaw_cos": (f * g).sum(dim=1).mean().detach()}
        return StepOutput(loss, metrics=metrics, embeddings=f.detach())

    def bank_loss(self, m_i: torch.Tensor, v: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """L(m_I, v): the paper's NCE (Z fixed at the first training step) or InfoNCE (``loss``)."""
        p = self.params
        if p.loss == "cross_entropy":
            return pirl_info_nce(m_i, v, negatives, p.temperature)
        if torch.isnan(self.log_z) and self.training:
            log_z = log_partition(*nce_scores(m_i, v, negatives, p.temperature), p.memory_size)
            every = gather(log_z.view(1))  # one Z on every worker: the mean of theirs
            self.log_z.copy_(torch.logsumexp(every, dim=0) - math.log(every.numel()))
        log_z = 0.0 if torch.isnan(self.log_z) else self.log_z
        return pirl_nce(m_i, v, negatives, p.temperature, p.num_negatives / p.memory_size, log_z)

    @torch.no_grad()
    def update_teacher(self) -> None:
        """m_I <- normalize(m m_I + (1 - m) f(v_I)) for the (gathered) batch's images."""
        if self._pending is None:
            return
        ids, f = self._pending
        self._pending = None
        m = self.params.memory_momentum
        self.memory.index_copy_(0, ids, F.normalize(m * self.memory[ids] + (1 - m) * f.to(self.memory.dtype), dim=1))
