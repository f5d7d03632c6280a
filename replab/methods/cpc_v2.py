"""CPC v2 (Hénaff et al., ICML 2020; CPC: van den Oord, Li & Vinyals 2018): contrastive predictive coding on
a grid of overlapping patches.

- Patches: the view is cut into a G x G grid of overlapping square patches (side ``patch_fraction`` of the
  view, stride half a patch): 64 px patches with stride 32 on a 7 x 7 grid at 256 px in the paper, 8 px
  patches with stride 4 on a 7 x 7 grid at 32 px here.
- Patch encoder f: the backbone applied to every patch alone, pooled: z_{i,j} = f(x_{i,j}) ``[B, D, G, G]``.
- Context network g_ar: a PixelCNN-style stack of residual blocks whose convolutions are causal in rows
  (a 2 x 3 kernel padded only above), so c_{i,j} sees the latents of rows <= i only.
- Predictions: for each offset k = 1..K a linear map W_k predicts the latent k rows below,
  zhat_{i+k,j} = W_k c_{i,j}, and InfoNCE scores it against every patch latent of the batch:

      L = - mean_{i,j,k} log( exp(zhat_{i+k,j} . z_{i+k,j}) / sum_{z' in batch patches} exp(zhat_{i+k,j} . z') )

  (the positive is the true patch, the negatives are all other patches of all images of the local batch,
  including the other patches of the same image, as in the paper).
- Directions: ``directions=1`` predicts top-down (CPC v1); 2 adds bottom-up and 4 adds left-right and
  right-left (the grid rotated by 90 degree steps, one context network and one set of W_k per direction),
  the extra directions CPC v2 reports helping.

Defaults: the paper's 7 x 7 grid, K = 5 offsets (CPC v1 predicts up to 5 rows below), context network of
``context_layers`` residual blocks (CPC v2 uses a deeper PixelCNN; 5 blocks here), a random crop of the
image (scale 0.3-1) with colour jitter and grayscale per image as the view (CPC v2 augments each patch
separately: its colour dropping, spatial jitter and contrast are per patch; here they are per image), Adam
lr 4e-4 (CPC v2). Deviations: the backbone keeps its BatchNorm (CPC v2 swaps it for LayerNorm because batch
statistics leak information between patches of one image), and the negatives are local to the worker.
CPU variant: ``prediction_steps=2 context_layers=2 directions=1`` (a third of the compute of the context
network and the losses).

The evaluated encoder is the backbone on the whole image (as every replab method); CPC's own protocol
mean-pools the patch latents instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from replab.methods import losses, registry
from replab.methods._pretext import fit_to_backbone
from replab.methods.base import Method, OptimizerDefaults, StepOutput
from replab.platform.data.augment import ViewSpec


@dataclass
class CPCv2Params:
    patch_fraction: float = 0.25
    """Patch side as a fraction of the view (64 of 256 px in the paper; 8 of 32 px here); stride = side / 2."""
    prediction_steps: int = 5
    """K: rows ahead predicted from each context vector."""
    context_layers: int = 5
    context_dim: int = 0
    """Hidden width of the context network's blocks; 0: the backbone's feature width."""
    directions: int = 1
    """1: top-down; 2: + bottom-up; 4: + left-right and right-left."""
    crop_scale: tuple[float, float] = (0.3, 1.0)


class RowCausalBlock(nn.Module):
    """A PixelCNN-style residual block, causal in rows: 1x1 -> 2x3 conv padded above only -> 1x1, + input."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.reduce = nn.Conv2d(dim, hidden, 1)
        self.causal = nn.Conv2d(hidden, hidden, (2, 3))
        self.expand = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.reduce(F.relu(x)))
        h = F.relu(self.causal(F.pad(h, (1, 1, 1, 0))))  # (left, right, top, bottom): row i sees rows i-1, i
        return x + self.expand(h)


def patch_grid(x: torch.Tensor, patch: int) -> tuple[torch.Tensor, int]:
    """``[B, G*G, C, p, p]`` overlapping patches (stride p // 2, row-major) of ``x`` ``[B, C, H, W]``, and G."""
    stride = max(1, patch // 2)
    n, c = x.shape[:2]
    cols = F.unfold(x, kernel_size=patch, stride=stride)  # [B, C*p*p, G*G]
    g = int(round(cols.shape[-1] ** 0.5))
    return cols.transpose(1, 2).reshape(n, g * g, c, patch, patch), g


def cpc_infonce(pred: torch.Tensor, target: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed InfoNCE of predictions ``[M, D]`` whose positives are rows ``target`` ``[M]`` of ``candidates``
    ``[N, D]`` (all other rows are negatives): sum_m -log softmax(pred_m . candidates^T)[target_m]; and the
    number of predictions whose positive scores highest."""
    with losses.full_precision(pred):
        logits = pred.float() @ candidates.float().T
        correct = (logits.detach().argmax(dim=1) == target).sum()
        return F.cross_entropy(logits, target, reduction="sum"), correct


@registry.register
class CPCv2(Method):
    name = "cpc_v2"
    summary = "contrastive: predict patch latents rows ahead from a causal context, InfoNCE (Hénaff et al. 2020)"
    Params = CPCv2Params
    optimizer = OptimizerDefaults(name="adamw", lr=4e-4, weight_decay=1e-5)
    recipes = {"cpu": ("method.patch_fraction=0.5", "method.prediction_steps=2", "method.context_layers=2")}
    """cpu: a 3x3 grid of 16 px patches with 2 prediction steps and 2 context layers (the paper's 7x7 grid of 8 px
    patches runs at 51 img/s on the 2-core CPU)."""

    def __init__(self, backbone, params: CPCv2Params, resolution: int):
        super().__init__(backbone, params, resolution)
        if params.directions not in (1, 2, 4):
            raise ValueError(f"method.directions: {params.directions} is not valid; choose one of: 1, 2, 4")
        self.patch = max(2, int(round(resolution * params.patch_fraction)))
        dim = backbone.out_dim
        hidden = params.context_dim or dim
        self.context = nn.ModuleList(
            nn.Sequential(*[RowCausalBlock(dim, hidden) for _ in range(params.context_layers)])
            for _ in range(params.directions)
        )
        # W_k for every direction and offset, as 1x1 convolutions over the context grid.
        self.predictors = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(dim, dim, 1, bias=False) for _ in range(params.prediction_steps))
            for _ in range(params.directions)
        )

    def views(self) -> list[ViewSpec]:
        return [ViewSpec(size=self.resolution, scale=tuple(self.params.crop_scale), jitter_p=0.8, brightness=0.4,
                         contrast=0.4, saturation=0.4, hue=0.1, grayscale_p=0.25)]

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """Patch latents z ``[B, D, G, G]``: the backbone on every patch, siamese."""
        patches, g = patch_grid(x, self.patch)
        n = patches.shape[0]
        z = self.backbone(fit_to_backbone(patches.flatten(0, 1), self.backbone))  # [B*G*G, D]
        return z.view(n, g, g, -1).permute(0, 3, 1, 2)

    def forward(self, views, labels=None) -> StepOutput:
        z = self.latents(views[0])
        n, d, g, _ = z.shape
        candidates = z.permute(0, 2, 3, 1).reshape(-1, d)  # every patch of the batch, row-major per image
        ids = torch.arange(n * g * g, device=z.device).view(n, g, g)
        total = z.new_zeros((), dtype=torch.float32)
        count, correct = 0, z.new_zeros(())
        for direction, (context_net, predictors) in enumerate(zip(self.context, self.predictors)):
            zr = torch.rot90(z, direction, dims=(2, 3))  # direction r: "rows below" in the rotated grid
            idr = torch.rot90(ids, direction, dims=(1, 2))
            context = context_net(zr)
            for k, w_k in enumerate(predictors, start=1):
                if k >= g:
                    break
                pred = w_k(context[:, :, : g - k])  # from rows 0 .. G-k-1 to rows k .. G-1
                pred = pred.permute(0, 2, 3, 1).reshape(-1, d)
                target = idr[:, k:].reshape(-1)
                loss_sum, hits = cpc_infonce(pred, target, candidates)
                total, correct, count = total + loss_sum, correct + hits, count + pred.shape[0]
        loss = total / max(count, 1)
        return StepOutput(loss, metrics={"cpc_acc": (correct.float() / max(count, 1)).detach()},
                          embeddings=z.mean(dim=(2, 3)).detach())
