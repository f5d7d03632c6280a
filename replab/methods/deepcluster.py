"""DeepCluster (Caron et al., ECCV 2018), in its v2 form (Caron et al. 2020, the SwAV paper's DeepCluster-v2):
cluster the embeddings of the whole pool with k-means, then learn to predict each image's cluster.

DeepCluster alternates, every epoch: (1) k-means on the features of every training image, (2) training with
the cluster ids as pseudo-labels through a freshly re-initialised classifier. DeepCluster-v2 keeps that loop
but clusters L2-normalised projections with spherical k-means and uses the centroids themselves as the
(non-learned) classifier, so "re-initialising the classifier" is setting it to the new centroids:

    z = normalize(projector(backbone(crop)))            (2 crops per image)
    epoch start: per head h, spherical k-means over the memory bank {z_i} -> centroids C_h, ids a_h(i)
    loss = mean_{h, crops} CE( z . C_h^T / T , a_h(i) )

This is the variant implemented, as it needs no pass over the pool outside the training loop: the memory
bank is filled during the epoch with the crops' embeddings, and k-means runs at the first step of the next
epoch on the bank (what the reference's per-epoch ``init_memory`` / ``cluster_memory`` do).

Image ids. Batches carry no row index, so an image's bank slot is a hash of its pixels (Exemplar's scheme,
:func:`~replab.methods._pretext.image_slots`: a plain view, 8 x 8, 32 levels, universal hash into
``memory_size`` slots). Collisions merge images into one slot, rarely (31.6k distinct slots for CIFAR-10's
50k images in 50k slots). An image whose slot was not yet clustered (the first epoch) takes the nearest
centroid of its own embedding (without gradient) as its pseudo-label. Before the first k-means the centroids
are random unit vectors; the first k-means runs half-way through epoch 0 on the bank filled so far (a
stand-in for the reference's pre-training pass over the pool), then at the start of every epoch.

Distributed: the ids and embeddings of every step are gathered, so every worker holds the same bank; k-means
runs on every worker from the same seed and rank 0's centroids are broadcast (bit-identical everywhere).
Cost: each clustering's wall-clock seconds and FLOPs (heads x iterations x (2 N K D for the assignments +
N D for the sums)) are logged as ``train/kmeans_seconds`` and ``train/kmeans_gflops`` (the last clustering)
and ``train/kmeans_gflops_total``.

Defaults (facebookresearch/swav, main_deepclusterv2.py, the 400-epoch recipe): 3 heads of K = 3000
prototypes, temperature 0.1, 128-d output after a 2048-d hidden layer, 10 k-means iterations, LARS lr 4.8 at
batch 4096 (0.3 per 256), weight decay 1e-6; multi-crop is off here (2 crops, scale 0.14-1, SwAV's colour
distortion). CPU variant: ``num_heads=1 num_prototypes=500 proj_hidden_dim=512 memory_size=8192``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from replab.methods import distributed, registry
from replab.methods._pretext import hash_coefficients, image_slots
from replab.methods.base import Method, OptimizerDefaults, StepOutput
from replab.models.heads import mlp
from replab.platform.data.augment import ViewSpec


@dataclass
class DeepClusterParams:
    num_prototypes: int = 3000
    num_heads: int = 3
    """Independent k-means clusterings (each its own K centroids and pseudo-labels)."""
    temperature: float = 0.1
    kmeans_iterations: int = 10
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    memory_size: int = 50000
    """Slots of the memory bank; images are hashed into them."""


def spherical_kmeans(x: torch.Tensor, k: int, iterations: int, generator: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means of unit rows ``x`` ``[N, D]``: (centroids ``[k, D]`` unit, assignments ``[N]``).

    Init: k rows drawn at random (with replacement when N < k). Then ``iterations`` times: a_i = argmax_c
    x_i . C_c; C_c = normalize(sum of its members), an empty cluster keeping its centroid (the reference's
    rule).
    """
    n = x.shape[0]
    pick = (torch.randperm(n, generator=generator) if n >= k else torch.randint(n, (k,), generator=generator))[:k]
    centroids = x[pick.to(x.device)].clone()
    for _ in range(iterations):
        assign = (x @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        filled = counts > 0
        centroids[filled] = F.normalize(sums[filled], dim=1)
    return centroids, (x @ centroids.T).argmax(dim=1)


@registry.register
class DeepCluster(Method):
    name = "deepcluster"
    summary = "clustering: k-means pseudo-labels of a memory bank every epoch, centroid classifier (Caron et al. 2018/2020)"
    Params = DeepClusterParams
    optimizer = OptimizerDefaults(name="lars", lr=0.3, weight_decay=1e-6)

    def __init__(self, backbone, params: DeepClusterParams, resolution: int):
        super().__init__(backbone, params, resolution)
        p = params
        self.projector = mlp(backbone.out_dim, p.proj_hidden_dim, p.proj_dim)
        seeded = torch.Generator().manual_seed(0)
        centroids = F.normalize(torch.randn(p.num_heads, p.num_prototypes, p.proj_dim, generator=seeded), dim=2)
        self.register_buffer("centroids", centroids)
        self.register_buffer("memory", torch.zeros(p.memory_size, p.proj_dim))
        self.register_buffer("filled", torch.zeros(p.memory_size, dtype=torch.bool))
        self.register_buffer("assignments", torch.full((p.num_heads, p.memory_size), -1, dtype=torch.long))
        self.register_buffer("clustered_epoch", torch.tensor(-1))
        self.register_buffer("kmeans_cost", torch.zeros(3, dtype=torch.float64))  # seconds, GFLOPs, total GFLOPs
        self.register_buffer("hash_coefficients", hash_coefficients(), persistent=False)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def views(self) -> list[ViewSpec]:
        blur = 0.5 if self.resolution >= 64 else 0.0
        crop = ViewSpec(size=self.resolution, scale=(0.14, 1.0), jitter_p=0.8, brightness=0.8, contrast=0.8,
                        saturation=0.8, hue=0.2, grayscale_p=0.2, blur_p=blur)
        return [crop, crop, ViewSpec.plain(self.resolution)]  # the plain view only identifies the image

    def image_ids(self, plain: torch.Tensor) -> torch.Tensor:
        return image_slots(plain, self.hash_coefficients, self.params.memory_size)

    def _due_clustering(self) -> bool:
        epoch, done = self.progress.epoch, int(self.clustered_epoch)
        if epoch > 0:
            return done < epoch
        steps_per_epoch = max(1, self.progress.total_steps // max(1, self.progress.epochs))
        return done < 0 and self.progress.step >= steps_per_epoch // 2 and bool(self.filled.any())

    @torch.no_grad()
    def cluster(self) -> None:
        """k-means of every head over the filled bank slots; sets centroids, assignments and the cost."""
        p, start = self.params, time.perf_counter()
        slots = self.filled.nonzero().squeeze(1)
        x = F.normalize(self.memory[slots].float(), dim=1)
        self.assignments.fill_(-1)
        for h in range(p.num_heads):
            g = torch.Generator().manual_seed(1000 * (int(self.progress.epoch) + 1) + h)  # same on every worker
            centroids, assign = spherical_kmeans(x, p.num_prototypes, p.kmeans_iterations, g)
            if distributed.world_size() > 1:
                dist.broadcast(centroids, src=0)
                assign = (x @ centroids.T).argmax(dim=1)
            self.centroids[h] = centroids.to(self.centroids.dtype)
            self.assignments[h, slots] = assign
        n, k, d = x.shape[0], p.num_prototypes, x.shape[1]
        gflops = p.num_heads * (p.kmeans_iterations + 1) * (2 * n * k * d + n * d) / 1e9
        total = float(self.kmeans_cost[2]) + gflops
        self.kmeans_cost.copy_(torch.tensor([time.perf_counter() - start, gflops, total], dtype=torch.float64))
        self.clustered_epoch.fill_(self.progress.epoch)

    def forward(self, views, labels=None) -> StepOutput:
        p, n = self.params, views[0].shape[0]
        if self.training and self._due_clustering():
            self.cluster()
        ids = self.image_ids(views[2])
        z = F.normalize(self.projector(self.backbone(torch.cat(views[:2]))).float(), dim=1)  # [2n, d]
        centroids = self.centroids.float()
        with torch.autocast(z.device.type, enabled=False):
            logits = torch.einsum("nd,hkd->hnk", z, centroids) / p.temperature  # [heads, 2n, K]
            with torch.no_grad():
                own = F.normalize(z.detach().view(2, n, -1).mean(dim=0), dim=1)
                nearest = torch.einsum("nd,hkd->hnk", own, centroids).argmax(dim=2)  # [heads, n]
                targets = self.assignments[:, ids]
                targets = torch.where(targets >= 0, targets, nearest).repeat(1, 2)  # [heads, 2n]
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        if self.training:
            self._pending = (distributed.gather(ids), distributed.gather(z.detach().view(2, n, -1).mean(dim=0)))
        seconds, gflops, total = self.kmeans_cost.float()
        agree = (logits.detach().argmax(dim=2) == targets).float().mean()
        metrics = {"cluster_acc": agree, "kmeans_seconds": seconds, "kmeans_gflops": gflops,
                   "kmeans_gflops_total": total}
        return StepOutput(loss, metrics=metrics, embeddings=z[:n].detach())

    @torch.no_grad()
    def update_teacher(self) -> None:
        """Write the batch's embeddings (mean of its two crops, normalised) into their bank slots."""
        if self._pending is None:
            return
        ids, emb = self._pending
        self._pending = None
        self.memory.index_copy_(0, ids, F.normalize(emb, dim=1).to(self.memory.dtype))
        self.filled[ids] = True
