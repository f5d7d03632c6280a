"""Collectives for losses that need the global batch; identities when not distributed."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every worker along dim 0, rank order; gradients flow back to each worker.

    The backward of ``torch.distributed.nn.functional.all_gather`` sums the gradients of every worker's
    (identical) loss into each worker's slice, W times dL/dx_local; DDP then averages over the W workers,
    so the parameter gradient equals that of one worker holding the whole global batch, unscaled.
    """
    if world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every worker along dim 0 (no gradient)."""
    if world_size() == 1:
        return x
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x)
    return torch.cat(out, dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over workers in place (no gradient); returns it."""
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(x)
        x /= world_size()
    return x


def local_slice(n_local: int) -> slice:
    """The rows of a gathered batch that belong to this worker."""
    start = rank() * n_local
    return slice(start, start + n_local)


def global_mean(local_sum: torch.Tensor, local_count: int) -> torch.Tensor:
    """The mean of per-sample terms over every worker, given this worker's sum of its terms.

    Not distributed: ``local_sum / local_count``. Distributed: the value is the global mean (identical on
    every worker) and the gradient on this worker is W * d(local_sum) / count_global, which DDP's averaging
    over W workers turns into the gradient of the global mean. Terms may depend on other workers' rows
    through :func:`gather_with_grad`; its summed backward keeps this exact.
    """
    w = world_size()
    if w == 1:
        return local_sum / local_count
    total = all_reduce_sum(local_sum.detach().clone())
    count = local_count * w
    return (total + w * (local_sum - local_sum.detach())) / count
