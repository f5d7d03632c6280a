"""Every registered method at one fixed budget on CIFAR-10: kNN top-1 vs the random-init baseline, loss
curve, images/s and peak memory, as one markdown table (docs/RESULTS.md).

    python benchmarks/methods_table.py --config experiments/reference_cpu.yaml --out docs/methods_reference_cpu.json
    python benchmarks/methods_table.py --images 2000 --epochs 2 --out docs/methods_cpu.json   # the flags' budget

With ``--config`` the budget (data subset, encoder, schedule, kNN bank and test sizes) is that run config's, the
CPU reference budget being ``experiments/reference_cpu.yaml``; the flags then only pick methods. Resumable: with
``--out``, every finished method is written at once and a re-run skips the methods already in the file.

Runs the plain training loop (no Ray) on one process so that every method gets the same encoder
(ResNet-18 with a CIFAR stem at the given width; ViT-Tiny/4 for MAE), data, epochs and evaluation.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from replab.methods import registry
from replab.platform.data.arrays import load_arrays
from replab.platform.probes.frozen import EvalData
from replab.platform.train.loop import LocalEnv, train_worker
from replab.validate import load_config

# The documented CPU variant: heads narrowed (and CPC's patch grid coarsened) so that a CPU run of every method fits
# in minutes; the methods' other defaults stay. FixMatch is semi-supervised: it gets 25 labels per class.
SMALL_HEADS = {
    "simclr": ["method.proj_hidden_dim=512"],
    "byol": ["method.proj_hidden_dim=512", "method.pred_hidden_dim=512"],
    "mocov2": ["method.proj_hidden_dim=512"],
    "barlow_twins": ["method.proj_dim=512", "method.proj_hidden_dim=512"],
    "vicreg": ["method.proj_dim=512", "method.proj_hidden_dim=512"],
    "dino": ["method.out_dim=1024", "method.n_local_crops=2"],
    "swav": ["method.num_prototypes=300", "method.n_local_crops=2"],
    "cpc_v2": ["method.patch_fraction=0.5", "method.prediction_steps=2", "method.context_layers=2"],
    "fixmatch": ["data.labels_per_class=25"],
}
VIT_ONLY = {"mae"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--methods", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--root", default="")
    parser.add_argument("--config", default=None, help="a run config whose budget every method gets")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], help="section.key=value overrides of --config")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    from replab.platform.data.datasets import data_root

    root = data_root(args.root)
    if args.config:
        budget = [f"data.root={root}", *args.overrides]
        base = load_config(args.config, budget)
        limit, bank, test = base.data.limit, base.eval.bank_limit or 10000, base.eval.test_limit or 10000
    else:
        budget = [f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "train.warmup_epochs=0",
                  "train.log_every=1000000", "eval.linear=false"]
        limit, bank, test = args.images, 5000, 2000
    images, labels = load_arrays("cifar10", root, "train", 32, limit=limit, seed=0)
    bank_x, bank_y = load_arrays("cifar10", root, "train", 32, limit=bank, seed=1)
    test_x, test_y = load_arrays("cifar10", root, "test", 32, limit=test, seed=0)
    eval_data = EvalData(bank_x, bank_y, test_x, test_y, 10)
    names = args.methods.split(",") if args.methods else list(registry.available())
    rows = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).exists() else []
    done = {r["method"] for r in rows if "error" not in r}
    rows = [r for r in rows if r["method"] in done]
    for name in names:
        if name in done:
            print(f"{name}: already in {args.out}, skipped", flush=True)
            continue
        backbone = ["model.backbone=vit_tiny"] if name in VIT_ONLY else ([] if args.config else
                                                                          [f"model.width={args.width}"])
        overrides = [*budget, f"method.name={name}", *backbone]
        overrides += [o for o in SMALL_HEADS.get(name, []) if not o.startswith("method.") or
                      o.split("=")[0].split(".")[1] in registry.get(name).Params.__dataclass_fields__]
        cfg = load_config(args.config, overrides)
        env = LocalEnv(images, labels, tempfile.mkdtemp(prefix=f"table-{name}-"))
        start = time.perf_counter()
        try:
            result = train_worker(cfg, env, len(images), eval_data_fn=lambda: eval_data)
        except Exception as exc:  # one broken method must not hide the others' figures
            rows.append({"method": name, "error": f"{type(exc).__name__}: {exc}"})
            print(f"{name}: failed: {exc}", file=sys.stderr)
            continue
        wall = time.perf_counter() - start
        reports = env.reports
        row = {
            "method": name,
            "backbone": cfg.model.backbone,
            "knn_top1_init": result.history[0].get("eval/knn_top1"),
            "knn_top1": reports[-1].get("eval/knn_top1"),
            "loss_curve": [round(r["train/epoch_loss"], 4) for r in reports],
            "images_per_sec": sum(r["train/epoch_images_per_sec"] for r in reports) / len(reports),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "wall_s": wall,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:  # after every method: a stopped table resumes where it stopped
            Path(args.out).write_text(json.dumps(rows, indent=2))
    print(markdown(rows))
    return 0


def markdown(rows) -> str:
    lines = ["| method | backbone | kNN top-1 random init | kNN top-1 after | change (points) | loss per epoch | img/s | "
             "wall s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        change = 100 * (r["knn_top1"] - r["knn_top1_init"])
        lines.append(f"| {r['method']} | {r['backbone']} | {r['knn_top1_init']:.3f} | {r['knn_top1']:.3f} | "
                     f"{change:+.1f} | {r['loss_curve']} | {r['images_per_sec']:.0f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
