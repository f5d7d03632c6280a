"""PAWS vs RoPAWS vs a fine-tuned SimCLR encoder on the open-set CIFAR-10 protocol at one small budget.

    python benchmarks/openset_table.py --ratios 0,0.25,0.5,0.75 --seeds 0,1 --out docs/openset_cpu.json

For each out-of-class ratio r of the unlabeled pool (6 known animal classes 2..7, r of the pool from the 4
vehicle classes; ``--ratios natural`` is the standard protocol's pool: the rest of CIFAR-10 train, 40% out of
class), each seed (it picks the labeled split, the pool and the initialisation) and each method, the plain
training loop (no Ray) pre-trains a ResNet-18 (CIFAR stem, ``--width``) on the same pool, then
:func:`replab.platform.evaluate.target.evaluate_openset_target` evaluates the final checkpoint exactly as
``replab eval --openset`` does:

- PAWS / RoPAWS: the frozen soft nearest-neighbour classifier over the labeled set (``openset/snn_top1``) and
  the AUROC of the max similarity to the labeled set (known vs unknown CIFAR-10 test images, ``openset/auroc``;
  vs Tiny-ImageNet val, ``openset/ood_auroc``).
- SimCLR: fine-tuned end-to-end on the same labels (``finetune/top1``, max-softmax AUROCs ``finetune/*``);
  its frozen SNN figures are kept too.

Prints one JSON line per run and a markdown table of means (and spread) over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from replab.platform.data import pool as pools
from replab.platform.evaluate.target import evaluate_openset_target
from replab.platform.train.loop import LocalEnv, train_worker
from replab.validate import load_config

KNOWN = [2, 3, 4, 5, 6, 7]
SEMI_SUPERVISED = {"paws", "ropaws"}
REPORTED = ["snn_top1", "auroc", "ood_auroc", "ft_top1", "ft_auroc", "ft_ood_auroc"]


def run_config(method: str, ratio: str, seed: int, args) -> list[str]:
    overrides = [
        "data.dataset=cifar10", f"data.known_classes={KNOWN}", f"data.labels_per_class={args.labels_per_class}",
        f"data.split_seed={seed}", f"data.seed={seed}", "data.unlabeled_exclude_labeled=true", f"train.seed={seed}",
        f"model.width={args.width}", f"method.name={method}", f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}", f"train.warmup_epochs={args.warmup_epochs}", "train.log_every=1000000",
        "train.checkpoint_every=0", "eval.knn=false", "eval.linear=false", "eval.before_training=false",
        f"eval.test_limit={args.test_limit}", "tracking.enabled=false",
        "method.proj_hidden_dim=512",  # the same projector width for every method
    ]
    if ratio != "natural":
        overrides += [f"data.ood_fraction={float(ratio)}", f"data.unlabeled_size={args.pool}"]
    else:  # the protocol's pool: a random subset of CIFAR-10 train (all 10 classes) minus the labeled images
        overrides += [f"data.limit={args.pool}"]
    if method in SEMI_SUPERVISED:  # a support set sized to the label budget
        overrides += [f"method.support_images_per_class={args.support_per_class}",
                      f"method.n_local_crops={args.local_crops}"]
    return overrides


def one_run(method: str, ratio: str, seed: int, args) -> dict:
    cfg = load_config(None, run_config(method, ratio, seed, args))
    pool = pools.load_unlabeled_arrays(cfg.data)
    folder = tempfile.mkdtemp(prefix=f"openset-{method}-")
    env = LocalEnv(pool.images, pool.labels, folder, seed=seed)
    start = time.perf_counter()
    result = train_worker(cfg, env, len(pool.images))
    train_s = time.perf_counter() - start
    finetune_epochs = args.finetune_epochs if method not in SEMI_SUPERVISED else 0
    metrics = evaluate_openset_target(env.latest_checkpoint(), cfg, finetune_epochs=finetune_epochs,
                                      ood_dataset="tinyimagenet", ood_split="val", ood_limit=args.test_limit)
    return {
        "method": method, "ratio": ratio, "seed": seed, "pool": len(pool.images),
        "pool_out_of_class": float(1 - pool.in_class.mean()), "steps": result.steps,
        "train_s": round(train_s, 1), "images_per_sec": env.reports[-1]["train/epoch_images_per_sec"],
        "loss_curve": [round(r["train/epoch_loss"], 4) for r in env.reports],
        "snn_top1": metrics.get("openset/snn_top1"), "auroc": metrics.get("openset/auroc"),
        "ood_auroc": metrics.get("openset/ood_auroc"), "ft_top1": metrics.get("finetune/top1"),
        "ft_auroc": metrics.get("finetune/auroc_msp"), "ft_ood_auroc": metrics.get("finetune/ood_auroc_msp"),
    }


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and (max - min) / 2 over seeds of every reported figure, per (ratio, method)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["ratio"], r["method"]), []).append(r)
    out = []
    for (ratio, method), rs in groups.items():
        entry = {"ratio": ratio, "method": method, "seeds": len(rs)}
        for key in REPORTED:
            values = [r[key] for r in rs if r.get(key) is not None]
            if values:
                entry[key] = statistics.fmean(values)
                entry[f"{key}_halfrange"] = (max(values) - min(values)) / 2
        out.append(entry)
    return out


def markdown(summary: list[dict]) -> str:
    def cell(e, key):
        if key not in e:
            return "-"
        return f"{e[key]:.3f} ± {e[key + '_halfrange']:.3f}" if e["seeds"] > 1 else f"{e[key]:.3f}"

    lines = ["| out-of-class ratio | method | seeds | SNN top-1 (known) | AUROC known/unknown | AUROC vs TIN val | "
             "fine-tuned top-1 | fine-tuned AUROC | fine-tuned AUROC vs TIN |", "|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        figures = " | ".join(cell(e, k) for k in REPORTED)
        lines.append(f"| {e['ratio']} | {e['method']} | {e['seeds']} | {figures} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="paws,ropaws,simclr")
    parser.add_argument("--ratios", default="0,0.25,0.5,0.75", help="out-of-class fractions, or 'natural'")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--pool", type=int, default=4000, help="unlabeled images")
    parser.add_argument("--labels-per-class", type=int, default=25)
    parser.add_argument("--support-per-class", type=int, default=16)
    parser.add_argument("--local-crops", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--warmup-epochs", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--finetune-epochs", type=int, default=30)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--out", default="", help="JSON file; rows already in it are kept and not re-run")
    args = parser.parse_args(argv)

    rows: list[dict] = []
    if args.out and Path(args.out).is_file():
        rows = json.loads(Path(args.out).read_text()).get("runs", [])
    done = {(r["method"], r["ratio"], r["seed"]) for r in rows}
    for seed in (int(s) for s in args.seeds.split(",")):  # every ratio of one seed first: partial runs stay useful
        for ratio in args.ratios.split(","):
            for method in args.methods.split(","):
                if (method, ratio, seed) in done:
                    continue
                row = one_run(method, ratio, seed, args)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps({"settings": vars(args), "runs": rows}, indent=2))
    summary = summarise(rows)
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "runs": rows, "summary": summary}, indent=2))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
