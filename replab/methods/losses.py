"""Self-supervised losses as pure functions, each with the paper's definition.

Inputs are this worker's embeddings; losses over the global batch gather across workers themselves
(:func:`replab.methods.distributed.gather_with_grad`), so a loss on W workers with B/W rows each has the
same value and gradient as on one worker with B rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from replab.methods.distributed import gather_with_grad, global_mean, local_slice


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalized-temperature cross entropy (Chen et al. 2020, Eq. 1), mean over all 2N anchors.

    With u = normalize(z) over the 2N views of the global batch and s_ij = u_i . u_j / tau,

        l(i, j) = -log( exp(s_ij) / sum_{k != i} exp(s_ik) ),    L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)]

    where j is the other view of the same image. Each worker computes the rows of its own anchors against
    all 2N candidates and the mean is taken over the global 2N anchors.
    """
    n_local = z1.shape[0]
    u1, u2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    g1, g2 = gather_with_grad(u1), gather_with_grad(u2)
    n = g1.shape[0]
    candidates = torch.cat([g1, g2], dim=0)  # [2N, D]
    anchors = torch.cat([u1, u2], dim=0)  # [2n, D], this worker's anchors
    logits = anchors @ candidates.T / temperature  # [2n, 2N]
    rows = local_slice(n_local)
    idx = torch.arange(rows.start, rows.stop, device=z1.device)
    self_idx = torch.cat([idx, idx + n])
    positive_idx = torch.cat([idx + n, idx])
    logits = logits.masked_fill(F.one_hot(self_idx, 2 * n).bool(), float("-inf"))
    loss_sum = F.cross_entropy(logits, positive_idx, reduction="sum")
    return global_mean(loss_sum, 2 * n_local)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity with a stopped-gradient target (SimSiam Eq. 1; BYOL Eq. 2 up to 2 - 2x).

        D(p, z) = - mean_i  p_i / ||p_i|| . sg(z_i) / ||z_i||

    Minimum -1 when every prediction points along its target.
    """
    return -(F.normalize(p.float(), dim=1) * F.normalize(z.detach().float(), dim=1)).sum(dim=1).mean()


def rotation_cross_entropy(logits: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """RotNet (Gidaris et al. 2018, Eq. 2): -1/N sum_i log softmax(F(R_{y_i}(x_i)))[y_i], y in {0,1,2,3}."""
    return F.cross_entropy(logits.float(), rotations)
