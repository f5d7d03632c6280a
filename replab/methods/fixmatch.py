"""FixMatch (Sohn et al., NeurIPS 2020): consistency between weak and strong augmentations through
confidence-thresholded pseudo-labels (semi-supervised).

Every step sees the unlabeled batch (one weak and one strong view per image) and a class-balanced labeled
support set (:class:`~replab.methods.base.SupportSpec`, the same labeled split and sampler as PAWS, so the
run joins the open-set protocol); one classifier p(y | x) = softmax(W backbone(x)) over the C known classes:

    l_s = 1/B sum_b CE(y_b, p(y | weak(x_b)))                                  (labeled support, weak view)
    q_b = p(y | weak(u_b)) (no gradient),  yhat_b = argmax q_b
    l_u = 1/(mu B) sum_b 1(max q_b >= tau) CE(yhat_b, p(y | strong(u_b)))       (Eq. 2-4)
    loss = l_s + lambda_u l_u

The labels of the unlabeled batch are never read.

Defaults (the paper, CIFAR-10): tau = 0.95, lambda_u = 1, mu = 7 (unlabeled batch = 7 x the labeled one: the
64 labeled images per step of the paper are ``support_images_per_class=6`` x 10 classes here, with
``train.batch_size=448``), SGD lr 0.03 (at 448 unlabeled images: 0.017 per 256), momentum 0.9, weight decay
5e-4. Not done: Nesterov momentum, the paper's cos(7 pi k / 16 K) decay (replab's cosine schedule instead)
and the EMA model used for evaluation.

Augmentations. Weak: flip and a crop of at least (1 - 0.125)^2 of the area (the paper's flip + translation
by up to 12.5%, here with some zoom). Strong (RandAugment + Cutout in the paper) is approximated with what
:class:`~replab.platform.data.augment.ViewSpec` supports, all per sample: crop 0.25-1 (TranslateX/Y), rotation
up to 30 degrees (Rotate), colour jitter always (Brightness, Contrast, Color; hue), grayscale 0.2, solarize
0.2 (Solarize), blur 0.5 from 64 px up, then Cutout: one square of half the view's side set to 0 (grey after
normalisation) at a random centre, as the reference. Missing RandAugment ops: AutoContrast, Equalize,
Posterize, Sharpness, ShearX/Y; magnitudes are random per sample rather than RandAugment's 2 ops of random
magnitude. CPU variant: ``support_images_per_class=2`` with a train.batch_size of 64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from replab.methods import registry
from replab.methods.base import Method, OptimizerDefaults, StepOutput, Support, SupportSpec
from replab.platform.data.augment import ViewSpec


@dataclass
class FixMatchParams:
    threshold: float = 0.95
    unlabeled_weight: float = 1.0
    """lambda_u."""
    num_classes: int = 10
    """Classifier outputs; at least the number of known classes (the support labels are 0..C-1)."""
    support_classes: int = 0
    """Classes per step in the support set (0: every known class)."""
    support_images_per_class: int = 6
    cutout_fraction: float = 0.5
    """Side of the Cutout square as a fraction of the view (0: no Cutout)."""


def fixmatch_views(resolution: int) -> tuple[ViewSpec, ViewSpec]:
    """(weak, strong): see the module docstring."""
    weak = ViewSpec(size=resolution, scale=(0.875**2, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0)
    strong = ViewSpec(size=resolution, scale=(0.25, 1.0), jitter_p=1.0, brightness=0.9, contrast=0.9,
                      saturation=0.9, hue=0.1, grayscale_p=0.2, solarize_p=0.2, rotate_degrees=30.0,
                      blur_p=0.5 if resolution >= 64 else 0.0)
    return weak, strong


def cutout(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Zero one square of side ``fraction`` x the view's side per image, centred uniformly (clipped at edges)."""
    if fraction <= 0:
        return x
    n, _, h, w = x.shape
    side = max(1, int(round(fraction * min(h, w))))
    cy = torch.randint(h, (n, 1, 1), device=x.device)
    cx = torch.randint(w, (n, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((rows - cy).abs() * 2 < side) & ((cols - cx).abs() * 2 < side)
    return x.masked_fill(inside.unsqueeze(1), 0.0)


@registry.register
class FixMatch(Method):
    name = "fixmatch"
    summary = "semi-supervised: confident weak-view pseudo-labels supervise strong views (Sohn et al. 2020)"
    Params = FixMatchParams
    optimizer = OptimizerDefaults(name="sgd", lr=0.017, weight_decay=5e-4)

    def __init__(self, backbone, params: FixMatchParams, resolution: int):
        super().__init__(backbone, params, resolution)
        self.classifier = nn.Linear(backbone.out_dim, params.num_classes)
        self._weak, self._strong = fixmatch_views(resolution)

    def views(self) -> list[ViewSpec]:
        return [self._weak, self._strong]

    def support(self) -> SupportSpec:
        p = self.params
        return SupportSpec(p.support_classes, p.support_images_per_class, (self._weak,))

    def forward(self, views, labels=None, support: Support | None = None) -> StepOutput:
        # ``labels`` (the unlabeled batch's, -1 or not) are deliberately never used.
        if support is None:
            raise ValueError(f"{self.name} needs a labeled support batch every step: set data.labels_per_class "
                             "(the loop draws it with replab.platform.data.support.support_sampler)")
        p = self.params
        if int(support.labels.max()) >= p.num_classes:
            raise ValueError(f"method.num_classes: {p.num_classes} is fewer than the "
                             f"{int(support.labels.max()) + 1} known classes of the support set; raise it")
        n, s_views = views[0].shape[0], list(support.views)
        n_sup = sum(v.shape[0] for v in s_views)
        strong = cutout(views[1], p.cutout_fraction)
        features = self.backbone(torch.cat([*s_views, views[0], strong]))  # one pass: shared BN statistics
        logits = self.classifier(features).float()
        sup_logits, weak_logits, strong_logits = logits[:n_sup], logits[n_sup:n_sup + n], logits[n_sup + n:]
        loss_s = F.cross_entropy(sup_logits, support.labels.repeat(len(s_views)))
        with torch.no_grad():
            confidence, pseudo = torch.softmax(weak_logits.detach(), dim=1).max(dim=1)
            mask = (confidence >= p.threshold).float()
        loss_u = (F.cross_entropy(strong_logits, pseudo, reduction="none") * mask).mean()
        loss = loss_s + p.unlabeled_weight * loss_u
        metrics = {"loss_labeled": loss_s.detach(), "loss_unlabeled": loss_u.detach(), "mask_rate": mask.mean(),
                   "support_acc": (sup_logits.argmax(dim=1) == support.labels.repeat(len(s_views))).float().mean()}
        return StepOutput(loss, metrics=metrics, embeddings=features[n_sup:n_sup + n].detach())
