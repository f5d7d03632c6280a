"""Batched per-sample augmentation on the trainer's device.

The data pipeline ships uint8 ``[B, H, W, 3]`` batches; :func:`make_views` turns one batch into the views a
method declares (:class:`ViewSpec`), every sample with its own random parameters, as a handful of batched
tensor ops on the GPU (or CPU) instead of a per-image PIL pipeline in DataLoader workers:

- random resized crop + horizontal flip + optional rotation: one affine ``grid_sample`` per view, the crop
  box drawn as in torchvision's ``RandomResizedCrop`` (area fraction ``scale``, log-uniform aspect ``ratio``);
- colour jitter (brightness, contrast, saturation, hue in HSV), applied with probability ``jitter_p`` in the
  fixed order b, c, s, h (torchvision permutes the order per image; the distribution of each factor is
  the same);
- random grayscale, Gaussian blur (per-sample sigma, separable, kernel ~10% of the view side), solarize;
- normalisation with the ImageNet mean and std.

Multi-crop is a list of specs with different sizes (e.g. DINO's 2 global + N local crops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view of each image. Probabilities are per sample."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    rotate_degrees: float = 0.0
    """Uniform random rotation in [-deg, deg] folded into the crop's affine map."""
    normalize: bool = True

    @classmethod
    def plain(cls, size: int) -> "ViewSpec":
        """The whole image resized to ``size``, no randomness (evaluation, pretext tasks)."""
        return cls(size=size, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` (or ``[B, 3, H, W]``) -> float ``[B, 3, H, W]`` in [0, 1]."""
    if images.ndim != 4:
        raise ValueError(f"expected a 4-d image batch, got shape {tuple(images.shape)}")
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased resize of a float batch to ``size`` x ``size`` (no-op when already that size)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _uniform(n: int, low: float, high: float, device, generator=None) -> torch.Tensor:
    return torch.rand(n, device=device, generator=generator) * (high - low) + low


def _bernoulli(n: int, p: float, device, generator=None) -> torch.Tensor:
    if p <= 0:
        return torch.zeros(n, dtype=torch.bool, device=device)
    if p >= 1:
        return torch.ones(n, dtype=torch.bool, device=device)
    return torch.rand(n, device=device, generator=generator) < p


def crop_boxes(n: int, spec: ViewSpec, device, generator=None) -> torch.Tensor:
    """Per-sample crop boxes ``[n, 4]`` = (center x, center y, width, height) as fractions of the image.

    Area fraction s ~ U(scale), aspect r ~ logU(ratio): w = sqrt(s r), h = sqrt(s / r), clamped to the
    image, and the centre uniform over the positions that keep the box inside it.
    """
    area = _uniform(n, spec.scale[0], spec.scale[1], device, generator)
    log_ratio = _uniform(n, math.log(spec.ratio[0]), math.log(spec.ratio[1]), device, generator)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = w / 2 + torch.rand(n, device=device, generator=generator) * (1 - w)
    cy = h / 2 + torch.rand(n, device=device, generator=generator) * (1 - h)
    return torch.stack([cx, cy, w, h], dim=1)


def crop_flip_rotate(images: torch.Tensor, spec: ViewSpec, generator=None) -> torch.Tensor:
    """Random resized crop, flip and rotation of a float ``[B, 3, H, W]`` batch as one ``grid_sample``."""
    n, device = images.shape[0], images.device
    # Minifying more than 2x with bilinear sampling aliases: pre-shrink the source once, antialiased.
    if images.shape[-1] > 2 * spec.size:
        images = resize(images, 2 * spec.size)
    cx, cy, w, h = crop_boxes(n, spec, device, generator).unbind(1)
    flip = torch.where(_bernoulli(n, spec.flip_p, device, generator), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device)
    if spec.rotate_degrees > 0:
        angle = _uniform(n, -spec.rotate_degrees, spec.rotate_degrees, device, generator) * (math.pi / 180)
        cos, sin = torch.cos(angle), torch.sin(angle)
    else:
        cos, sin = torch.ones(n, device=device), torch.zeros(n, device=device)
    # Output coords (u, v) in [-1, 1] -> source coords: centre + R(angle) @ diag(w * flip, h) @ (u, v).
    theta[:, 0, 0] = cos * w * flip
    theta[:, 0, 1] = -sin * h
    theta[:, 1, 0] = sin * w * flip
    theta[:, 1, 1] = cos * h
    theta[:, 0, 2] = 2 * cx - 1
    theta[:, 1, 2] = 2 * cy - 1
    grid = F.affine_grid(theta, [n, 3, spec.size, spec.size], align_corners=False)
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma ``[B, 1, H, W]`` (the weights torchvision uses)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hr = ((g - b) / safe) % 6
    hg = (b - r) / safe + 2
    hb = (r - g) / safe + 4
    hue = torch.where(maxc == r, hr, torch.where(maxc == g, hg, hb))
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue)) % 1.0
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([hue, sat, maxc], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def color_jitter(x: torch.Tensor, spec: ViewSpec, generator=None) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter with per-sample factors, on a ``jitter_p`` subset."""
    n, device = x.shape[0], x.device
    apply = _bernoulli(n, spec.jitter_p, device, generator).view(n, 1, 1, 1)
    if not apply.any():
        return x
    out = x
    if spec.brightness > 0:
        b = _uniform(n, max(0.0, 1 - spec.brightness), 1 + spec.brightness, device, generator).view(n, 1, 1, 1)
        out = (out * b).clamp(0, 1)
    if spec.contrast > 0:
        c = _uniform(n, max(0.0, 1 - spec.contrast), 1 + spec.contrast, device, generator).view(n, 1, 1, 1)
        mean = grayscale(out).mean(dim=(1, 2, 3), keepdim=True)
        out = ((out - mean) * c + mean).clamp(0, 1)
    if spec.saturation > 0:
        s = _uniform(n, max(0.0, 1 - spec.saturation), 1 + spec.saturation, device, generator).view(n, 1, 1, 1)
        gray = grayscale(out)
        out = ((out - gray) * s + gray).clamp(0, 1)
    if spec.hue > 0:
        shift = _uniform(n, -spec.hue, spec.hue, device, generator).view(n, 1, 1)
        hsv = rgb_to_hsv(out)
        hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
        out = hsv_to_rgb(hsv).clamp(0, 1)
    return torch.where(apply, out, x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample ``sigma`` ``[B]`` (pixels); kernel side ~10% of the image."""
    n, c, h, w = x.shape
    k = max(3, int(0.1 * min(h, w)) // 2 * 2 + 1)
    offsets = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kernel = torch.exp(-(offsets.view(1, k) ** 2) / (2 * sigma.view(n, 1).to(x.dtype) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.repeat_interleave(c, dim=0)  # [n * c, k]
    flat = x.reshape(1, n * c, h, w)
    flat = F.pad(flat, (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, k, 1), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, k), groups=n * c)
    return flat.view(n, c, h, w)


def augment(x: torch.Tensor, spec: ViewSpec, generator=None) -> torch.Tensor:
    """One view of a float ``[B, 3, H, W]`` batch in [0, 1]; returns ``[B, 3, size, size]``."""
    n, device = x.shape[0], x.device
    out = crop_flip_rotate(x, spec, generator)
    out = color_jitter(out, spec, generator)
    if spec.grayscale_p > 0:
        gray = _bernoulli(n, spec.grayscale_p, device, generator).view(n, 1, 1, 1)
        out = torch.where(gray, grayscale(out).expand_as(out), out)
    if spec.blur_p > 0:
        blur = _bernoulli(n, spec.blur_p, device, generator).view(n, 1, 1, 1)
        # Published blur sigmas are for 224 px views; scale them to this view's side.
        sigma = _uniform(n, *spec.blur_sigma, device, generator) * (spec.size / 224)
        out = torch.where(blur, gaussian_blur(out, sigma.clamp(min=1e-3)), out)
    if spec.solarize_p > 0:
        sol = _bernoulli(n, spec.solarize_p, device, generator).view(n, 1, 1, 1)
        out = torch.where(sol & (out >= 0.5), 1.0 - out, out)
    return normalize(out) if spec.normalize else out


def make_views(images: torch.Tensor, specs: list[ViewSpec], generator=None) -> list[torch.Tensor]:
    """The views ``specs`` of a uint8 ``[B, H, W, 3]`` batch, computed on the batch's device."""
    x = to_float(images)
    return [augment(x, spec, generator) for spec in specs]
