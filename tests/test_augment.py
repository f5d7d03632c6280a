import math

import torch

from replab.platform.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViewSpec,
    crop_boxes,
    gaussian_blur,
    hsv_to_rgb,
    make_views,
    rgb_to_hsv,
)


def images(n=16, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


def test_shapes_dtype_and_multicrop():
    x = images(8, 64)
    views = make_views(x, [ViewSpec(64), ViewSpec(64), ViewSpec(28, scale=(0.05, 0.4))])
    assert [tuple(v.shape) for v in views] == [(8, 3, 64, 64), (8, 3, 64, 64), (8, 3, 28, 28)]
    assert all(v.dtype == torch.float32 for v in views)


def test_range_after_unnormalising():
    spec = ViewSpec(32, blur_p=1.0, solarize_p=0.5, grayscale_p=0.5)
    (v,) = make_views(images(), [spec])
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    raw = v * std + mean
    assert raw.min() >= -1e-4 and raw.max() <= 1 + 1e-4


def test_plain_view_is_identity():
    x = images(4)
    (v,) = make_views(x, [ViewSpec.plain(32)])
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    raw = (v * std + mean) * 255
    assert torch.allclose(raw, x.permute(0, 3, 1, 2).float(), atol=0.6)


def test_per_sample_randomness():
    x = images(1).repeat(16, 1, 1, 1)  # the same image 16 times
    (v,) = make_views(x, [ViewSpec(32)])
    flat = v.flatten(1)
    distinct = {tuple(row[:20].tolist()) for row in flat}
    assert len(distinct) >= 12  # every copy got its own crop / jitter


def test_two_views_differ_and_seeded_runs_repeat():
    x = images(8)
    torch.manual_seed(1)
    a1, b1 = make_views(x, [ViewSpec(32)] * 2)
    torch.manual_seed(1)
    a2, _ = make_views(x, [ViewSpec(32)] * 2)
    assert not torch.allclose(a1, b1)
    assert torch.equal(a1, a2)


def test_crop_boxes_follow_scale_and_stay_inside():
    spec = ViewSpec(32, scale=(0.2, 0.5), ratio=(1.0, 1.0))
    boxes = crop_boxes(4000, spec, "cpu")
    cx, cy, w, h = boxes.unbind(1)
    area = w * h
    assert area.min() >= 0.2 - 1e-5 and area.max() <= 0.5 + 1e-5
    assert (cx - w / 2 >= -1e-6).all() and (cx + w / 2 <= 1 + 1e-6).all()
    assert abs(area.mean().item() - 0.35) < 0.01


def test_hsv_roundtrip_and_blur_preserves_mean():
    x = torch.rand(4, 3, 16, 16)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)
    blurred = gaussian_blur(x, torch.full((4,), 1.5))
    assert torch.allclose(blurred.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.03)
    assert blurred.std() < x.std()


def test_rotation_changes_pixels_but_not_plain():
    x = images(4)
    spec = ViewSpec(32, scale=(1, 1), ratio=(1, 1), flip_p=0, jitter_p=0, grayscale_p=0, rotate_degrees=45)
    (rot,) = make_views(x, [spec])
    (plain,) = make_views(x, [ViewSpec.plain(32)])
    assert not torch.allclose(rot, plain, atol=0.1)
    assert math.isfinite(rot.sum().item())
