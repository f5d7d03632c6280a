"""RoPAWS (Mo et al., ICLR 2023): PAWS made robust to uncurated unlabeled data (out-of-class images).

PAWS's soft nearest-neighbour classifier is a generative classifier with a kernel density estimate over
the labeled supports. RoPAWS re-estimates the density from the labeled supports *and* the unlabeled batch,
with an in-domain prior that sends images far from every labeled one to an out-of-class state:

    pi(x)  = exp((max_{x' labeled} cos(z, z') - 1) / prior_tau)                       in-domain prior
    P      = (I - C_U)^{-1} C_L Y                                                       label propagation
             C_L, C_U: the kernels exp(cos / tau) to the labeled (x r) and to the other unlabeled rows
             of the gathered batch, row-normalised, times pi(x);
             r = label_ratio x unlabeled images per worker / support images per class per worker
    target = sharpen(P + (1 - p_in) / K),  p_in = P . 1                                out-of-class mass uniform
    loss   = mean_x p_in(x)^prior_pow H(target, snn(anchor)) + me-max                  in-class weighting

(details and the derivation in :func:`replab.methods.paws_losses.ropaws_propagate`). The anchors' predictions,
views, heads, supports and me-max are PAWS's (:mod:`replab.methods.paws`); only the targets and the
per-sample weights change. An unlabeled image next to a labeled one inherits its label; one far from all
labeled images gets a near-uniform target and a small weight, so out-of-class images neither pull the
representation towards a wrong class nor dominate the loss.

r is the official script's: facebookresearch/suncet, RoPAWS commit c70bb99, ``src/losses.py``
``init_paws_loss._snn_semi_each`` computes ``r = label_ratio * u_batch_size / s_batch_size`` and
``src/paws_train.py`` ``main`` passes ``s_batch_size = supervised_imgs_per_class`` (64), so r = 5 x 256 / 64
= 20 on CIFAR-10, not label_ratio x M / N over all support rows (20x smaller there: N counts 10 classes x 2
views). It does not change with the number of workers.

Defaults: PAWS's CIFAR-10 recipe plus the official ``configs/ropaws/cifar10_train.yaml`` values prior_tau
0.1, prior_pow 1, label_ratio 5. Parity with the official formulas: ``tests/test_paws_parity.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from replab.methods import registry
from replab.methods.paws import PAWS, PAWSParams


@dataclass
class RoPAWSParams(PAWSParams):
    prior_tau: float = 0.1
    """Temperature of the in-domain prior exp((max cos to the labeled set - 1) / prior_tau)."""
    prior_pow: float = 1.0
    """Each sample's loss is weighted by its in-class probability to this power (0: unweighted)."""
    label_ratio: float = 5.0
    """Labeled-kernel weight r = label_ratio x unlabeled batch per worker / support images per class (official)."""


@registry.register
class RoPAWS(PAWS):
    name = "ropaws"
    summary = "semi-supervised: PAWS with label propagation and an in-domain prior for uncurated data (Mo et al. 2023)"
    Params = RoPAWSParams

    def loss_options(self) -> dict:
        p = self.params
        return {**super().loss_options(), "ropaws": True, "prior_tau": p.prior_tau, "prior_pow": p.prior_pow,
                "label_ratio": p.label_ratio}
