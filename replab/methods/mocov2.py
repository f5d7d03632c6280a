"""MoCo v2 (He et al., CVPR 2020; Chen, Fan, Girshick & He, arXiv 2003.04297): contrast each query with
its key from a momentum encoder and with a queue of keys from earlier batches.

query: encoder -> MLP head (2048 -> 128, ReLU, no BN: MoCo v2's head);  key: momentum (EMA) copy of both.
loss = InfoNCE(q, k+, queue) at temperature 0.2; after each step the momentum encoder moves towards the
query encoder (constant momentum m) and the keys of the GLOBAL batch (gathered over workers) are enqueued,
replacing the oldest ones.

Defaults: the CIFAR-10 setting of the official MoCo CIFAR demo (facebookresearch/moco, colab/moco_cifar10_demo:
queue K = 4096, m = 0.99, SGD lr 0.06 at batch 512 = 0.03 per 256, wd 5e-4) with MoCo v2's MLP head and
temperature 0.2 (the demo uses 0.1). ImageNet (MoCo v2): ``queue_size=65536 momentum=0.999``, wd 1e-4.
Augmentation: MoCo v2's "aug+" (crop 0.2-1, jitter 0.8 of 0.4/0.4/0.4/0.1, grayscale 0.2, blur 0.5 from
64 px up).

Shuffling BN (MoCo Sec. 3.3): with several workers the key encoder sees a random permutation of the global
batch split over the workers (the official ``batch_shuffle_ddp``), so batch statistics cannot leak which key
belongs to which query. On one worker this is a no-op (like the official code on one GPU without SplitBN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from replab.methods import distributed, losses, registry
from replab.methods.base import Method, OptimizerDefaults, StepOutput, ema_update, frozen_copy
from replab.models.heads import mlp
from replab.platform.data.augment import ViewSpec


@dataclass
class MoCoV2Params:
    temperature: float = 0.2
    queue_size: int = 4096
    """Negatives kept (65536 on ImageNet)."""
    momentum: float = 0.99
    """Momentum-encoder EMA coefficient, constant (0.999 on ImageNet)."""
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    shuffle_bn: bool = True


def moco_v2_view(resolution: int) -> ViewSpec:
    """MoCo v2 "aug+": crop 0.2-1, flip, jitter 0.8, grayscale 0.2, blur 0.5 from 64 px up."""
    return ViewSpec(size=resolution, scale=(0.2, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4,
                    saturation=0.4, hue=0.1, grayscale_p=0.2, blur_p=0.5 if resolution >= 64 else 0.0)


@registry.register
class MoCoV2(Method):
    name = "mocov2"
    summary = "contrastive: InfoNCE against a momentum encoder's keys and a queue of negatives (Chen et al. 2020)"
    Params = MoCoV2Params
    optimizer = OptimizerDefaults(name="sgd", lr=0.03, weight_decay=5e-4)
    recipes = {"cpu": ("method.proj_hidden_dim=512",)}
    """cpu: the projector narrowed for a 128-d CPU encoder."""

    def __init__(self, backbone, params: MoCoV2Params, resolution: int):
        super().__init__(backbone, params, resolution)
        self.projector = mlp(backbone.out_dim, params.proj_hidden_dim, params.proj_dim, batch_norm=False)
        self.key_backbone = frozen_copy(backbone)
        self.key_projector = frozen_copy(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(params.queue_size, params.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._new_keys: torch.Tensor | None = None

    def views(self) -> list[ViewSpec]:
        return [moco_v2_view(self.resolution)] * 2

    def forward(self, views, labels=None) -> StepOutput:
        q = self.projector(self.backbone(views[0]))
        k = self._keys(views[1])
        loss = losses.moco_queue_infonce(q, k, self.queue, self.params.temperature)
        if self.training:
            self._new_keys = k
        return StepOutput(loss, embeddings=q.detach())

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        """Keys of ``x`` from the momentum encoder, with shuffling BN across workers."""
        if not self.params.shuffle_bn or distributed.world_size() == 1:
            return self.key_projector(self.key_backbone(x))
        n = x.shape[0]
        x_all = distributed.gather(x.contiguous())  # (views may be channels_last)
        perm = torch.randperm(x_all.shape[0], device=x.device)
        dist.broadcast(perm, src=0)  # one permutation for every worker
        k = self.key_projector(self.key_backbone(x_all[perm][distributed.local_slice(n)]))
        return distributed.gather(k.contiguous())[torch.argsort(perm)][distributed.local_slice(n)]  # un-shuffle

    @torch.no_grad()
    def update_teacher(self) -> None:
        ema_update(self.key_backbone, self.backbone, self.params.momentum)
        ema_update(self.key_projector, self.projector, self.params.momentum)
        if self._new_keys is not None:
            size = self.queue.shape[0]
            keys = F.normalize(distributed.gather(self._new_keys.float()), dim=1)[-size:]  # the global batch
            idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size  # the oldest rows
            self.queue[idx] = keys
            self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)
            self._new_keys = None
