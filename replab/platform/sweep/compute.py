"""What a trial costs: encoder and total parameters, training FLOPs per step (``FlopCounterMode`` on one training
step of the method on a dummy batch of the global batch size, on the meta device), and the accelerator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from replab.config import RunConfig


def count_compute(cfg: RunConfig) -> dict[str, Any]:
    """Parameters and FLOPs of one training step (forward + backward) of the method at the global batch size.

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode` on the meta device (shapes only, no
    arithmetic), falling back to a real CPU step on a small batch scaled linearly when a method does
    something the meta device cannot (data-dependent control flow). Optimizer updates, augmentation and
    teacher updates are not counted (they are a few FLOPs per parameter, not per pixel).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from replab.methods.base import Support
    from replab.platform.train.loop import build_method

    batch = cfg.train.batch_size

    def one_step(device: str, b: int) -> tuple[float, Any]:
        with torch.device(device):
            torch.manual_seed(0)
            method = build_method(cfg)
            views = [torch.rand(b, 3, s.size, s.size) for s in method.views()]
            labels = torch.randint(0, 10, (b,))
            extra = {}
            spec = method.support()
            if spec is not None:  # semi-supervised methods also see a labeled support batch every step
                classes = spec.classes_per_step or len(cfg.data.known_classes or range(10))
                n = classes * spec.images_per_class
                extra["support"] = Support([torch.rand(n, 3, v.size, v.size) for v in spec.views],
                                           torch.arange(classes).repeat_interleave(spec.images_per_class))
        with FlopCounterMode(display=False) as counter:
            out = method(views, labels, **extra)
            out.loss.backward()
        return float(counter.get_total_flops()), method

    how = "meta"
    try:
        flops, method = one_step("meta", batch)
    except Exception:  # noqa: BLE001 - data-dependent ops: count a real small step on the CPU instead
        how = "cpu-extrapolated"
        small = max(2, min(8, batch))
        f1, method = one_step("cpu", small)
        f2, _ = one_step("cpu", 2 * small)
        per_image = (f2 - f1) / small
        flops = f1 + per_image * (batch - small)
    encoder = sum(p.numel() for p in method.encoder.parameters())
    total = sum(p.numel() for p in method.parameters())
    return {"params": int(encoder), "params_total": int(total), "flops_per_step": flops,
            "flops_per_image": flops / batch, "batch_size": batch, "counted_on": how}


def accelerator(cfg: RunConfig) -> str:
    """What the trial trains on, in words (``2x GPU:H100`` or the CPU model)."""
    import ray

    workers = max(cfg.train.num_workers, 1)
    if cfg.train.use_gpu:
        kinds = sorted(k.split(":", 1)[1] for k in ray.cluster_resources() if k.startswith("accelerator_type:"))
        return f"{workers}x GPU" + (f":{'/'.join(kinds)}" if kinds else "")
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{workers}x CPU ({cfg.train.cpus_per_worker:g} cores)" + (f" {model}" if model else "")
