import math

import torch
import torch.nn.functional as F

from replab.methods import losses


def direct_nt_xent(z1, z2, t):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(z[i] @ z[k] / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(z[i] @ z[j] / t) / denom)
    return total / (2 * n)


def test_nt_xent_matches_formula():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert abs(losses.nt_xent(z1, z2, 0.5).item() - direct_nt_xent(z1, z2, 0.5)) < 1e-4


def test_nt_xent_prefers_matching_views():
    z = torch.randn(32, 16)
    aligned = losses.nt_xent(z, z + 0.01 * torch.randn_like(z), 0.1)
    shuffled = losses.nt_xent(z, z[torch.randperm(32)], 0.1)
    assert aligned < shuffled


def test_negative_cosine_formula_and_minimum():
    p, z = torch.randn(8, 4), torch.randn(8, 4)
    direct = -sum((p[i] @ z[i]) / (p[i].norm() * z[i].norm()) for i in range(8)) / 8
    assert abs(losses.negative_cosine(p, z).item() - direct.item()) < 1e-5
    assert abs(losses.negative_cosine(z, 3 * z).item() + 1) < 1e-6
    p.requires_grad_(True)
    zz = z.clone().requires_grad_(True)
    losses.negative_cosine(p, zz).backward()
    assert zz.grad is None or torch.count_nonzero(zz.grad) == 0  # stop-gradient on the target


def test_rotation_cross_entropy():
    logits = torch.randn(8, 4)
    y = torch.randint(0, 4, (8,))
    direct = -torch.log_softmax(logits, 1)[torch.arange(8), y].mean()
    assert torch.allclose(losses.rotation_cross_entropy(logits, y), direct)
