"""Context encoder (Pathak et al., CVPR 2016): fill in a missing region of an image from its context.

- Mask: a square region of half the image side, at the centre (the paper's central block) or at a random
  position per image (``mask="random"``, its random-block variant). The encoder sees the image with the
  region filled by the mean pixel (0 after normalisation), except a thin ring along its border that stays
  visible: the official code's ``overlapPred`` (4 px at 128 px).
- Network: backbone spatial features (``feature_map`` of a ResNet, patch tokens of a ViT) -> the paper's
  channel-wise fully connected layer (every channel's h x w map fully connected to itself, so information
  crosses the whole image at a cost linear in channels) and a 1x1 convolution -> a decoder of
  upsample-conv-BN-ReLU stages back to the input side -> 3 channels.
- Loss: masked L2 on the region (Eq. 1), with the official code's weight 10 on the overlapping ring;
  normalised by the region's size.
- Adversarial term (off by default, ``adversarial_weight=0``; the paper's joint loss is 0.999 L2 + 0.001
  adv, i.e. a weight of ~0.001): a small discriminator D (strided convs + LeakyReLU, no BatchNorm) scores
  the completed image, the context with the prediction pasted into the region, against the real image.
  Both players are trained by the single loss and optimizer step of the platform:
      L = L_rec + adversarial_weight * L_G + L_D,
      L_G = -log sigma(D_sg(x_fake))                      (non-saturating; D's weights detached)
      L_D = -log sigma(D(x)) - log(1 - sigma(D(sg(x_fake))))  (prediction detached)
  D_sg runs D with detached parameters (``torch.func.functional_call``), so L_G moves only the context
  encoder and L_D only D: the same gradients as alternating updates, computed in one backward. D shares the
  method's optimizer (the official code gives it its own Adam with the same betas and a 10x smaller lr).

Defaults: centre mask of half the side, overlap 4/128 of the side with weight 10, no adversarial term.
Views: crop (scale 0.2-1, ours) and flip, no colour changes (the pixels are the target). Optimizer: the
official Adam, lr 2e-4 with beta1 0.5 at batch 64, as AdamW with the lr scaled linearly to 256: 8e-4,
betas (0.5, 0.999), no weight decay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from replab.methods import losses, registry
from replab.methods._pretext import spatial_features
from replab.methods.base import Method, OptimizerDefaults, StepOutput
from replab.models.backbones import is_vit
from replab.platform.data.augment import ViewSpec


@dataclass
class InpaintingParams:
    mask: Literal["center", "random"] = "center"
    hole_fraction: float = 0.5
    """Side of the square region as a fraction of the image side (64 of 128 px in the paper)."""
    overlap_fraction: float = 4 / 128
    """Width of the visible ring inside the region that is predicted too (4 px at 128 px; at least 1 px)."""
    overlap_weight: float = 10.0
    decoder_dim: int = 256
    """Channels of the first decoder stage (halved at every upsampling, at least 32)."""
    adversarial_weight: float = 0.0
    discriminator_dim: int = 64
    crop_scale_min: float = 0.2


def feature_stride(backbone: nn.Module) -> int:
    """Input pixels per feature-map cell: the ViT's patch size, 8 for a CIFAR-stem ResNet, 32 otherwise."""
    if is_vit(backbone):
        return backbone.patch_size
    return 8 if backbone.conv1.stride[0] == 1 and isinstance(backbone.maxpool, nn.Identity) else 32


class ChannelwiseFC(nn.Module):
    """Pathak et al.'s channel-wise fully connected layer: ``y[c] = W_c x[c] + b_c`` over the h*w positions of
    each channel separately, then a 1x1 convolution to mix channels."""

    def __init__(self, channels: int, positions: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, positions, positions) / math.sqrt(positions))
        self.bias = nn.Parameter(torch.zeros(channels, positions))
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = torch.einsum("bcp,cpq->bcq", x.flatten(2), self.weight) + self.bias
        return self.mix(y.view(n, c, h, w))


def discriminator(width: int, resolution: int) -> nn.Sequential:
    """Strided 4x4 convs with LeakyReLU 0.2 down to 4 px or less, a 1-channel conv, mean -> one logit."""
    layers: list[nn.Module] = []
    channels, side = 3, resolution
    while side > 4:
        layers += [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels, width, side = width, min(2 * width, 512), side // 2
    layers += [nn.Conv2d(channels, 1, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(0)]
    return nn.Sequential(*layers)


@registry.register
class Inpainting(Method):
    name = "inpainting"
    summary = "pretext: reconstruct a masked region from its context (Pathak et al. 2016)"
    Params = InpaintingParams
    optimizer = OptimizerDefaults(name="adamw", lr=8e-4, weight_decay=0.0, betas=(0.5, 0.999))
    recipes = {"cpu": ("method.mask=random",)}
    """cpu: the paper's random-block masks instead of its central region (whose fixed boundary the features latch
    onto, Pathak et al. Sec. 3.3): at the CPU reference budget kNN 0.330 vs 0.291 (random init 0.270; RESULTS)."""

    def __init__(self, backbone, params: InpaintingParams, resolution: int):
        super().__init__(backbone, params, resolution)
        self.hole = max(2, round(resolution * params.hole_fraction))
        self.overlap = max(1, round(resolution * params.overlap_fraction))
        stride = feature_stride(backbone)
        side = max(1, resolution // stride)
        self.bottleneck = ChannelwiseFC(backbone.out_dim, side * side)
        stages, channels, in_channels = [], params.decoder_dim, backbone.out_dim
        for _ in range(max(0, round(math.log2(resolution / side)))):
            stages += [nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
            in_channels, channels = channels, max(32, channels // 2)
        self.decoder = nn.Sequential(*stages, nn.Conv2d(in_channels, 3, 3, padding=1))
        adversarial = params.adversarial_weight > 0
        self.discriminator = discriminator(params.discriminator_dim, resolution) if adversarial else None

    def views(self) -> list[ViewSpec]:
        return [ViewSpec(size=self.resolution, scale=(self.params.crop_scale_min, 1.0), jitter_p=0.0, grayscale_p=0.0)]

    def region_masks(self, n: int, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden, weights)``, both ``[B, 1, H, W]``: the pixels the encoder does not see, and the loss weights
        over the region (1 inside the hidden part, ``overlap_weight`` on the visible ring around it)."""
        if self.params.mask == "center":
            top = torch.full((n, 2), (size - self.hole) // 2, device=device)
        else:
            top = torch.randint(0, size - self.hole + 1, (n, 2), device=device)
        coords = torch.arange(size, device=device)

        def square(start: torch.Tensor, side: int) -> torch.Tensor:
            rows = (coords >= start[:, 0:1]) & (coords < start[:, 0:1] + side)  # [B, H]
            cols = (coords >= start[:, 1:2]) & (coords < start[:, 1:2] + side)
            return (rows[:, :, None] & cols[:, None, :]).unsqueeze(1).float()

        region = square(top, self.hole)
        hidden = square(top + self.overlap, self.hole - 2 * self.overlap)
        return hidden, hidden + self.params.overlap_weight * (region - hidden)

    def forward(self, views, labels=None) -> StepOutput:
        x = views[0]
        hidden, weights = self.region_masks(x.shape[0], x.shape[-1], x.device)
        context = x * (1 - hidden)  # the mean pixel (0 after normalisation) in the hole
        features = spatial_features(self.backbone, context)
        pred = self.decoder(self.bottleneck(features))
        if pred.shape[-1] != x.shape[-1]:
            pred = F.interpolate(pred, size=x.shape[-2:], mode="bilinear", align_corners=False)
        reconstruction = losses.inpainting(pred, x, weights)
        metrics = {"reconstruction": reconstruction.detach()}
        loss = reconstruction
        if self.discriminator is not None:
            region = (weights > 0).float()
            fake = x * (1 - region) + pred * region  # the context with the prediction pasted in
            frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            fake_logits = functional_call(self.discriminator, frozen, (fake,))
            generator = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
            real_logits = self.discriminator(x)
            detached_logits = self.discriminator(fake.detach())
            critic = (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                      + F.binary_cross_entropy_with_logits(detached_logits, torch.zeros_like(detached_logits)))
            loss = loss + self.params.adversarial_weight * generator + critic
            metrics.update(adversarial_g=generator.detach(), adversarial_d=critic.detach())
        return StepOutput(loss, metrics=metrics, embeddings=features.mean(dim=(2, 3)).detach())
