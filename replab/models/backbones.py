"""Encoders: torchvision ResNets (width multiplier, CIFAR stem) and ViTs (tiny/small/base, width multiplier).

Every backbone maps ``[B, 3, H, W]`` float images to ``[B, out_dim]`` features (the pooled ResNet output or
the ViT class token) and carries ``out_dim``. ViTs also expose ``patch_size`` and ``tokens(x, keep)`` so that
masked-image methods can run the encoder on a subset of patches (MAE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models import vision_transformer as tv_vit


@dataclass(frozen=True)
class ResNetSpec:
    block: type
    layers: tuple[int, int, int, int]


@dataclass(frozen=True)
class ViTSpec:
    layers: int
    heads: int
    dim: int
    mlp_dim: int


RESNETS = {
    "resnet18": ResNetSpec(tv_resnet.BasicBlock, (2, 2, 2, 2)),
    "resnet34": ResNetSpec(tv_resnet.BasicBlock, (3, 4, 6, 3)),
    "resnet50": ResNetSpec(tv_resnet.Bottleneck, (3, 4, 6, 3)),
    "resnet101": ResNetSpec(tv_resnet.Bottleneck, (3, 4, 23, 3)),
}
VITS = {
    "vit_tiny": ViTSpec(12, 3, 192, 768),
    "vit_small": ViTSpec(12, 6, 384, 1536),
    "vit_base": ViTSpec(12, 12, 768, 3072),
}
BACKBONES = (*RESNETS, *VITS)


class ResNetEncoder(tv_resnet.ResNet):
    """torchvision's ResNet with every stage's width scaled by ``width`` and an optional CIFAR stem.

    The CIFAR stem (He et al. 2016, Sec. 4.2; SimCLR Appendix B.9) is a 3x3 stride-1 convolution with no
    max-pool, so 32 px images keep a 4x4 map before pooling instead of 1x1.
    """

    def __init__(self, spec: ResNetSpec, width: float = 1.0, cifar_stem: bool = False):
        nn.Module.__init__(self)
        planes = [max(8, int(round(p * width))) for p in (64, 128, 256, 512)]
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = planes[0]
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, planes[0], kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(spec.block, planes[0], spec.layers[0])
        self.layer2 = self._make_layer(spec.block, planes[1], spec.layers[1], stride=2)
        self.layer3 = self._make_layer(spec.block, planes[2], spec.layers[2], stride=2)
        self.layer4 = self._make_layer(spec.block, planes[3], spec.layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        self.out_dim = planes[3] * spec.block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's ``[B, C, h, w]`` map (before pooling)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.feature_map(x)), 1)


class ViTEncoder(tv_vit.VisionTransformer):
    """torchvision's VisionTransformer returning the class token, with a patch-subset path for MAE."""

    def __init__(self, spec: ViTSpec, image_size: int, patch_size: int):
        super().__init__(
            image_size=image_size,
            patch_size=patch_size,
            num_layers=spec.layers,
            num_heads=spec.heads,
            hidden_dim=spec.dim,
            mlp_dim=spec.mlp_dim,
        )
        self.heads = nn.Identity()
        self.out_dim = spec.dim
        self.num_patches = (image_size // patch_size) ** 2

    def patch_embed(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, N, D]`` patch embeddings plus their position embeddings (no class token)."""
        n, _, h, w = x.shape
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        pos = self.encoder.pos_embedding[:, 1:]
        if pos.shape[1] != x.shape[1]:
            pos = _resize_pos_embedding(pos, x.shape[1])
        return x + pos

    def tokens(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output ``[B, 1 + K, D]`` (class token first) over the patches ``keep`` ``[B, K]``."""
        patches = self.patch_embed(x)
        if keep is not None:
            patches = torch.gather(patches, 1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        cls = (self.class_token + self.encoder.pos_embedding[:, :1]).expand(patches.shape[0], -1, -1)
        seq = torch.cat([cls, patches], dim=1)
        return self.encoder.ln(self.encoder.layers(self.encoder.dropout(seq)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)[:, 0]


def _resize_pos_embedding(pos: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Bicubic interpolation of a square grid of position embeddings to ``num_patches`` (multi-crop)."""
    old = int(math.isqrt(pos.shape[1]))
    new = int(math.isqrt(num_patches))
    grid = pos.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)


def vit_spec(name: str, width: float = 1.0) -> ViTSpec:
    """The ViT ``name`` with its token width (and MLP width) scaled by ``width``, depth and heads kept: the token
    width is ``heads * round(dim * width / heads)`` (at least 8 per head), so ``vit_tiny`` at width 0.5 has 3 heads
    of 32 (dim 96, MLP 384)."""
    spec = VITS[name]
    if width == 1.0:
        return spec
    per_head = max(8, int(round(spec.dim * width / spec.heads)))
    dim = per_head * spec.heads
    return ViTSpec(spec.layers, spec.heads, dim, dim * spec.mlp_dim // spec.dim)


def default_patch_size(resolution: int) -> int:
    """4 px patches at 32 px (8x8 tokens), 8 at 64 px, 16 from 96 px up (as in ViT / DeiT at 224)."""
    if resolution <= 32:
        return 4
    if resolution <= 64:
        return 8
    return 16


def input_problem(name: str, resolution: int, patch_size: int | None = None) -> str | None:
    """Why backbone ``name`` cannot take ``resolution`` px images (one line naming the key), or None.

    ResNets take any side >= 8 (the stride-32 stem pools to 1x1); a ViT needs a patch no larger than the
    image and dividing it (``model.patch_size``, default :func:`default_patch_size`).
    """
    if name in VITS:
        patch = patch_size or default_patch_size(resolution)
        if patch > resolution or resolution % patch:
            return (f"data.resolution: {resolution} is not valid for {name}; it must be a multiple of "
                    f"model.patch_size={patch} (e.g. {max(patch, resolution // patch * patch)})")
    return None


def build_backbone(
    name: str,
    resolution: int,
    width: float = 1.0,
    cifar_stem: str | bool = "auto",
    patch_size: int | None = None,
) -> nn.Module:
    """Build the encoder ``name`` for square images of side ``resolution``."""
    if name in RESNETS:
        stem = resolution <= 64 if cifar_stem in ("auto", None) else cifar_stem in (True, "on")
        return ResNetEncoder(RESNETS[name], width=width, cifar_stem=stem)
    if name in VITS:
        patch = patch_size or default_patch_size(resolution)
        if resolution % patch:
            raise ValueError(f"model.patch_size: {patch} does not divide data.resolution={resolution}")
        return ViTEncoder(vit_spec(name, width), image_size=resolution, patch_size=patch)
    raise ValueError(f"model.backbone: {name!r} is not valid; choose one of: {', '.join(BACKBONES)}")


def is_vit(backbone: nn.Module) -> bool:
    return isinstance(backbone, ViTEncoder)
