"""PAWS (Assran et al., ICCV 2021): predict view assignments with support samples (semi-supervised).

Every step sees the unlabeled batch (2 global views + multi-crops) and a class-balanced labeled support set
(C classes x M images x 2 views, :class:`~replab.methods.base.SupportSpec`, drawn by
:mod:`replab.platform.data.support`). An image's prediction is a soft nearest-neighbour classifier over the
supports (cosine / tau against the supports gathered over every worker, label-smoothed one-hot labels); its
target is the sharpened prediction of its *other* global view (the multi-crops get the mean of both), so
views of the same image must agree on their assignment to the labeled classes:

    encoder -> projection head (3-layer MLP, BN) [-> prediction head]
    loss = mean H(sharpen(snn(target view)), snn(anchor view)) + me-max  (see paws_losses.paws)

Targets use the same network without gradient (no EMA teacher). The labels of the unlabeled batch are
never read: PAWS learns only from the supports' labels.

Defaults: the official CIFAR-10 config (facebookresearch/suncet, ``configs/paws/cifar10_train.yaml``,
identical in ``configs/ropaws/cifar10_train.yaml`` of the RoPAWS commit c70bb99) as ``src/paws_train.py``
``main`` uses it: tau 0.1, sharpening T 0.25, label smoothing 0.1, me-max on, 10 classes x 64 images x 2
views of supports per step (``support_classes=0``: all known classes, which is C = 6 in the open-set
protocol), 6 multi-crops of 18 px (scale 0.3-0.75) next to the two 32 px global views (scale 0.75-1), colour
jitter strength 0.5 (no blur at CIFAR scale), no prediction head, 128-d output, LARS (trust 0.001; biases
and norms excluded from it and from weight decay) lr 3.2 at an unlabeled batch of 256, momentum 0.9,
weight decay 1e-6, cosine to 0.032 after 10 warm-up epochs (``train.min_lr_ratio=0.01``). The heads run
per crop size like the backbone (the reference's ``_forward_backbone`` includes the projection ``fc``).
The loss term by term: :func:`replab.methods.paws_losses.paws` (parity: ``tests/test_paws_parity.py``).

Known differences from the official run: the warm-up here starts from 0 where the reference starts at
0.8 (``start_lr``); the projection hidden width is 512 (ResNet-18 features) where the reference uses 128
(WRN-28-2) or 2048 (ResNet-50); supports are drawn per worker from all labeled images (the reference
splits each class's labeled images between GPUs), and batch norm is per worker (the reference syncs it
over GPUs with apex, single-GPU on CIFAR-10).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from replab.methods import paws_losses, registry
from replab.methods.base import Method, OptimizerDefaults, StepOutput, Support, SupportSpec
from replab.models.heads import mlp
from replab.platform.data.augment import ViewSpec


@dataclass
class PAWSParams:
    tau: float = 0.1
    """Temperature of the soft nearest-neighbour classifier (cosine / tau)."""
    sharpen_temperature: float = 0.25
    label_smoothing: float = 0.1
    me_max: bool = True
    support_classes: int = 0
    """Classes per step in the support set (0: every known class)."""
    support_images_per_class: int = 64
    support_views: int = 2
    n_local_crops: int = 6
    local_crop_size: int = 0
    """Side of the multi-crops; 0: 18 px at 32 px (resolution x 9/16, the CIFAR recipe)."""
    global_scale: tuple[float, float] = (0.75, 1.0)
    local_scale: tuple[float, float] = (0.3, 0.75)
    color_jitter_strength: float = 0.5
    proj_hidden_dim: int = 512
    proj_dim: int = 128
    proj_layers: int = 3
    pred_head: bool = False
    """A prediction head (proj_dim -> proj_dim / 4 -> proj_dim) on the anchors (the reference's ImageNet setting)."""


def paws_views(p: PAWSParams, resolution: int) -> tuple[ViewSpec, ViewSpec]:
    """(global view, local view): random resized crop + flip + colour distortion of strength s."""
    s = p.color_jitter_strength
    blur = 0.5 if resolution >= 64 else 0.0
    common = dict(jitter_p=0.8, brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s, hue=0.2 * s,
                  grayscale_p=0.2, blur_p=blur)
    local = p.local_crop_size or max(8, round(resolution * 9 / 16))
    return (ViewSpec(size=resolution, scale=tuple(p.global_scale), **common),
            ViewSpec(size=local, scale=tuple(p.local_scale), **common))


@registry.register
class PAWS(Method):
    name = "paws"
    summary = "semi-supervised: soft nearest neighbours over labeled supports, cross-view targets (Assran et al. 2021)"
    Params = PAWSParams
    optimizer = OptimizerDefaults(name="lars", lr=3.2, weight_decay=1e-6)
    recipes = {}
    """No ``cpu`` recipe: every step needs a labeled support set, which the CPU reference budget does not have
    (RoPAWS inherits this)."""
    ropaws = False

    def __init__(self, backbone, params: PAWSParams, resolution: int):
        super().__init__(backbone, params, resolution)
        p = params
        self.projector = mlp(backbone.out_dim, p.proj_hidden_dim, p.proj_dim, p.proj_layers)
        self.predictor = None
        if p.pred_head:  # the reference's bn1 -> fc1 -> bn2 -> relu -> fc2 (paws_train.init_model)
            self.predictor = torch.nn.Sequential(torch.nn.BatchNorm1d(p.proj_dim),
                                                 *mlp(p.proj_dim, max(1, p.proj_dim // 4), p.proj_dim))
        self._global, self._local = paws_views(p, resolution)

    def views(self) -> list[ViewSpec]:
        return [self._global] * 2 + [self._local] * self.params.n_local_crops

    def support(self) -> SupportSpec:
        p = self.params
        return SupportSpec(p.support_classes, p.support_images_per_class, (self._global,) * p.support_views)

    def loss_options(self) -> dict:
        p = self.params
        return dict(tau=p.tau, sharpen_temperature=p.sharpen_temperature, label_smoothing=p.label_smoothing,
                    me_max=p.me_max)

    def forward(self, views, labels=None, support: Support | None = None) -> StepOutput:
        # ``labels`` (the unlabeled batch's, -1 or not) are deliberately never used.
        if support is None:
            raise ValueError(f"{self.name} needs a labeled support batch every step: set data.labels_per_class "
                             "(the loop draws it with replab.platform.data.support.support_sampler)")
        n = views[0].shape[0]
        s_views = list(support.views)
        n_sup = sum(v.shape[0] for v in s_views)
        # Same-size crops share one backbone pass (and its batch-norm statistics), as the reference does.
        # The heads too run per crop size, as the reference's WideResNet/ResNet ``forward`` runs
        # ``_forward_backbone`` (backbone + projection ``fc``) and ``_forward_head`` per group: their
        # batch norms never mix 32 px and 18 px crops.
        groups = [torch.cat([*s_views, views[0], views[1]])]
        if len(views) > 2:
            groups.append(torch.cat(views[2:]))
        zs = [self.projector(self.backbone(g)) for g in groups]
        z = torch.cat(zs)  # targets (h in the reference)
        a = torch.cat([self.predictor(x) for x in zs]) if self.predictor is not None else z  # anchors
        support_labels = support.labels.repeat(len(s_views))
        loss, metrics = paws_losses.paws(
            anchors=a[n_sup:],
            anchor_supports=a[:n_sup],
            target_views=list(z[n_sup:n_sup + 2 * n].detach().split(n)),
            target_supports=z[:n_sup].detach(),
            support_labels=support_labels,
            support_images_per_class=self.params.support_images_per_class,
            **self.loss_options(),
        )
        return StepOutput(loss, metrics=metrics, embeddings=z[n_sup:n_sup + n].detach())
