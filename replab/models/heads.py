"""Projection / prediction heads: the MLPs of SimCLR, BYOL, MoCo, Barlow Twins, VICReg, DINO, ...

``mlp(in_dim, hidden_dim, out_dim, layers, ...)`` builds ``layers`` linear layers with BatchNorm + ReLU
between them (the SimCLR v2 / BYOL / Barlow Twins form); ``last_bn`` adds a BatchNorm without affine after
the output (SimSiam, MoCo v3).
"""

from __future__ import annotations

from torch import nn


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    layers: int = 2,
    batch_norm: bool = True,
    last_bn: bool = False,
    activation: type[nn.Module] = nn.ReLU,
    bias: bool = True,
) -> nn.Sequential:
    """``layers`` Linear layers: ``Linear -> [BN] -> act`` for the hidden ones, a plain Linear at the end."""
    if layers < 1:
        raise ValueError("an MLP head needs at least one layer")
    modules: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        modules.append(nn.Linear(dim, hidden_dim, bias=bias and not batch_norm))
        if batch_norm:
            modules.append(nn.BatchNorm1d(hidden_dim))
        modules.append(activation())
        dim = hidden_dim
    modules.append(nn.Linear(dim, out_dim, bias=bias and not last_bn))
    if last_bn:
        modules.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*modules)
