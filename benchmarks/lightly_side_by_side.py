"""SimCLR, BYOL, SwAV and DINO trained by replab and by the ``lightly`` library (never a replab dependency) on the
same encoder, data, budget and evaluation, as one markdown table.

    python -m venv --system-site-packages /work/venv_lightly
    /work/venv_lightly/bin/pip install --no-deps lightly lightning-utilities
    REPLAB_DATA_ROOT=/path/to/datasets /work/venv_lightly/bin/python benchmarks/lightly_side_by_side.py \\
        --methods simclr,byol,swav,dino --libraries lightly,replab --images 10000 --epochs 10 --batch-size 128 \\
        --threads 2 --out docs/lightly_side_by_side.json

Written against lightly 1.6.0 (``lightning-utilities`` is the one extra import its transforms need; Lightning itself
is not used). Every (library, method) pair runs in its own child process (same threads, clean peak memory). With
``--out`` the rows are written after every run and a re-run skips the pairs already there (failed ones are retried).
The budget is ``--config`` (default ``experiments/reference_cpu.yaml``, replab's CPU reference budget);
``--images`` / ``--epochs`` / ``--batch-size`` and ``--set section.key=value`` override it for BOTH sides.

What is the same on both sides
------------------------------
- Encoder: ``build_backbone(model.backbone, data.resolution, model.width, model.cifar_stem)`` (ResNet-18, CIFAR stem,
  width 0.25: 128-d pooled features), built right after ``torch.manual_seed(train.seed)`` as replab's
  ``build_worker`` does, so both start from the same weights: the random-init kNN must agree (both rows show it).
- Training images: ``load_arrays("cifar10", root, "train", 32, limit=data.limit, seed=0)`` (10,000 images), the
  subset ``benchmarks/methods_table.py`` trains on. Epochs (10) and batch (128) from the config; lightly's
  DataLoader drops the last partial batch (``drop_last=True``), replab runs ``N // B`` steps per epoch: the same 78
  steps per epoch, 780 in all. Data order differs (each side's own seeded shuffle).
- Precision: ``replab.platform.train.loop.use_bf16(train.precision, cpu)``; with ``auto`` that is bf16 autocast on
  CPUs with AVX512-BF16 / AMX, else fp32. Threads: ``torch.set_num_threads(--threads)`` in every child process.
- Evaluation, identical code and data: ``replab.platform.probes.frozen.evaluate_encoder`` (the function replab's
  training loop calls; weighted kNN, k = eval.knn_k = 200, T = eval.knn_temperature = 0.1, ImageNet
  normalisation, eval.batch_size, the same bf16 and channels_last flags as the replab run), bank =
  ``load_arrays(..., "train", limit=eval.bank_limit, seed=1)`` (10,000), test = ``load_arrays(..., "test",
  limit=eval.test_limit, seed=0)`` (5,000): the subsets ``methods_table.py`` loads. Both sides are evaluated before
  training, every ``eval.every`` epochs and at the end (``knn_curve``).
- Timing: ``train_wall_s`` is the sum of the epochs' wall time (data preparation, forward, backward, optimizer and
  EMA updates; evaluations and replab's checkpoints excluded); img/s = images trained / train_wall_s.

The replab side is not reimplemented: the child calls ``benchmarks/methods_table.py``'s ``main`` with ``--config``
and ``--methods <m>`` (the method's ``cpu`` recipe, LocalEnv + train_worker), only recording the per-epoch records
its LocalEnv receives (for the epoch times); ``total_wall_s`` is methods_table's own ``wall_s``.

The lightly side: lightly's transforms, heads, losses and utilities with the settings of lightly's CIFAR-10 benchmark,
``docs/source/getting_started/benchmarks/cifar10_benchmark.py`` of github.com/lightly-ai/lightly (input size 32, no
Gaussian blur, ``cj_strength=0.5``, batch 128 with ``lr_factor = batch_size / 128``, torch.optim.lr_scheduler
.CosineAnnealingLR(T_max = epochs) stepped once per epoch as Lightning does, no warm-up), preferred to the generic
``examples/pytorch/{simclr,byol,swav,dino}.py`` (which have no schedule and, for SwAV / DINO, 224 px multi-crop
transforms). The benchmark's LightningModule is replayed as a plain loop (train mode, forward + loss under autocast
as Lightning's ``bf16-mixed`` does, backward, optimizer step; momentum updates where its ``training_step`` puts
them); data: a ``torch.utils.data.DataLoader`` over the uint8 arrays turned into PIL images for lightly's transforms,
``num_workers=0`` (the transforms run in the training process, inside the timed epoch), seeded shuffle.

What differs (each side keeps its own recipe; the numbers compare recipes on one budget, not identical training)
-------------------------------------------------------------------------------------------------------------
The replab side below is as measured on 2026-12-05 (docs/RESULTS.md). Since then the ``cpu`` recipes of BYOL (SGD
0.12 per 256, wd 5e-4) and SwAV (lightly's settings: 512 prototypes never frozen, 2 crops, 512-wide projector,
jitter strength 0.5, AdamW 2e-3 per 256, wd 1e-6) follow lightly's where lightly's learnt and replab's did not, and
DINO's (BN in the head, teacher momentum 0.99 -> 1, AdamW 2e-3 per 256, last layer never frozen) was found at the
reference budget; a re-run uses them.
- Optimizer and schedule. lightly (CIFAR benchmark): SimCLR, BYOL, DINO: SGD lr 0.06 x B/128, momentum 0.9, weight
  decay 5e-4 on every parameter; SwAV: Adam lr 1e-3 x B/128, wd 1e-6; cosine per epoch from the first epoch's full
  rate (epoch e uses lr x (1 + cos(pi e / E)) / 2), no warm-up. replab (method defaults, lr x B/256): SimCLR SGD 0.12
  -> 0.06, wd 5e-4; BYOL LARS 0.2 -> 0.1, wd 1.5e-6; SwAV LARS 0.6 -> 0.3, wd 1e-6; DINO AdamW 5e-4 -> 2.5e-4, wd
  0.04; biases and norm weights without weight decay (and without LARS adaptation); linear warm-up over
  train.warmup_epochs = 1 epoch (at most a tenth of the run), then cosine per step to 0.
- Heads (lightly benchmark widths with the input width set to the encoder's 128 instead of ResNet-18's 512; replab
  with the methods' ``cpu`` recipes). SimCLR: both 2-layer 128 -> 512 (BN, ReLU) -> 128, NT-Xent T 0.5.
  BYOL: lightly projection 1024 hidden -> 256, prediction 256 -> 1024 -> 256; replab 512 hidden -> 256, predictor 512
  hidden. SwAV: lightly projection 512 hidden -> 128, 512 prototypes, never frozen; replab 2048 hidden -> 128, 300
  prototypes frozen for the first epoch (both normalise the prototypes every step, T 0.1, Sinkhorn eps 0.05, 3
  iterations; replab computes scores and Sinkhorn in fp32, lightly under autocast). DINO: lightly 2-layer head
  128 -> 2048 (BN, GELU) -> 256 bottleneck -> weight-normalised 2048 outputs, teacher head initialised
  independently of the student's (as the benchmark builds it), no last-layer freezing; replab 3-layer head without BN
  (2048 hidden, GELU) -> 256 -> 1024 outputs, teacher an exact copy, last layer frozen during the first epoch, head
  output in fp32.
- Teacher momentum: lightly constant 0.99 (BYOL and DINO, as the CIFAR benchmark; the generic examples use a cosine
  0.996 -> 1 per epoch); replab cosine per step, BYOL 0.99 -> 1, DINO 0.996 -> 1.
- DINO temperatures and centre: lightly ``DINOLoss(output_dim=2048)`` with ``epoch=`` as the benchmark (lightly 1.6.0
  defaults: teacher T 0.04 throughout, student T 0.1; centre momentum 0.9 updated inside the loss from every step's
  teacher outputs); replab teacher T 0.04 -> 0.07 over the first 10 % of training, student 0.1, centre momentum 0.9.
- Which encoder is evaluated: lightly's benchmark evaluates ``self.backbone``, the student / online network
  (``knn_top1``); for DINO its teacher's kNN is also recorded (``knn_top1_teacher``), because replab evaluates DINO's
  teacher (BYOL: the online encoder on both sides).
- Augmentations: lightly's per-image PIL / torchvision transforms vs replab's batched tensor views; parameters:
  SimCLR both crop 0.08-1, jitter p 0.8 (0.4, 0.4, 0.4, 0.1), grey 0.2, flip, no blur. BYOL both crop 0.08-1,
  jitter (0.4, 0.4, 0.2, 0.1), grey 0.2, solarize 0.2 on the second view, no blur at 32 px. SwAV: lightly 2 crops of
  32 px (scale 0.14-1), jitter (0.4, 0.4, 0.4, 0.1); replab 2 x 32 px (0.14-1) + 2 local crops of 16 px (0.05-0.14),
  jitter (0.8, 0.8, 0.8, 0.2). DINO: lightly 2 global crops of 32 px (0.4-1), no local crops, jitter (0.4, 0.4, 0.2,
  0.1), solarize 0.2 on the second; replab the same 2 global + 2 local crops of 16 px (0.05-0.4). lightly's transforms
  also apply one unconditional default ``ColorJitter()`` (an identity) in SwAV. The benchmark's SwaVTransform call
  gets ``crop_max_scales=[1.0]`` here: lightly 1.6.0 rejects the benchmark's call without it (one max scale per
  crop size); 1.0 is what the older default gave the 32 px crops.
- Losses are on each library's own scale (e.g. BYOL: lightly 0.5 x (negcos + negcos) in [-1, 1], replab the sum of
  the two 2 - 2 cos terms in [0, 8]); compare curves within a library only.
- Memory format: replab trains channels_last (train.channels_last); the lightly side keeps PyTorch's default layout.
- The CIFAR benchmark's own evaluation (lightly's kNN on all 50,000 training images vs 10,000 test images, the
  best epoch) and its encoder (lightly's full-width ResNetGenerator) are not used here.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
METHODS = ("simclr", "byol", "swav", "dino")
LIBRARIES = ("lightly", "replab")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--libraries", default=",".join(LIBRARIES), help="comma-separated subset of lightly,replab")
    parser.add_argument("--config", default=str(HERE.parent / "experiments" / "reference_cpu.yaml"))
    parser.add_argument("--images", type=int, default=None, help="training images (data.limit; default: the config's)")
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the config's)")
    parser.add_argument("--batch-size", type=int, default=None, help="train.batch_size (default: the config's)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every run")
    parser.add_argument("--root", default="", help="datasets root (default: $REPLAB_DATA_ROOT)")
    parser.add_argument("--out", default="", help="JSON rows, resumable")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[],
                        help="section.key=value overrides of --config, for both sides")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)  # LIBRARY:METHOD, run by the parent
    parser.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def budget_overrides(args) -> list[str]:
    """The config overrides both sides get: the flags' budget, then ``--set``."""
    out = []
    if args.images is not None:
        out.append(f"data.limit={args.images}")
    if args.epochs is not None:
        out.append(f"train.epochs={args.epochs}")
    if args.batch_size is not None:
        out.append(f"train.batch_size={args.batch_size}")
    return out + list(args.overrides)


def load_budget(args):
    """(run config, data root) of the shared budget, with the defaults methods_table.py applies."""
    from replab.platform.data.datasets import data_root
    from replab.validate import load_config

    root = data_root(args.root)
    return load_config(args.config, [f"data.root={root}", *budget_overrides(args)]), root


def eval_subsets(cfg) -> tuple[int, int, int]:
    """(train limit, bank limit, test limit) exactly as benchmarks/methods_table.py reads them from --config."""
    return cfg.data.limit, cfg.eval.bank_limit or 10000, cfg.eval.test_limit or 10000


def load_eval_data(cfg, root):
    from replab.platform.data.arrays import load_arrays
    from replab.platform.probes.frozen import EvalData

    _, bank, test = eval_subsets(cfg)
    res = cfg.data.resolution
    bank_x, bank_y = load_arrays(cfg.data.dataset, root, "train", res, limit=bank, seed=1)
    test_x, test_y = load_arrays(cfg.data.dataset, root, "test", res, limit=test, seed=0)
    return EvalData(bank_x, bank_y, test_x, test_y, 10)


def precision_of(cfg) -> tuple[bool, str]:
    from replab.platform.train.loop import use_bf16

    bf16 = use_bf16(cfg.train.precision, torch.device("cpu"))
    return bf16, "bf16 autocast" if bf16 else "fp32"


def eval_due(done: int, cfg) -> bool:
    """replab's rule (train_worker): every eval.every epochs and at the end."""
    return done == cfg.train.epochs or bool(cfg.eval.every and done % cfg.eval.every == 0)


# ---------------------------------------------------------------------------------------------------------------
# lightly side: the CIFAR-10 benchmark's models, replayed as plain loops
# ---------------------------------------------------------------------------------------------------------------


class ArrayDataset(torch.utils.data.Dataset):
    """uint8 [N, H, W, 3] arrays as PIL images through a lightly transform: (list of views, label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class LightlyRecipe:
    """One method of lightly's CIFAR-10 benchmark on a given backbone: ``transform``, ``model`` (every module, for
    train mode), ``optimizer``, ``scheduler`` (stepped per epoch), ``training_step(views, epoch) -> loss`` and the
    encoders to evaluate (``encoders``: name -> module, the first one is the benchmark's)."""

    settings: ClassVar[dict[str, str]] = {}

    def __init__(self, backbone: torch.nn.Module, resolution: int, batch_size: int, epochs: int):
        self.backbone = backbone
        self.lr_factor = batch_size / 128  # the benchmark's linear scaling
        self.epochs = epochs

    def cosine(self, optimizer):
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.epochs)

    @property
    def encoders(self) -> dict[str, torch.nn.Module]:
        return {"knn_top1": self.backbone}


class LightlySimCLR(LightlyRecipe):
    settings: ClassVar[dict[str, str]] = {"transform": "SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)",
                "head": "SimCLRProjectionHead(d, 512, 128)", "loss": "NTXentLoss() (T 0.5)",
                "optimizer": "SGD lr 0.06*B/128 momentum 0.9 wd 5e-4, CosineAnnealingLR(T_max=epochs) per epoch"}

    def __init__(self, backbone, resolution, batch_size, epochs):
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead
        from lightly.transforms import SimCLRTransform

        super().__init__(backbone, resolution, batch_size, epochs)
        self.transform = SimCLRTransform(input_size=resolution, cj_strength=0.5, gaussian_blur=0.0)
        self.projection_head = SimCLRProjectionHead(backbone.out_dim, 512, 128)
        self.criterion = NTXentLoss()
        self.model = torch.nn.ModuleDict({"backbone": backbone, "projection_head": self.projection_head})
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=6e-2 * self.lr_factor, momentum=0.9,
                                         weight_decay=5e-4)
        self.scheduler = self.cosine(self.optimizer)

    def forward(self, x):
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def training_step(self, views, epoch):
        x0, x1 = views
        return self.criterion(self.forward(x0), self.forward(x1))


class LightlyBYOL(LightlyRecipe):
    settings: ClassVar[dict[str, str]] = {"transform": "BYOLTransform(BYOLView1Transform(input_size=32, gaussian_blur=0.0), "
                             "BYOLView2Transform(input_size=32, gaussian_blur=0.0))",
                "head": "BYOLProjectionHead(d, 1024, 256) + BYOLPredictionHead(256, 1024, 256)",
                "loss": "0.5 * (NegativeCosineSimilarity(p0, z1) + NegativeCosineSimilarity(p1, z0))",
                "momentum": "update_momentum m=0.99 constant, before the forward",
                "optimizer": "SGD lr 0.06*B/128 momentum 0.9 wd 5e-4 (online params), CosineAnnealingLR per epoch"}

    def __init__(self, backbone, resolution, batch_size, epochs):
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad
        from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform

        super().__init__(backbone, resolution, batch_size, epochs)
        self.transform = BYOLTransform(
            view_1_transform=BYOLView1Transform(input_size=resolution, gaussian_blur=0.0),
            view_2_transform=BYOLView2Transform(input_size=resolution, gaussian_blur=0.0),
        )
        self.projection_head = BYOLProjectionHead(backbone.out_dim, 1024, 256)
        self.prediction_head = BYOLPredictionHead(256, 1024, 256)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()
        self.model = torch.nn.ModuleDict({
            "backbone": backbone, "projection_head": self.projection_head, "prediction_head": self.prediction_head,
            "backbone_momentum": self.backbone_momentum, "projection_head_momentum": self.projection_head_momentum,
        })
        params = (list(backbone.parameters()) + list(self.projection_head.parameters())
                  + list(self.prediction_head.parameters()))
        self.optimizer = torch.optim.SGD(params, lr=6e-2 * self.lr_factor, momentum=0.9, weight_decay=5e-4)
        self.scheduler = self.cosine(self.optimizer)

    def forward(self, x):
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

    def forward_momentum(self, x):
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    def training_step(self, views, epoch):
        from lightly.models.utils import update_momentum

        update_momentum(self.backbone, self.backbone_momentum, m=0.99)
        update_momentum(self.projection_head, self.projection_head_momentum, m=0.99)
        x0, x1 = views
        p0, z0 = self.forward(x0), self.forward_momentum(x0)
        p1, z1 = self.forward(x1), self.forward_momentum(x1)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))


class LightlySwAV(LightlyRecipe):
    settings: ClassVar[dict[str, str]] = {"transform": "SwaVTransform(crop_sizes=[32], crop_counts=[2], crop_min_scales=[0.14], "
                             "cj_strength=0.5, gaussian_blur=0)",
                "head": "SwaVProjectionHead(d, 512, 128) + SwaVPrototypes(128, 512) (normalize() every step, "
                        "not frozen)",
                "loss": "SwaVLoss() (T 0.1, 3 Sinkhorn iterations, eps 0.05)",
                "optimizer": "Adam lr 1e-3*B/128 wd 1e-6, CosineAnnealingLR per epoch"}

    def __init__(self, backbone, resolution, batch_size, epochs):
        from lightly.loss import SwaVLoss
        from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
        from lightly.transforms import SwaVTransform

        super().__init__(backbone, resolution, batch_size, epochs)
        # crop_max_scales=[1.0]: lightly 1.6.0 wants one per crop size (the benchmark, written for an older release,
        # leaves the default (1.0, 0.14), which 1.6.0 rejects); 1.0 is the value the older default gave the 32 px crop.
        self.transform = SwaVTransform(crop_sizes=[resolution], crop_counts=[2], crop_min_scales=[0.14],
                                       crop_max_scales=[1.0], cj_strength=0.5, gaussian_blur=0)
        self.projection_head = SwaVProjectionHead(backbone.out_dim, 512, 128)
        self.prototypes = SwaVPrototypes(128, 512)
        self.criterion = SwaVLoss()
        self.model = torch.nn.ModuleDict({"backbone": backbone, "projection_head": self.projection_head,
                                          "prototypes": self.prototypes})
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3 * self.lr_factor, weight_decay=1e-6)
        self.scheduler = self.cosine(self.optimizer)

    def forward(self, x):
        x = self.projection_head(self.backbone(x).flatten(start_dim=1))
        return self.prototypes(torch.nn.functional.normalize(x, dim=1, p=2))

    def training_step(self, views, epoch):
        self.prototypes.normalize()
        features = [self.forward(x) for x in views]
        return self.criterion(features[:2], features[2:])


class LightlyDINO(LightlyRecipe):
    settings: ClassVar[dict[str, str]] = {"transform": "DINOTransform(global_crop_size=32, n_local_views=0, cj_strength=0.5, "
                             "gaussian_blur=(0, 0, 0))",
                "head": "DINOProjectionHead(d, 2048, 256, 2048, batch_norm=True) with its layers replaced by "
                        "ProjectionHead([(d, 2048, BN, GELU), (2048, 256)]); teacher head built separately",
                "loss": "DINOLoss(output_dim=2048), epoch=epoch (lightly 1.6.0 defaults: teacher T 0.04, "
                        "student T 0.1, centre momentum 0.9)",
                "momentum": "update_momentum m=0.99 constant, before the forward",
                "optimizer": "SGD lr 0.06*B/128 momentum 0.9 wd 5e-4 (student params), CosineAnnealingLR per epoch",
                "evaluated": "student backbone (knn_top1, as the benchmark) and teacher backbone (knn_top1_teacher)"}

    def __init__(self, backbone, resolution, batch_size, epochs):
        from lightly.loss import DINOLoss
        from lightly.models.utils import deactivate_requires_grad
        from lightly.transforms import DINOTransform

        super().__init__(backbone, resolution, batch_size, epochs)
        self.transform = DINOTransform(global_crop_size=resolution, n_local_views=0, cj_strength=0.5,
                                       gaussian_blur=(0, 0, 0))
        self.head = self.build_projection_head(backbone.out_dim)
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head = self.build_projection_head(backbone.out_dim)
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(output_dim=2048)
        self.model = torch.nn.ModuleDict({"backbone": backbone, "head": self.head,
                                          "teacher_backbone": self.teacher_backbone, "teacher_head": self.teacher_head,
                                          "criterion": self.criterion})
        params = list(backbone.parameters()) + list(self.head.parameters())
        self.optimizer = torch.optim.SGD(params, lr=6e-2 * self.lr_factor, momentum=0.9, weight_decay=5e-4)
        self.scheduler = self.cosine(self.optimizer)

    @staticmethod
    def build_projection_head(in_dim: int):
        from lightly.models.modules import heads

        head = heads.DINOProjectionHead(in_dim, 2048, 256, 2048, batch_norm=True)
        # "use only 2 layers for cifar10" (the benchmark)
        head.layers = heads.ProjectionHead([
            (in_dim, 2048, torch.nn.BatchNorm1d(2048), torch.nn.GELU()),
            (2048, 256, None, None),
        ]).layers
        return head

    @property
    def encoders(self):
        return {"knn_top1": self.backbone, "knn_top1_teacher": self.teacher_backbone}

    def training_step(self, views, epoch):
        from lightly.models.utils import update_momentum

        update_momentum(self.backbone, self.teacher_backbone, m=0.99)
        update_momentum(self.head, self.teacher_head, m=0.99)
        teacher_out = [self.teacher_head(self.teacher_backbone(v).flatten(start_dim=1)) for v in views[:2]]
        student_out = [self.head(self.backbone(v).flatten(start_dim=1)) for v in views]
        return self.criterion(teacher_out, student_out, epoch=epoch)


LIGHTLY_RECIPES = {"simclr": LightlySimCLR, "byol": LightlyBYOL, "swav": LightlySwAV, "dino": LightlyDINO}


def run_lightly(method: str, cfg, root) -> dict:
    import lightly

    from replab.models.backbones import build_backbone
    from replab.platform.data.arrays import load_arrays
    from replab.platform.probes.frozen import autocast_context, evaluate_encoder

    device = torch.device("cpu")
    bf16, _ = precision_of(cfg)
    limit = eval_subsets(cfg)[0]
    images, labels = load_arrays(cfg.data.dataset, root, "train", cfg.data.resolution, limit=limit, seed=0)
    eval_data = load_eval_data(cfg, root)
    seed = cfg.train.seed
    torch.manual_seed(seed)  # as replab's build_worker, right before the backbone: the same initial weights
    backbone = build_backbone(cfg.model.backbone, cfg.data.resolution, cfg.model.width, cfg.model.cifar_stem,
                              cfg.model.patch_size)
    recipe = LIGHTLY_RECIPES[method](backbone, cfg.data.resolution, cfg.train.batch_size, cfg.train.epochs)
    random.seed(seed)
    np.random.seed(seed)
    loader = torch.utils.data.DataLoader(
        ArrayDataset(images, labels, recipe.transform), batch_size=cfg.train.batch_size, shuffle=True,
        drop_last=True, num_workers=0, generator=torch.Generator().manual_seed(seed),
    )

    def evaluate(names=None) -> dict[str, float]:
        out = {}
        for name, encoder in recipe.encoders.items():
            if names is None or name in names:
                out[name] = evaluate_encoder(
                    encoder, eval_data, cfg.data.resolution, device, knn=True, linear=False, k=cfg.eval.knn_k,
                    temperature=cfg.eval.knn_temperature, batch_size=cfg.eval.batch_size, bf16=bf16,
                    channels_last=cfg.train.channels_last,
                )["eval/knn_top1"]
        return out

    start = time.perf_counter()
    init = evaluate(["knn_top1"])
    knn_curve = {0: init["knn_top1"]}
    loss_curve, epoch_times, final = [], [], dict(init)
    images_trained = 0
    for epoch in range(cfg.train.epochs):
        recipe.model.train()
        loss_sum, steps = torch.zeros(()), 0
        t0 = time.perf_counter()
        for views, _ in loader:
            with autocast_context(device, bf16):
                loss = recipe.training_step(views, epoch)
            loss.backward()
            recipe.optimizer.step()
            recipe.optimizer.zero_grad()
            loss_sum += loss.detach().float().reshape(())  # SwaVLoss returns shape [1]
            steps += 1
            images_trained += views[0].shape[0]
        recipe.scheduler.step()  # Lightning's default interval: once per epoch
        epoch_times.append(time.perf_counter() - t0)
        loss_curve.append(round((loss_sum / max(steps, 1)).item(), 4))
        done = epoch + 1
        print(f"lightly {method} epoch {done}/{cfg.train.epochs} loss {loss_curve[-1]:.4f} "
              f"{steps * cfg.train.batch_size / epoch_times[-1]:.0f} img/s", flush=True)
        if eval_due(done, cfg):
            final = evaluate(None if done == cfg.train.epochs else ["knn_top1"])
            knn_curve[done] = final["knn_top1"]
            print(f"lightly {method} epoch {done} kNN {final}", flush=True)
    train_wall = sum(epoch_times)
    row = {
        "library": "lightly", "version": lightly.__version__, "method": method,
        "knn_top1_init": init["knn_top1"], "knn_top1": final["knn_top1"],
        "knn_curve": knn_curve, "loss_curve": loss_curve, "epoch_times_s": [round(t, 2) for t in epoch_times],
        "train_wall_s": train_wall, "images_per_sec": images_trained / max(train_wall, 1e-9),
        "total_wall_s": time.perf_counter() - start, "settings": recipe.settings,
        "data_loading": "torch DataLoader num_workers=0, PIL transforms in the training process",
    }
    if "knn_top1_teacher" in final:
        row["knn_top1_teacher"] = final["knn_top1_teacher"]
    return row


# ---------------------------------------------------------------------------------------------------------------
# replab side: benchmarks/methods_table.py, unchanged
# ---------------------------------------------------------------------------------------------------------------


def run_replab(method: str, args, cfg) -> dict:
    sys.path.insert(0, str(HERE))
    import methods_table

    from replab.platform.train.loop import LocalEnv

    records: list[dict] = []

    class RecordingEnv(LocalEnv):  # methods_table's LocalEnv, keeping a copy of the epoch records (epoch times)
        def report(self, metrics, checkpoint_dir):
            super().report(metrics, checkpoint_dir)
            records.append(dict(metrics))

    methods_table.LocalEnv = RecordingEnv
    with tempfile.TemporaryDirectory(prefix="side-by-side-") as tmp:
        out = Path(tmp) / "row.json"
        argv = ["--config", args.config, "--methods", method, "--out", str(out)]
        if args.root:
            argv += ["--root", args.root]
        sets = budget_overrides(args)
        if sets:
            argv += ["--set", *sets]
        methods_table.main(argv)
        rows = json.loads(out.read_text()) if out.exists() else []
    if not rows:
        raise RuntimeError("methods_table.py wrote no row")
    if "error" in rows[0]:
        raise RuntimeError(rows[0]["error"])
    table = rows[0]
    epoch_times = [r["train/epoch_time_s"] for r in records]
    train_wall = sum(epoch_times)
    steps = cfg.data.limit // cfg.train.batch_size
    if cfg.train.steps_per_epoch:
        steps = min(steps, cfg.train.steps_per_epoch)
    import replab

    return {
        "library": "replab", "version": getattr(replab, "__version__", "editable"), "method": method,
        "knn_top1_init": table["knn_top1_init"], "knn_top1": table["knn_top1"],
        "knn_curve": {0: table["knn_top1_init"], **{r["epoch"]: r["eval/knn_top1"] for r in records
                                                    if "eval/knn_top1" in r}},
        "loss_curve": table["loss_curve"], "epoch_times_s": [round(t, 2) for t in epoch_times],
        "train_wall_s": train_wall,
        "images_per_sec": steps * cfg.train.batch_size * len(records) / max(train_wall, 1e-9),
        "total_wall_s": table["wall_s"], "methods_table_row": table,
        "settings": {"path": "benchmarks/methods_table.py --config " + args.config + " --methods " + method,
                     "recipe": table.get("recipe"), "recipe_settings": table.get("recipe_settings")},
    }


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------


def child_main(args) -> int:
    torch.set_num_threads(args.threads)
    library, method = args.child.split(":")
    cfg, root = load_budget(args)
    row = run_lightly(method, cfg, root) if library == "lightly" else run_replab(method, args, cfg)
    limit, bank, test = eval_subsets(cfg)
    row.update({
        "change_points": 100 * (row["knn_top1"] - row["knn_top1_init"]),
        "precision": precision_of(cfg)[1], "threads": torch.get_num_threads(),
        "budget": {"config": args.config, "overrides": budget_overrides(args), "images": limit,
                   "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size, "bank": bank, "test": test,
                   "knn_k": cfg.eval.knn_k, "knn_temperature": cfg.eval.knn_temperature,
                   "backbone": f"{cfg.model.backbone} width {cfg.model.width} cifar_stem {cfg.model.cifar_stem}"},
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "torch": torch.__version__,
    })
    Path(args.child_out).write_text(json.dumps(row, indent=2))
    return 0


def child_argv(args, library: str, method: str, out: str) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", f"{library}:{method}", "--child-out", out,
            "--config", args.config, "--threads", str(args.threads)]
    for flag, value in (("--images", args.images), ("--epochs", args.epochs), ("--batch-size", args.batch_size),
                        ("--root", args.root or None)):
        if value is not None:
            argv += [flag, str(value)]
    if args.overrides:
        argv += ["--set", *args.overrides]
    return argv


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    methods = [m for m in args.methods.split(",") if m]
    libraries = [lib for lib in args.libraries.split(",") if lib]
    unknown = sorted(set(methods) - set(METHODS)) + sorted(set(libraries) - set(LIBRARIES))
    if unknown:
        print(f"unknown method / library: {', '.join(unknown)}", file=sys.stderr)
        return 2
    rows = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).exists() else []
    rows = [r for r in rows if "error" not in r]  # failed runs are retried
    done = {(r["library"], r["method"]) for r in rows}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    for method in methods:
        for library in libraries:
            if (library, method) in done:
                print(f"{library} {method}: already in {args.out}, skipped", flush=True)
                continue
            print(f"=== {library} {method}", flush=True)
            with tempfile.TemporaryDirectory(prefix="side-by-side-child-") as tmp:
                out = Path(tmp) / "row.json"
                proc = subprocess.run(child_argv(args, library, method, str(out)), env=env, cwd=HERE.parent,
                                      check=False)
                if proc.returncode == 0 and out.exists():
                    row = json.loads(out.read_text())
                else:
                    row = {"library": library, "method": method, "error": f"child exited {proc.returncode}"}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("settings", "methods_table_row")}),
                  flush=True)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(rows, indent=2))
    print(markdown(rows, methods))
    return 0 if all("error" not in r for r in rows) else 1


def markdown(rows, methods=METHODS) -> str:
    lines = ["| method | library | kNN init | kNN after | change | wall s | img/s |", "|---|---|---|---|---|---|---|"]
    by_key = {(r["library"], r["method"]): r for r in rows}
    present = {r["method"] for r in rows}
    order = list(methods) + [m for m in METHODS if m in present and m not in methods]
    for method in order:
        for library in LIBRARIES:
            r = by_key.get((library, method))
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {method} | {library} | failed: {r['error'][:60]} | | | | |")
                continue
            after = f"{r['knn_top1']:.3f}"
            if "knn_top1_teacher" in r:
                after += f" (teacher {r['knn_top1_teacher']:.3f})"
            lines.append(f"| {method} | {library} | {r['knn_top1_init']:.3f} | {after} | {r['change_points']:+.1f} | "
                         f"{r['train_wall_s']:.0f} | {r['images_per_sec']:.0f} |")
    lines += ["", "| method | replab − lightly: kNN after (points) | change (points) | img/s ratio replab / lightly |",
              "|---|---|---|---|"]
    for method in order:
        a, b = by_key.get(("replab", method)), by_key.get(("lightly", method))
        if a is None or b is None or "error" in a or "error" in b:
            continue
        teacher = ""
        if "knn_top1_teacher" in b:
            teacher = f" (vs lightly teacher {100 * (a['knn_top1'] - b['knn_top1_teacher']):+.1f})"
        lines.append(f"| {method} | {100 * (a['knn_top1'] - b['knn_top1']):+.1f}{teacher} | "
                     f"{a['change_points'] - b['change_points']:+.1f} | "
                     f"{a['images_per_sec'] / max(b['images_per_sec'], 1e-9):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
