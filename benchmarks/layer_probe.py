"""kNN top-1 read from every stage of a trained encoder, beside the same stages at its random init.

The reference table reads kNN from the encoder's last pooled features. Pretext-task papers (jigsaw, counting,
RotNet) read their encoders from intermediate conv layers instead, so a method whose last stage ends below its
random init may still have learnt something earlier. This probe says where: for each checkpoint it rebuilds the
run's method twice from the checkpoint's own config (random init with the run's seed, then the trained weights)
and reports kNN (k = 200, T = 0.1, as the platform's) on the global-average-pooled output of the stem and of
layer1..layer4 of a ResNet; for a ViT, on the class token and on the mean of the patch tokens after each quarter
of its blocks (the encoder's final LayerNorm applied to each, as DINO's ``get_intermediate_layers``; the platform
and MAE's linear probe read the class token after the last block).

    python benchmarks/layer_probe.py /tmp/table-jigsaw-*/checkpoint_epoch_000010 --out docs/layer_probe_cpu.json

The bank and test images are the reference budget's (10,000 seeded CIFAR-10 training images, 5,000 test
images), unless the checkpoint's config says otherwise (``eval.bank_limit``, ``eval.test_limit``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from replab.models.backbones import is_vit
from replab.platform.data.arrays import load_arrays
from replab.platform.data.augment import normalize, resize, to_float
from replab.platform.data.datasets import data_root
from replab.platform.probes.frozen import knn_top1
from replab.platform.train.checkpoints import CheckpointError, load_checkpoint
from replab.platform.train.loop import build_method
from replab.validate import from_dict

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


@torch.no_grad()
def stage_features(encoder: nn.Module, images, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """``{stage: [N, C_stage]}``: the global-average-pooled output of each ResNet stage (eval mode, fp32)."""
    encoder.eval()
    out = {s: [] for s in STAGES}
    for start in range(0, len(images), batch_size):
        x = normalize(resize(to_float(torch.as_tensor(images[start : start + batch_size])), 32))
        x = encoder.maxpool(encoder.relu(encoder.bn1(encoder.conv1(x))))
        out["stem"].append(x.mean(dim=(2, 3)))
        for stage in STAGES[1:]:
            x = getattr(encoder, stage)(x)
            out[stage].append(x.mean(dim=(2, 3)))
    return {s: torch.cat(v) for s, v in out.items()}


@torch.no_grad()
def vit_block_features(encoder: nn.Module, images, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """``{"block<i> cls" | "block<i> mean": [N, D]}`` after each quarter of a ViT's blocks (final LayerNorm applied)."""
    encoder.eval()
    blocks = list(encoder.encoder.layers)
    marks = sorted({max(1, round(len(blocks) * q / 4)) for q in (1, 2, 3, 4)})
    seen: dict[int, torch.Tensor] = {}
    hooks = [blocks[i - 1].register_forward_hook(lambda _m, _in, out, i=i: seen.__setitem__(i, out)) for i in marks]
    out: dict[str, list[torch.Tensor]] = {f"block{i} {kind}": [] for i in marks for kind in ("cls", "mean")}
    try:
        for start in range(0, len(images), batch_size):
            encoder.tokens(normalize(resize(to_float(torch.as_tensor(images[start : start + batch_size])), 32)))
            for i in marks:
                tokens = encoder.encoder.ln(seen[i])
                out[f"block{i} cls"].append(tokens[:, 0])
                out[f"block{i} mean"].append(tokens[:, 1:].mean(dim=1))
    finally:
        for hook in hooks:
            hook.remove()
    return {s: torch.cat(v) for s, v in out.items()}


@torch.no_grad()
def recalibrate_batchnorm(encoder: nn.Module, images, batch_size: int = 500) -> None:
    """Re-estimate every BatchNorm layer's running mean and variance on ``images`` (uint8 ``[N, H, W, 3]``): reset,
    then a cumulative average over forward passes in train mode. A method trained on tiles or patches has
    statistics of tiles; this gives it those of whole images, so the probe tells a statistics mismatch apart from
    features that were not learnt."""
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    encoder.train()
    for start in range(0, len(images), batch_size):
        encoder(normalize(resize(to_float(torch.as_tensor(images[start : start + batch_size])), 32)))
    encoder.eval()


def probe(folder: Path, root: str, recalibrate: bool = False) -> dict:
    state = load_checkpoint(folder)
    cfg = from_dict(state["config"])
    bank_x, bank_y = load_arrays(cfg.data.dataset, root, "train", 32, limit=cfg.eval.bank_limit or 10000, seed=1)
    test_x, test_y = load_arrays(cfg.data.dataset, root, "test", 32, limit=cfg.eval.test_limit or 10000, seed=0)
    bank_y, test_y = torch.as_tensor(bank_y), torch.as_tensor(test_y)
    row = {"method": cfg.method.name, "method_config": state["config"]["method"], "checkpoint": str(folder),
           "epoch": state.get("epoch")}
    torch.manual_seed(cfg.train.seed)  # the run's own random init (build_worker seeds the same way)
    method = build_method(cfg)
    features = vit_block_features if is_vit(method.encoder) else stage_features
    for label, weights in (("init", None), ("trained", state["method"])):
        if weights is not None:
            method.load_state_dict(weights)
        if recalibrate and not is_vit(method.encoder):
            recalibrate_batchnorm(method.encoder, bank_x)
        bank, test = features(method.encoder, bank_x), features(method.encoder, test_x)
        row[label] = {s: knn_top1(bank[s], bank_y, test[s], test_y, 10) for s in bank}
    if not is_vit(method.encoder):
        row["batchnorm"] = "re-estimated on the bank images" if recalibrate else "as trained"
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict]) -> str:
    """One table per set of stages (ResNet stages, a ViT's blocks), a row per checkpoint."""
    tables: dict[tuple[str, ...], list[dict]] = {}
    for r in rows:
        tables.setdefault(tuple(r["init"]), []).append(r)
    out = []
    for stages, members in tables.items():
        lines = ["| method | " + " | ".join(f"{s} init -> trained" for s in stages) + " |",
                 "|---|" + "---|" * len(stages)]
        for r in members:
            cells = [f"{r['init'][s]:.3f} -> {r['trained'][s]:.3f} ({100 * (r['trained'][s] - r['init'][s]):+.1f})"
                     for s in stages]
            lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint folders holding state.pt")
    parser.add_argument("--root", default="")
    parser.add_argument("--out", default="")
    parser.add_argument("--recalibrate-bn", action="store_true",
                        help="re-estimate BatchNorm statistics on the bank images before reading a ResNet's features")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = data_root(args.root)
    try:
        rows = [probe(folder, root, args.recalibrate_bn) for folder in args.checkpoints]
    except CheckpointError as exc:
        print(f"layer_probe: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
