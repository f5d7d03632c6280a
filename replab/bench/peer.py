"""``bench --only peer``: replab's SimCLR loop against the same configuration written as lightly's SimCLR example
(per-image transforms in DataLoader workers + the same ResNet-18 CIFAR-stem model + NT-Xent). Uses the real
``lightly`` transforms and loss when importable, else a torchvision re-creation of them.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from replab.bench.augment import PILViews, dataloader, torchvision_transform
from replab.bench.common import cores, interleaved, ratio
from replab.bench.step import direct_run, step_overrides


def lightly_baseline(size: int) -> tuple[Callable, Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str]:
    """(per-image two-view transform, NT-Xent loss, description) of lightly's SimCLR CIFAR-10 example."""
    try:
        import lightly
        from lightly.loss import NTXentLoss
        from lightly.transforms import SimCLRTransform

        transform = SimCLRTransform(input_size=size, gaussian_blur=0.0)
        return transform, NTXentLoss(temperature=0.5), f"lightly {lightly.__version__} (SimCLRTransform, NTXentLoss)"
    except ImportError:
        from replab.methods import losses
        from replab.methods.simclr import simclr_view

        t = torchvision_transform(simclr_view(size))
        return (lambda im: [t(im), t(im)], lambda a, b: losses.nt_xent(a, b, 0.5),
                "torchvision re-creation of lightly's SimCLRTransform + NT-Xent (lightly not importable)")


def bench_peer(root: str, quick: bool, device: torch.device, repeats: int) -> dict[str, Any]:
    """replab's loop vs lightly's SimCLR example pipeline on the same model, batch and images.

    The baseline runs as lightly's example is written (fp32, contiguous tensors); where replab's default
    precision picks bf16 (a GPU, or a CPU with native bf16), a second baseline adds bf16 autocast and
    channels_last to lightly's loop by hand, so the table shows how much of the gap is the data path
    (batched views on the trainer's device vs per-image transforms in workers) and how much the precision.
    """
    from replab.platform.data.arrays import load_arrays
    from replab.platform.probes.frozen import autocast_context
    from replab.platform.train.loop import build_method, optimizer_settings, use_bf16
    from replab.validate import load_config

    batch = 64 if quick else 256
    steps = 2
    ov = step_overrides(quick, batch=batch, steps=steps)
    n = batch * steps
    images, labels = load_arrays("cifar10", root, "train", 32, limit=n, seed=0)
    transform, loss_fn, baseline = lightly_baseline(32)
    loader = dataloader(PILViews(images, labels, transform, multi=True), batch, cores())
    cfg = load_config(None, ov)
    replab_bf16 = use_bf16(cfg.train.precision, device)

    def lightly_style(bf16_channels_last: bool):
        def run():
            torch.manual_seed(0)
            method = build_method(cfg).to(device)
            if bf16_channels_last:
                method = method.to(memory_format=torch.channels_last)
            _, lr, wd = optimizer_settings(cfg, method)
            opt = torch.optim.SGD(method.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
            times = []
            for epoch in range(2):  # epoch 1 warms up, epoch 2 is timed, as in train_worker
                t = time.perf_counter()
                for views, _ in loader:
                    x0, x1 = views[0].to(device), views[1].to(device)
                    if bf16_channels_last:
                        x0, x1 = (x.contiguous(memory_format=torch.channels_last) for x in (x0, x1))
                    with autocast_context(device, bf16_channels_last):
                        z0 = method.projector(method.backbone(x0))
                        z1 = method.projector(method.backbone(x1))
                        loss = loss_fn(z0, z1)
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                loss.item()
                times.append(time.perf_counter() - t)
            return steps * batch / times[-1]
        return run

    def replab_loop():
        rate, _ = direct_run(ov, images, labels, device)
        return rate

    cases = {"replab": replab_loop, "lightly_style": lightly_style(False)}
    if replab_bf16:
        cases["lightly_style_bf16_channels_last"] = lightly_style(True)
    rates = interleaved(cases, repeats)
    del loader
    r = ratio(rates["replab"]["median"], rates["lightly_style"]["median"])
    out = {"baseline": baseline, "config": ov, "batch": batch, "steps_timed": steps, "device": str(device),
           "replab_precision": "bf16 autocast + channels_last" if replab_bf16 else "fp32 + channels_last",
           "dataloader_workers": cores(), "images_per_sec": rates, "ratio_replab_over_lightly_style": r,
           "target_ratio": 1.5, "meets_target": bool(r is not None and r >= 1.5)}
    if replab_bf16:
        out["ratio_replab_over_lightly_style_bf16_channels_last"] = ratio(
            rates["replab"]["median"], rates["lightly_style_bf16_channels_last"]["median"])
    return out
