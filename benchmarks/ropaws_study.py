"""Does RoPAWS's advantage over PAWS grow with the out-of-class share of the pool? The whole study, one command.

    python benchmarks/ropaws_study.py --out docs/ropaws_study_cpu.json            # the 2-core CPU version
    bash benchmarks/ropaws_study_gpu.sh                                           # the GPU version

Stage 1: SimCLR pre-trains a ResNet-18 (CIFAR stem, ``--width``) on unlabeled CIFAR-10 train images
(``--pretrain-images``, every class; once, shared by every seed). Stage 2: for each seed, each pool and
each label budget, PAWS and RoPAWS continue from that encoder (``model.init``: only the encoder, new heads)
on the open-set protocol: 6 known classes (2..7) with ``--labels`` labels each; the pool holds ``--pool``
images of which a share r in {0, 25, 50, 75 %} comes from the 4 unknown CIFAR-10 classes, or (``tin50``)
50 % from Tiny-ImageNet (far out of distribution). Both methods see the same pool, split and init per seed.

Reported per run (``replab eval --openset`` on the final checkpoint): closed-set top-1 of the frozen soft
nearest-neighbour classifier on the known test classes (``openset/snn_top1``), AUROC known vs unknown
CIFAR-10 test images (``openset/auroc``) and vs Tiny-ImageNet val (``openset/ood_auroc``); and the mechanism
check ``pin_auroc``: RoPAWS's in-domain prior x propagation p_in of every pool image (the formula of
``replab.methods.paws_losses.ropaws_targets``, labeled set as supports, chunks of one batch) scored by AUROC of
in-class over out-of-class pool images, at the start (the SimCLR encoder, new heads) and after every epoch
(from the per-epoch checkpoints): does the ranking improve during training? The table gives mean ± std over
seeds; ``--plot`` draws accuracy and AUROC against the out-of-class share with error bars.

Rows already in ``--out`` are kept and not re-run (the study resumes where it stopped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from replab.methods import paws_losses
from replab.platform.data import labeled as labeled_lib
from replab.platform.data import pool as pool_lib
from replab.platform.evaluate.target import evaluate_openset_target
from replab.platform.probes.frozen import extract_features
from replab.platform.probes.openset import auroc
from replab.platform.train.checkpoints import load_checkpoint
from replab.platform.train.loop import LocalEnv, build_method, train_worker
from replab.validate import from_dict, load_config

KNOWN = [2, 3, 4, 5, 6, 7]
# (out-of-class share, its source: "" = the 4 unknown CIFAR-10 classes; data.ood_dataset=cifar10 would draw
# from all 10 classes and give a ~20 % share at 0.5)
POOLS = {"r00": ("0.0", ""), "r25": ("0.25", ""), "r50": ("0.5", ""), "r75": ("0.75", ""),
         "tin50": ("0.5", "tinyimagenet")}
REPORTED = ["snn_top1", "auroc", "ood_auroc", "pin_auroc_start", "pin_auroc_end"]


def common(args, seed: int) -> list[str]:
    return [f"model.width={args.width}", f"train.batch_size={args.batch_size}", f"train.seed={seed}",
            f"data.seed={seed}", "train.log_every=1000000", "eval.knn=false", "eval.linear=false",
            "eval.before_training=false", f"eval.test_limit={args.test_limit}", "tracking.enabled=false",
            f"train.precision={args.precision}", "method.proj_hidden_dim=512"]


def pretrain(args, workdir: Path) -> str:
    """Stage 1: SimCLR on ``--pretrain-images`` CIFAR-10 train images (no labels; default ``--pool``); returns its
    last checkpoint folder."""
    root = workdir / "simclr"
    env_probe = LocalEnv(np.zeros((1, 32, 32, 3), np.uint8), np.zeros(1), root)
    if env_probe.latest_checkpoint():
        return env_probe.latest_checkpoint()
    cfg = load_config(None, common(args, 0) + [
        "method.name=simclr", "data.dataset=cifar10", f"data.limit={args.pretrain_images or args.pool}",
        f"train.epochs={args.pretrain_epochs}",
        f"train.warmup_epochs={args.warmup_epochs}", "train.checkpoint_every=0"])
    pool = pool_lib.load_unlabeled_arrays(cfg.data)
    env = LocalEnv(pool.images, pool.labels, root, device=args.device, seed=0)
    start = time.perf_counter()
    train_worker(cfg, env, len(pool.images))
    print(json.dumps({"stage": "simclr", "train_s": round(time.perf_counter() - start, 1),
                      "loss_curve": [round(r["train/epoch_loss"], 4) for r in env.reports]}), flush=True)
    return env.latest_checkpoint()


def run_config(method: str, pool_key: str, labels: int, seed: int, init: str, args) -> list[str]:
    ratio, source = POOLS[pool_key]
    return common(args, seed) + [
        "data.dataset=cifar10", f"data.known_classes={KNOWN}", f"data.labels_per_class={labels}",
        f"data.split_seed={seed}", "data.unlabeled_exclude_labeled=true", f"data.ood_fraction={ratio}",
        *([f"data.ood_dataset={source}"] if source else []), f"data.unlabeled_size={args.pool}",
        f"method.name={method}",
        f"train.epochs={args.epochs}", f"train.warmup_epochs={args.warmup_epochs}", "train.checkpoint_every=1",
        f"method.support_images_per_class={args.support_per_class}", f"method.n_local_crops={args.local_crops}",
        f"model.init={init}"]


@torch.no_grad()
def pin_auroc(method, cfg, pool, lab_images, lab_labels, device) -> float:
    """AUROC of RoPAWS's p_in over the pool: in-class images should score above the out-of-class ones."""
    p = method.params
    net = torch.nn.Sequential(method.backbone, method.projector).to(device)
    z_pool = extract_features(net, pool.images, cfg.data.resolution, device)
    z_lab = extract_features(net, lab_images, cfg.data.resolution, device)
    y = paws_losses.support_label_matrix(torch.as_tensor(lab_labels), p.label_smoothing)
    per_class = max(1, len(lab_labels) // y.shape[1])
    scores = []
    for start in range(0, len(z_pool), cfg.train.batch_size):
        chunk = z_pool[start:start + cfg.train.batch_size]
        r = getattr(p, "label_ratio", 5.0) * len(chunk) / per_class
        _, p_in = paws_losses.ropaws_targets(chunk, z_lab, y, p.tau, getattr(p, "prior_tau", 0.1), r)
        scores.append(p_in)
    s = torch.cat(scores).numpy()
    return auroc(s[pool.in_class], s[~pool.in_class])


def one_run(method: str, pool_key: str, labels: int, seed: int, init: str, args) -> dict:
    cfg = load_config(None, run_config(method, pool_key, labels, seed, init, args))
    pool = pool_lib.load_unlabeled_arrays(cfg.data)
    lab_images, lab_labels = labeled_lib.load_labeled(cfg.data)
    folder = Path(tempfile.mkdtemp(prefix=f"ropaws-study-{method}-"))
    env = LocalEnv(pool.images, pool.labels, folder, device=args.device, seed=seed)
    device = env.device
    start_method = build_method(cfg, init_encoder=True)  # the network at step 0: SimCLR encoder, fresh heads
    curve = [pin_auroc(start_method, cfg, pool, lab_images, lab_labels, device)]
    start = time.perf_counter()
    result = train_worker(cfg, env, len(pool.images))
    train_s = time.perf_counter() - start
    for ckpt in sorted(folder.glob("checkpoint_epoch_*")):
        state = load_checkpoint(ckpt)
        m = build_method(from_dict(state["config"]))
        m.load_state_dict(state["method"])
        curve.append(pin_auroc(m, cfg, pool, lab_images, lab_labels, device))
    metrics = evaluate_openset_target(env.latest_checkpoint(), cfg, finetune_epochs=0,
                                      ood_dataset="tinyimagenet", ood_split="val", ood_limit=args.test_limit)
    return {
        "method": method, "pool": pool_key, "labels": labels, "seed": seed, "pool_size": len(pool.images),
        "pool_out_of_class": round(float(1 - pool.in_class.mean()), 4), "steps": result.steps,
        "train_s": round(train_s, 1), "loss_curve": [round(r["train/epoch_loss"], 4) for r in env.reports],
        "snn_top1": metrics.get("openset/snn_top1"), "auroc": metrics.get("openset/auroc"),
        "ood_auroc": metrics.get("openset/ood_auroc"), "pin_auroc_curve": [round(v, 4) for v in curve],
        "pin_auroc_start": curve[0], "pin_auroc_end": curve[-1],
    }


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of every reported figure, per (labels, pool, method)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["labels"], r["pool"], r["method"]), []).append(r)
    out = []
    for (labels, pool_key, method), rs in sorted(groups.items()):
        entry = {"labels": labels, "pool": pool_key, "method": method, "seeds": len(rs)}
        for key in REPORTED:
            values = [r[key] for r in rs if r.get(key) is not None and np.isfinite(r[key])]
            if values:
                entry[key] = statistics.fmean(values)
                entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def markdown(summary: list[dict]) -> str:
    def cell(e, key):
        return f"{e[key]:.3f} ± {e[key + '_std']:.3f}" if key in e else "-"

    lines = ["| labels/class | pool | method | seeds | SNN top-1 (known) | AUROC known/unknown | AUROC vs TIN val | "
             "p_in AUROC start | p_in AUROC end |", "|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        lines.append(f"| {e['labels']} | {e['pool']} | {e['method']} | {e['seeds']} | "
                     + " | ".join(cell(e, k) for k in REPORTED) + " |")
    return "\n".join(lines)


TITLES = {"snn_top1": "SNN top-1, known classes", "auroc": "AUROC known vs unknown",
          "pin_auroc_end": "p_in AUROC over the pool, end"}


def plot(summary: list[dict], path: str) -> None:
    """Top-1 and AUROC against the out-of-class share (CIFAR pools), PAWS vs RoPAWS, error bars = std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({e["labels"] for e in summary})
    fig, axes = plt.subplots(len(budgets), 3, figsize=(13, 3.6 * len(budgets)), squeeze=False)
    for row, labels in enumerate(budgets):
        for col, key in enumerate(("snn_top1", "auroc", "pin_auroc_end")):
            ax = axes[row][col]
            for method in ("paws", "ropaws"):
                pts = [(float(POOLS[e["pool"]][0]) * 100, e[key], e[f"{key}_std"]) for e in summary
                       if e["labels"] == labels and e["method"] == method and e["pool"] != "tin50" and key in e]
                if pts:
                    x, y, err = zip(*sorted(pts))
                    ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
            ax.set_title(f"{labels} labels per known class", fontsize=10)
            ax.set_xlabel("out-of-class share of the pool (%)")
            ax.set_ylabel(TITLES[key])
            ax.grid(alpha=0.3)
            ax.legend(title="mean ± std, 3 seeds" if col == 0 else None)
    fig.tight_layout()
    fig.savefig(path, dpi=200)
    fig.savefig(Path(path).with_suffix(".pdf"))


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", default="r00,r25,r50,r75,tin50", help=f"of {', '.join(POOLS)}")
    parser.add_argument("--labels", default="25,100", help="labels per known class")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="paws,ropaws")
    parser.add_argument("--pool", type=int, default=2000, help="unlabeled images (stage 1 and every stage-2 pool)")
    parser.add_argument("--pretrain-images", type=int, default=0, help="stage 1's images (0: --pool)")
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--warmup-epochs", type=float, default=0.3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--support-per-class", type=int, default=8)
    parser.add_argument("--local-crops", type=int, default=2)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", default="", help="keeps the SimCLR checkpoint (default: next to --out)")
    parser.add_argument("--out", default="", help="JSON file; rows already in it are kept and not re-run")
    parser.add_argument("--plot", default="", help="PNG of top-1 / AUROC vs out-of-class share")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    workdir = Path(args.workdir or (Path(args.out).with_suffix("") if args.out else tempfile.mkdtemp()))
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if args.out and Path(args.out).is_file():
        rows = json.loads(Path(args.out).read_text()).get("runs", [])
    done = {(r["method"], r["pool"], r["labels"], r["seed"]) for r in rows}
    start = time.perf_counter()
    init = pretrain(args, workdir)
    for seed in (int(s) for s in args.seeds.split(",")):  # every cell of one seed first: partial runs stay useful
        for labels in (int(x) for x in args.labels.split(",")):
            for pool_key in args.pools.split(","):
                for method in args.methods.split(","):
                    if (method, pool_key, labels, seed) in done:
                        continue
                    row = one_run(method, pool_key, labels, seed, init, args)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.out:
                        Path(args.out).write_text(json.dumps({"settings": vars(args), "runs": rows}, indent=2))
    summary = summarise(rows)
    wall = round(time.perf_counter() - start, 1)
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "init": init, "wall_s": wall, "runs": rows,
                                              "summary": summary}, indent=2))
    if args.plot:
        plot(summary, args.plot)
    print(markdown(summary))
    print(f"wall time {wall} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
