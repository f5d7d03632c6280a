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

# Every method runs its ``cpu`` recipe (``--recipe``; each method's ``recipes`` say what it changes and why: narrower
# heads, and where measured the optimizer that learns at batch 128). FixMatch is semi-supervised: it gets 25 labels
# per class, a budget of the table rather than a recipe.
LABELS = {"fixmatch": ["data.labels_per_class=25"]}
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
    parser.add_argument("--recipe", default="cpu", help="method.recipe of every method: cpu (default) or paper")
    args = parser.parse_args(argv)

    from replab.platform.data.datasets import data_root

    root = data_root(args.root)
    if args.config:
        budget = [f"data.root={root}", *args.overrides]
        base = load_config(args.config, [o for o in budget if not o.startswith("method.")])  # the budget only
        limit, bank, test = base.data.limit, base.eval.bank_limit or 10000, base.eval.test_limit or 10000
    else:
        budget = [f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "train.warmup_epochs=0",
                  "train.log_every=1000000", "eval.linear=false"]
        limit, bank, test = args.images, 5000, 2000
    images, labels = load_arrays("cifar10", root, "train", 32, limit=limit, seed=0)
    bank_x, bank_y = load_arrays("cifar10", root, "train", 32, limit=bank, seed=1)
    test_x, test_y = load_arrays("cifar10", root, "test", 32, limit=test, seed=0)
    eval_data = EvalData(bank_x, bank_y, test_x, test_y, 10)
    names = args.methods.split(",") if args.methods else [  # by default every method that has the recipe
        n for n, cls in registry.available().items() if args.recipe == "paper" or args.recipe in cls.recipes]
    rows = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).exists() else []
    done = {r["method"] for r in rows if "error" not in r}
    rows = [r for r in rows if r["method"] in done]
    for name in names:
        if name in done:
            print(f"{name}: already in {args.out}, skipped", flush=True)
            continue
        backbone = ["model.backbone=vit_tiny"] if name in VIT_ONLY else ([] if args.config else
                                                                          [f"model.width={args.width}"])
        overrides = [*budget, f"method.name={name}", f"method.recipe={args.recipe}", *backbone,
                     *LABELS.get(name, [])]
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
            "recipe": cfg.method.recipe,
            "recipe_settings": list(registry.get(name).recipes.get(cfg.method.recipe, ())),
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
    lines = ["| method | backbone | recipe | kNN top-1 random init | kNN top-1 after | change (points) | loss per epoch | "
             "img/s | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:80]} | | | | | | | |")
            continue
        change = 100 * (r["knn_top1"] - r["knn_top1_init"])
        lines.append(f"| {r['method']} | {r['backbone']} | {r.get('recipe', '')} | {r['knn_top1_init']:.3f} | "
                     f"{r['knn_top1']:.3f} | "
                     f"{change:+.1f} | {r['loss_curve']} | {r['images_per_sec']:.0f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
