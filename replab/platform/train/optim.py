"""Optimizers (SGD, LARS, AdamW) and the warm-up + cosine learning-rate schedule.

The base learning rate is given for a global batch of 256 and scaled linearly: lr = base_lr * B / 256
(Goyal et al. 2017; the rule SimCLR, BYOL, MoCo and DINO state their rates with).
"""

from __future__ import annotations

import math

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as used by SimCLR / BYOL.

    For each parameter w with gradient g (weight decay folded in: g <- g + wd * w):
        trust = eta * ||w|| / ||g||   (1 when either norm is 0)
        v <- m * v + trust * g;   w <- w - lr * v
    Groups with ``lars_exclude=True`` (biases, norm weights) skip the adaptation and the weight decay.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["lars_exclude"]:
                    if group["weight_decay"]:
                        grad = grad.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm)
                    )
                    grad = grad.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(
    name: str, groups: list[dict], lr: float, momentum: float, betas: tuple[float, float], fused: bool
) -> torch.optim.Optimizer:
    """``name`` in sgd | lars | adamw over parameter ``groups`` (each with its weight_decay)."""
    if name == "sgd":
        clean = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]
        return torch.optim.SGD(clean, lr=lr, momentum=momentum, fused=fused or None, foreach=None if fused else True)
    if name == "adamw":
        clean = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]
        return torch.optim.AdamW(clean, lr=lr, betas=betas, fused=fused or None, foreach=None if fused else True)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    raise ValueError(f"train.optimizer: {name!r} is not valid; choose one of: sgd, lars, adamw")


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr_ratio: float = 0.0) -> float:
    """Linear warm-up to ``peak_lr`` over ``warmup_steps``, then cosine decay to ``min_lr_ratio * peak_lr``.

        lr(t) = peak * t / T_w                                        for t < T_w
        lr(t) = peak * (r + (1 - r) * (1 + cos(pi * (t - T_w) / (T - T_w))) / 2)   otherwise
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
