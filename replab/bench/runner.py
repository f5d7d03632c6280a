"""``replab bench``: throughput of every stage, compared side by side in one run.

Sections (``--only`` picks some; ``ray`` adds the Ray halves of ``data`` and ``step``): ``data``, ``augment``,
``step``, ``peer``, ``gpu``, ``epoch`` (one module each in :mod:`replab.bench`). Compared configurations are
always measured interleaved (A, B, A, B, ...) in the same process, and medians of the repeats are reported;
ratios are of medians. Results are written as JSON after every section (a run stopped by a time limit keeps
what it finished) and printed as a table.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from replab.bench.augment import bench_augment
from replab.bench.common import bench_data_root, cores, cpu_name
from replab.bench.data import bench_data
from replab.bench.epoch import bench_epoch
from replab.bench.gpu import GPU_MODELS, bench_gpu
from replab.bench.peer import bench_peer
from replab.bench.step import bench_step

SECTIONS = ("data", "augment", "step", "peer", "gpu", "epoch", "ray")


def run_bench(quick: bool = False, only: list[str] | None = None, out: str | None = None, root: str = "",
              repeats: int | None = None, device: str | None = None, threads: int | None = None,
              steps: int | None = None, models: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen sections; ``threads`` sets torch's intra-op threads in this process for the run
    (default: torch's own choice, 1 with ``quick``: on a shared, oversubscribed CPU OpenMP spin-waits make
    2 threads several times slower than 1). ``steps``: steps per timed epoch of the step / Ray cases (more
    steps amortise the per-epoch start of the input stream, as a real epoch does). ``models``: a subset of
    :data:`GPU_MODELS` for the gpu section; ``device="cpu"`` runs that section on the CPU."""
    previous_threads = torch.get_num_threads()
    if threads or quick:
        torch.set_num_threads(threads or 1)
    try:
        return _run(quick, only, out, root, repeats, device, steps, models)
    finally:
        torch.set_num_threads(previous_threads)


def _run(quick, only, out, root, repeats, device, steps=None, models=None) -> dict[str, Any]:
    chosen = list(only) if only else [s for s in SECTIONS if not (quick and s == "ray")]
    bad = [s for s in chosen if s not in SECTIONS]
    if bad:
        raise ValueError(f"--only: {', '.join(bad)} not valid; choose from {', '.join(SECTIONS)}")
    unknown = [m for m in models or [] if m not in GPU_MODELS]
    if unknown:
        raise ValueError(f"--models: {', '.join(unknown)} not valid; choose from {', '.join(GPU_MODELS)}")
    gpu_models = {m: GPU_MODELS[m] for m in models} if models else None
    use_ray = "ray" in chosen  # --quick leaves Ray out unless --only names it
    root = bench_data_root(root)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reps = repeats or (1 if quick else 3)
    result: dict[str, Any] = {
        "meta": {
            "date": datetime.date.today().isoformat(), "quick": quick, "sections": chosen, "repeats": reps,
            "cpu": cpu_name(), "cores": cores(), "device": str(dev), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "load_avg_at_start": os.getloadavg(), "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "data_root": root,
        }
    }
    started = time.perf_counter()
    walls = result["meta"]["section_wall_s"] = {}

    def save(section: str | None = None, partial: Any = None) -> None:
        """Write what is measured so far: a run stopped by a time limit keeps its finished parts."""
        if section is not None:
            result[section] = partial
        result["meta"]["wall_s"] = round(time.perf_counter() - started, 1)
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result, indent=2, default=str))

    jobs = {
        "data": lambda: bench_data(root, quick, use_ray, reps),
        "augment": lambda: bench_augment(root, quick, dev, reps),
        "step": lambda: bench_step(root, quick, use_ray, dev, reps, steps),
        "peer": lambda: bench_peer(root, quick, dev, reps),
        "gpu": lambda: bench_gpu(quick, reps, device=dev if device else None, models=gpu_models,
                                 on_update=lambda partial: save("gpu", partial)),
        "epoch": lambda: (bench_epoch(root, quick, dev, on_update=lambda partial: save("epoch", partial))
                          if dev.type == "cuda" else {"skipped": "no GPU: the CIFAR-10 epoch target is for the H200"}),
    }
    for name, job in jobs.items():
        if name in chosen or (name == "step" and use_ray):
            t = time.perf_counter()
            result[name] = job()
            walls[name] = round(time.perf_counter() - t, 1)
            save()
    save()
    return result


def table(result: dict[str, Any]) -> str:
    """The medians (and ratios) of a result as an aligned text table."""
    rows: list[tuple[str, str, str]] = []

    def walk(prefix: str, node: Any):
        if isinstance(node, dict):
            if "median" in node:
                rows.append((prefix, f"{node['median']:.1f}", ""))
                return
            for k, v in node.items():
                if k in ("config", "meta", "views", "runs"):
                    continue
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(node, (int, float)) and not isinstance(node, bool) and (
                "ratio" in prefix or "peak_memory" in prefix or "mfu" in prefix or "ray_data" in prefix
                or "tflops" in prefix or "speedup" in prefix or prefix.startswith("epoch.")):
            rows.append((prefix, f"{node:g}", ""))
        elif isinstance(node, str) and (prefix.endswith("skipped") or prefix.endswith("ray_train")
                                        or prefix.endswith("baseline")):
            rows.append((prefix, node, ""))

    for section in ("data", "augment", "step", "peer", "gpu", "epoch"):
        if section in result:
            walk(section, result[section])
    width = max((len(r[0]) for r in rows), default=10)
    m = result.get("meta", {})
    head = f"replab bench  {m.get('date')}  {m.get('cpu')}  {m.get('cores')} cores  device={m.get('device')}"
    lines = [head, "-" * len(head)] + [f"{k:<{width}}  {v}" for k, v, _ in rows]
    return "\n".join(lines)
