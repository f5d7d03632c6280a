"""Collapse, seen while it happens: the signals of a collapsing encoder, and one warning when they agree.

Signals, on the L2-normalised ``[B, D]`` embeddings a method returns with each step (``StepOutput.embeddings``):

- ``train/embedding_std``: the mean over dimensions of the batch std. Healthy embeddings spread over the sphere
  sit near ``1/sqrt(D)``; a collapsed encoder maps every image to one point and gives 0.
- ``train/embedding_rank``: the effective rank ``exp(H(p))`` with ``p = s / sum(s)`` the normalised singular
  values of the centred batch (Roy & Vetterli 2007; RankMe, Garrido et al. 2023). Between 1 and ``min(B, D)``;
  dimensional collapse (a few directions only) shows here before the std falls.
- Distillation methods also report the student-teacher divergence as ``kl`` (DINO: the loss is
  ``H(P_t) + KL(P_t || P_s)``): a KL of ~0 with a teacher entropy of ~``log K`` is the uniform collapse.

:class:`CollapseMonitor` calls a run collapsed when, over :data:`PATIENCE` consecutive logging steps, the
normalised std ``std * sqrt(D)`` is below :data:`STD_FLOOR`, or the effective rank is below :data:`RANK_FLOOR`
(in directions), or ``kl`` is below :data:`KL_FLOOR`; it says so once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

STD_FLOOR = 0.05
RANK_FLOOR = 2.0
KL_FLOOR = 1e-4
PATIENCE = 3


@torch.no_grad()
def embedding_signals(z: torch.Tensor) -> dict[str, float]:
    """``train/embedding_std`` and ``train/embedding_rank`` of a ``[B, D]`` batch (see the module docstring)."""
    z = F.normalize(z.float().flatten(1), dim=1)
    std = z.std(dim=0).mean().item()
    s = torch.linalg.svdvals(z - z.mean(dim=0, keepdim=True))
    p = s / s.sum().clamp_min(1e-12)
    rank = math.exp(-(p * torch.log(p.clamp_min(1e-12))).sum().item()) if s.sum() > 1e-9 else 1.0
    return {"train/embedding_std": std, "train/embedding_rank": rank}


class CollapseMonitor:
    """Feed it each logging step's metrics; :meth:`update` returns a one-line warning the first time the
    signals have pointed to collapse for :data:`PATIENCE` steps in a row, else None."""

    def __init__(self, patience: int = PATIENCE):
        self.patience = patience
        self.streak = 0
        self.warned = False

    @staticmethod
    def reason(metrics: dict[str, float], dim: int) -> str | None:
        std = metrics.get("train/embedding_std")
        if std is not None and std * math.sqrt(dim) < STD_FLOOR:
            return f"embedding std {std:.2g} is {std * math.sqrt(dim):.2g}x that of spread-out embeddings"
        rank = metrics.get("train/embedding_rank")
        if rank is not None and rank < RANK_FLOOR:
            return f"the embeddings span {rank:.2f} effective directions"
        kl = metrics.get("train/kl")
        if kl is not None and kl < KL_FLOOR:
            return f"the student matches the teacher (KL {kl:.1e}): uniform or constant output"
        return None

    def update(self, metrics: dict[str, float], dim: int, step: int) -> str | None:
        why = self.reason(metrics, dim)
        self.streak = self.streak + 1 if why else 0
        if why and self.streak >= self.patience and not self.warned:
            self.warned = True
            return f"warning: the encoder looks collapsed at step {step}: {why} (for {self.streak} logging steps)"
        return None
