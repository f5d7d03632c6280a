"""MAE (He et al., CVPR 2022): masked autoencoders; reconstruct the pixels of randomly masked patches.

- Mask: a random 75% of the patches of each image (per-sample shuffle by the argsort of uniform noise);
  the ViT encoder runs on the visible 25% only (``backbone.tokens(x, keep)``), no mask tokens in it.
- Decoder: visible latents -> linear to the decoder width, a shared learned mask token at every masked
  position, fixed 2-D sin-cos position embeddings, a few pre-norm Transformer blocks, a linear layer to
  the p*p*3 pixels of each patch. It exists only for pre-training; the encoder is what is evaluated.
- Loss: MSE on the masked patches only, against per-patch normalised pixels (norm_pix; the paper's
  best target, Table 1d). As in the official code the target is the (ImageNet-normalised) input view;
  per-patch normalisation removes the channel-wise affine anyway, up to the per-channel scales.
- Views: random resized crop (scale 0.2-1) + horizontal flip, no colour augmentation (Table 1e, A.1).

Defaults: mask ratio 0.75, norm_pix, AdamW with base lr 1.5e-4 (per 256, scaled linearly), betas
(0.9, 0.95), weight decay 0.05 (Table 8). The paper's decoder (8 blocks, width 512, 16 heads) is for
224 px ViT-B/L/H; at 32-64 px (64 or fewer tokens) the defaults here are 4 blocks of width 256 with 8
heads, to keep the decoder a small fraction of the encoder's cost. The paper's ablations (Table 1a-b)
find that a shallower or narrower decoder costs little fine-tuning accuracy but some linear-probe
accuracy; set ``decoder_depth=8 decoder_dim=512 decoder_heads=16`` for the ImageNet recipe.
Requires a ViT backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from replab.methods import losses, registry
from replab.methods.base import Method, OptimizerDefaults, StepOutput
from replab.models.backbones import VITS, is_vit
from replab.platform.data.augment import ViewSpec


@dataclass
class MAEParams:
    mask_ratio: float = 0.75
    decoder_dim: int = 256
    """Decoder width (512 in the paper at 224 px)."""
    decoder_depth: int = 4
    """Decoder Transformer blocks (8 in the paper at 224 px)."""
    decoder_heads: int = 8
    """Decoder attention heads (16 in the paper); must divide decoder_dim."""
    norm_pix: bool = True
    """Per-patch normalised pixels as the target (the paper's default)."""
    crop_scale_min: float = 0.2


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, 3, H, W] -> [B, (H/p)(W/p), p*p*3]``, patches row-major as the ViT's patch embedding orders them."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings ``[1, 1 + grid^2, dim]`` (zeros for the class token), as in MAE.

    Half the channels encode the row, half the column; each half is [sin(pos w_k), cos(pos w_k)] with
    w_k = 10000^(-k / (dim/4)), k = 0 .. dim/4 - 1.
    """
    if dim % 4:
        raise ValueError(f"method.decoder_dim: {dim} must be a multiple of 4")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def encode(coord: torch.Tensor) -> torch.Tensor:
        angles = coord.reshape(-1, 1) * omega  # [grid^2, dim/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(rows), encode(cols)], dim=1)  # [grid^2, dim]
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).unsqueeze(0).float()


@registry.register
class MAE(Method):
    name = "mae"
    summary = "masked image modelling: reconstruct masked patches from the visible ones (He et al. 2022)"
    Params = MAEParams
    optimizer = OptimizerDefaults(name="adamw", lr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95))

    def __init__(self, backbone, params: MAEParams, resolution: int):
        if not is_vit(backbone):
            raise ValueError(
                f"model.backbone: MAE needs a ViT encoder, not {type(backbone).__name__}; "
                f"choose one of: {', '.join(VITS)}"
            )
        if not 0.0 < params.mask_ratio < 1.0:
            raise ValueError(f"method.mask_ratio: {params.mask_ratio} must be in (0, 1)")
        super().__init__(backbone, params, resolution)
        self.patch_size = backbone.patch_size
        self.num_patches = (resolution // self.patch_size) ** 2
        dim = params.decoder_dim
        self.decoder_embed = nn.Linear(backbone.out_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("decoder_pos", sincos_pos_embed(dim, resolution // self.patch_size), persistent=False)
        self.decoder_blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, params.decoder_heads, 4 * dim, dropout=0.0, activation="gelu",
                                       layer_norm_eps=1e-6, batch_first=True, norm_first=True)
            for _ in range(params.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, self.patch_size**2 * 3)
        # The official initialisation: xavier-uniform linear layers, N(0, 0.02) mask token.
        for module in [self.decoder_embed, self.decoder_blocks, self.decoder_pred]:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def views(self) -> list[ViewSpec]:
        return [ViewSpec(size=self.resolution, scale=(self.params.crop_scale_min, 1.0), flip_p=0.5,
                         jitter_p=0.0, grayscale_p=0.0)]

    def random_masking(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking: ``keep`` ``[B, K]`` visible patch indices, ``restore`` ``[B, N]`` the
        inverse shuffle, ``mask`` ``[B, N]`` (1 = masked) in the original patch order."""
        num_keep = int(self.num_patches * (1 - self.params.mask_ratio))
        noise = torch.rand(n, self.num_patches, device=device)
        shuffle = noise.argsort(dim=1)  # ascending: the lowest-noise patches are kept
        restore = shuffle.argsort(dim=1)
        mask = torch.ones(n, self.num_patches, device=device)
        mask[:, :num_keep] = 0
        return shuffle[:, :num_keep], restore, mask.gather(1, restore)

    def decode(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Encoder output ``[B, 1 + K, D]`` -> predicted pixels ``[B, N, p*p*3]`` of every patch."""
        z = self.decoder_embed(latent)
        n, num_visible = z.shape[0], z.shape[1] - 1
        masked = self.mask_token.expand(n, self.num_patches - num_visible, -1)
        patches = torch.cat([z[:, 1:], masked], dim=1)  # shuffled order: visible first
        patches = patches.gather(1, restore.unsqueeze(-1).expand(-1, -1, z.shape[-1]))  # original order
        z = torch.cat([z[:, :1], patches], dim=1) + self.decoder_pos
        for block in self.decoder_blocks:
            z = block(z)
        return self.decoder_pred(self.decoder_norm(z))[:, 1:]

    def forward(self, views, labels=None) -> StepOutput:
        x = views[0]
        keep, restore, mask = self.random_masking(x.shape[0], x.device)
        latent = self.backbone.tokens(x, keep)  # the encoder sees the visible patches only
        pred = self.decode(latent, restore)
        loss = losses.mae(pred, patchify(x, self.patch_size), mask, self.params.norm_pix)
        return StepOutput(loss, embeddings=latent[:, 0].detach())
