"""``bench --only gpu``: on CUDA (or ``--device cpu``): MFU (FlopCounterMode FLOPs of one step over the measured
bf16 matmul rate) and images/s for ResNet-18@32, ResNet-50@224, ViT-S/16@224 (MAE, DINO) and ViT-B/16@224
(MAE) with bf16 / channels_last / fused optimizer each switched off in turn, all off, and compiled.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import torch

from replab.bench.common import interleaved, mib, ratio, sync


def fixed_step(overrides: list[str], images: torch.Tensor, *, bf16: bool = False, channels_last: bool = False,
               compile: bool | str = False, fused: bool | None = None, steps: int = 1, seed: int = 0,
               device: str | torch.device = "cpu") -> dict[str, Any]:
    """Losses of ``steps`` training steps on one fixed batch with fixed views (seeded), one switch set.

    ``compile``: True = ``torch.compile`` (inductor), a string = that ``torch.compile`` backend (e.g.
    ``"aot_eager"``: the same graph capture and AOT autograd without code generation).
    ``fused``: True = fused optimizer kernel, False = foreach, None = the plain per-parameter loop. Returns
    ``{"losses": [...], "params": flat parameter vector after the steps, "flops": FLOPs of step 1}``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from replab.platform.data.augment import make_views
    from replab.platform.probes.frozen import autocast_context
    from replab.platform.train import optim
    from replab.platform.train.loop import build_method, optimizer_settings
    from replab.validate import load_config

    device = torch.device(device)
    cfg = load_config(None, overrides)
    torch.manual_seed(seed)
    method = build_method(cfg).to(device)
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    name, lr, wd = optimizer_settings(cfg, method)
    groups = method.parameter_groups(wd)
    if fused is None and name in ("sgd", "adamw"):
        clean = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]
        opt = (torch.optim.SGD(clean, lr=lr, momentum=method.optimizer.momentum, foreach=False) if name == "sgd"
               else torch.optim.AdamW(clean, lr=lr, betas=method.optimizer.betas, foreach=False))
    else:
        opt = optim.build_optimizer(name, groups, lr, method.optimizer.momentum, method.optimizer.betas,
                                    fused=bool(fused))
    if compile:
        model = torch.compile(method, backend=compile) if isinstance(compile, str) else torch.compile(method)
    else:
        model = method
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        views = make_views(images.to(device), method.views(), generator=gen)
    if channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    losses, flops = [], None
    method.train()
    for i in range(steps):
        counter = FlopCounterMode(display=False) if (i == 0 and not compile) else contextlib.nullcontext()
        with counter:
            with autocast_context(device, bf16):
                out = model(views, None)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
        if isinstance(counter, FlopCounterMode):
            flops = counter.get_total_flops()
        opt.step()
        method.update_teacher()
        losses.append(float(out.loss.detach()))
    params = torch.cat([p.detach().float().flatten().cpu() for p in method.parameters()])
    return {"losses": losses, "params": params, "flops": flops}


def matmul_peak_flops(device: torch.device, dtype=torch.bfloat16, n: int = 8192, iters: int = 20) -> float:
    """Measured dense matmul FLOP/s on ``device`` (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t)


GPU_MODELS = {  # the targets first: a run stopped by its time limit keeps them
    "simclr_resnet18_32px": (["method.name=simclr", "model.backbone=resnet18", "model.cifar_stem=on",
                              "data.resolution=32"], 512),
    "mae_vit_base16_224px": (["method.name=mae", "model.backbone=vit_base", "model.patch_size=16",
                              "data.resolution=224"], 128),
    "simclr_resnet50_224px": (["method.name=simclr", "model.backbone=resnet50", "data.resolution=224"], 128),
    "mae_vit_small16_224px": (["method.name=mae", "model.backbone=vit_small", "model.patch_size=16",
                               "data.resolution=224"], 128),
    "dino_vit_small16_224px": (["method.name=dino", "model.backbone=vit_small", "model.patch_size=16",
                                "data.resolution=224"], 64),
}


SWITCHES = ("bf16", "channels_last", "compile", "fused")


EAGER_ON = {"bf16": True, "channels_last": True, "compile": False, "fused": True}


GPU_VARIANTS = {
    "all_on": {**EAGER_ON, "compile": True},
    "eager": EAGER_ON,  # = all_on with compile off
    "no_bf16": {**EAGER_ON, "bf16": False},
    "no_channels_last": {**EAGER_ON, "channels_last": False},
    "no_fused": {**EAGER_ON, "fused": False},
    "all_off": dict.fromkeys(SWITCHES, False),
}
"""Each switch off in turn from the eager all-on set (compile is measured once, as all_on vs eager: every
compiled variant costs a compile of tens of seconds per model)."""


def _gpu_rate(overrides, batch, device, switches: dict[str, bool], steps: int) -> tuple[float, float]:
    """(images/s, FLOPs per step) of the training step with the given switches, on random uint8 images."""
    from replab.platform.data.augment import make_views
    from replab.platform.probes.frozen import autocast_context
    from replab.platform.train import optim
    from replab.platform.train.loop import build_method, optimizer_settings
    from replab.validate import load_config

    cfg = load_config(None, overrides + [f"train.batch_size={batch}"])
    res = cfg.data.resolution
    torch.manual_seed(0)
    method = build_method(cfg).to(device)
    if switches["channels_last"]:
        method = method.to(memory_format=torch.channels_last)
    name, lr, wd = optimizer_settings(cfg, method)
    opt = optim.build_optimizer(name, method.parameter_groups(wd), lr, method.optimizer.momentum,
                                method.optimizer.betas, fused=switches["fused"])
    if switches["compile"]:
        torch._dynamo.reset()  # a fresh model each case: without this Dynamo recompiles until its cache limit
    model = torch.compile(method) if switches["compile"] else method
    images = torch.randint(0, 256, (batch, res, res, 3), dtype=torch.uint8, device=device)
    specs = method.views()
    flops = 0.0

    def one(count_flops=False):
        nonlocal flops
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad():
            views = make_views(images, specs)
            if switches["channels_last"]:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        ctx = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
        with ctx:
            with autocast_context(device, switches["bf16"]):
                out = model(views, None)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
        if count_flops:
            flops = float(ctx.get_total_flops())
        opt.step()
        method.update_teacher()

    if not switches["compile"]:
        one(count_flops=True)
    for _ in range(3):
        one()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        one()
    sync(device)
    return steps * batch / (time.perf_counter() - t), flops


def bench_gpu(quick: bool, repeats: int, device: torch.device | None = None, models: dict | None = None,
              on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """MFU and images/s per model and switch set; ``on_update`` gets the partial result after each model
    (a long run on a lent GPU keeps what it measured if it is stopped). ``device``/``models`` let the tests
    run the same code on the CPU with small models."""
    if device is None:
        if not torch.cuda.is_available():
            return {"skipped": "no GPU: torch.cuda.is_available() is False; MFU and GPU images/s not measured"}
        device = torch.device("cuda")
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    peak = matmul_peak_flops(device, n=8192 if on_gpu else 512, iters=20 if on_gpu else 2)
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if on_gpu else str(device),
        "bf16_matmul_tflops": round(peak / 1e12, 3), "variants": dict(GPU_VARIANTS),
        "mfu_definition": "FlopCounterMode FLOPs of one eager step (forward + backward) x steps/s / bf16 matmul rate",
    }
    steps = 5 if quick else 20
    for name, (ov, batch) in (models or GPU_MODELS).items():
        flops_per_step: dict[str, float] = {}
        peak_mib: dict[str, float] = {}

        def case(sw, key, ov=ov, batch=batch, flops_per_step=flops_per_step, peak_mib=peak_mib):
            def run():
                if on_gpu:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                rate, flops = _gpu_rate(ov, batch, device, sw, steps)
                if flops:
                    flops_per_step[key] = flops
                if on_gpu:
                    peak_mib[key] = max(peak_mib.get(key, 0.0), mib(torch.cuda.max_memory_allocated()))
                return rate
            return run

        rates = interleaved({k: case(sw, k) for k, sw in GPU_VARIANTS.items()}, repeats)
        flops = flops_per_step.get("eager") or flops_per_step.get("all_off") or 0.0
        entry = {"batch": batch, "images_per_sec": rates, "flops_per_step": flops, "peak_memory_mib": peak_mib}
        entry["mfu"] = {k: round(flops * (v["median"] / batch) / peak, 4) for k, v in rates.items()} if flops else None
        entry["speedup_all_on_over_all_off"] = ratio(rates["all_on"]["median"], rates["all_off"]["median"])
        entry["speedup_compile"] = ratio(rates["all_on"]["median"], rates["eager"]["median"])
        out[name] = entry
        if on_update:
            on_update(out)
    return out
