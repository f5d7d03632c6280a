"""``bench --only augment``: batched per-sample views on the trainer's device (:func:`make_views`) against the
torchvision per-image pipeline (``transforms.v2`` on PIL images in a ``DataLoader`` with one worker per
core), for a SimCLR view pair at 32 px (cifar10) and a DINO multi-crop set on imagenette128 (2 globals of
128 px + 6 locals of 48 px), same images, images/s and the ratio.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import numpy as np
import torch

from replab.bench.common import cores, interleaved, ratio, sync


def torchvision_transform(spec):
    """The torchvision ``transforms.v2`` per-image pipeline equivalent to one :class:`ViewSpec`."""
    from torchvision.transforms import v2

    from replab.platform.data.augment import IMAGENET_MEAN, IMAGENET_STD

    ops: list[Any] = [v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, antialias=True)]
    if spec.flip_p > 0:
        ops.append(v2.RandomHorizontalFlip(spec.flip_p))
    if spec.jitter_p > 0:
        ops.append(v2.RandomApply([v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)],
                                  p=spec.jitter_p))
    if spec.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(spec.grayscale_p))
    if spec.blur_p > 0:
        k = max(3, int(0.1 * spec.size) // 2 * 2 + 1)
        sigma = tuple(s * spec.size / 224 for s in spec.blur_sigma)
        ops.append(v2.RandomApply([v2.GaussianBlur(k, sigma=sigma)], p=spec.blur_p))
    if spec.solarize_p > 0:
        ops.append(v2.RandomSolarize(128, p=spec.solarize_p))
    ops += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)]
    if spec.normalize:
        ops.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return v2.Compose(ops)


class PILViews(torch.utils.data.Dataset):
    """Decoded uint8 images served as PIL images through per-image transforms (one per view)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transforms: list[Callable] | Callable,
                 multi: bool = False):
        self.images, self.labels, self.transforms, self.multi = images, labels, transforms, multi

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        im = Image.fromarray(self.images[i])
        views = self.transforms(im) if self.multi else [t(im) for t in self.transforms]
        return views, int(self.labels[i])


def dataloader(dataset, batch_size: int, workers: int, drop_last: bool = True):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=drop_last,
        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        multiprocessing_context="fork" if workers > 0 and os.name == "posix" else None,
    )


def bench_augment(root: str, quick: bool, device: torch.device, repeats: int) -> dict[str, Any]:
    from replab.methods.dino import dino_views
    from replab.methods.simclr import simclr_view
    from replab.platform.data.arrays import load_arrays
    from replab.platform.data.augment import make_views

    workers = cores()
    setups = {
        "simclr_pair_32px": ("cifar10", 32, [simclr_view(32)] * 2, 256 if quick else 2048, 256),
        "dino_multicrop_128px_2x128_6x48": (
            "imagenette128", 128,
            [dino_views(128, 0)[0], dino_views(128, 0)[1]]
            + [dataclasses.replace(dino_views(128, 1)[2], size=48)] * 6,
            32 if quick else 256, 32 if quick else 64),
    }
    result: dict[str, Any] = {"device": str(device), "dataloader_workers": workers,
                              "note": "images/s = source images per second (all of their views)"}
    for name, (dataset, res, specs, n, batch) in setups.items():
        images, labels = load_arrays(dataset, root, "train", res, limit=n, seed=0)
        gpu_images = torch.from_numpy(images).to(device)
        loader = dataloader(PILViews(images, labels, [torchvision_transform(s) for s in specs]), batch, workers)
        for _ in loader:  # start the persistent workers outside the timed passes
            break

        def batched():
            sync(device)
            t = time.perf_counter()
            for start in range(0, n - batch + 1, batch):
                views = make_views(gpu_images[start:start + batch], specs)
            sync(device)
            assert len(views) == len(specs)
            return (n // batch) * batch / (time.perf_counter() - t)

        def per_image():
            t = time.perf_counter()
            count = 0
            for views, _ in loader:
                views = [v.to(device, non_blocking=True) for v in views]
                count += views[0].shape[0]
            sync(device)
            return count / (time.perf_counter() - t)

        rates = interleaved({"replab_make_views": batched, "torchvision_dataloader": per_image}, repeats)
        del loader
        result[name] = {
            "dataset": dataset, "images": n, "batch": batch, "views": [s.size for s in specs],
            "images_per_sec": rates,
            "ratio_replab_over_torchvision": ratio(rates["replab_make_views"]["median"],
                                                   rates["torchvision_dataloader"]["median"]),
        }
    return result
