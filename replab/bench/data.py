"""``bench --only data``: decoded images/s per CPU core from parquet shards (cifar10, imagenette128) and from a
temporary image folder of JPEGs written from the same parquet bytes; single-threaded
:mod:`replab.platform.data.decode` through :func:`replab.platform.data.arrays.load_arrays` (``num_threads=1``),
and through Ray Data (:func:`replab.platform.data.pipeline.build_train_dataset`) when ``ray`` is selected.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from replab.bench.common import cores, encoded_images, interleaved, write_image_folder


def bench_data(root: str, quick: bool, use_ray: bool, repeats: int) -> dict[str, Any]:
    """Decoded images/s per core: raw decode, parquet -> arrays, image folder -> arrays (, Ray Data)."""
    from replab.platform.data.arrays import load_arrays
    from replab.platform.data.decode import decode_batch

    sets = {"cifar10": (32, 256 if quick else 2048), "imagenette128": (128, 64 if quick else 512)}
    result: dict[str, Any] = {"cores": cores(), "note": "single-threaded rates are per core"}
    with tempfile.TemporaryDirectory(prefix="replab-bench-") as tmp:
        for name, (res, n) in sets.items():
            items, _ = encoded_images(name, root, n)
            folder = write_image_folder(name, root, n, Path(tmp) / name)

            def raw():
                t = time.perf_counter()
                images, ok, _ = decode_batch(items, res)
                return len(images) / (time.perf_counter() - t)

            def parquet():
                t = time.perf_counter()
                images, _ = load_arrays(name, root, "train", res, limit=n, cache=False, num_threads=1)
                return len(images) / (time.perf_counter() - t)

            def image_folder():
                t = time.perf_counter()
                images, _ = load_arrays(str(folder), "", "train", res, cache=False, num_threads=1)
                return len(images) / (time.perf_counter() - t)

            cases = {"decode_only": raw, "parquet_load_arrays": parquet, "image_folder_load_arrays": image_folder}
            rates = interleaved(cases, repeats)
            entry: dict[str, Any] = {"resolution": res, "images": n, "images_per_sec_per_core": rates}
            if use_ray:
                entry["ray_data"] = _ray_data_rate(name, root, res, n)
            result[name] = entry
    return result


def _ray_data_rate(dataset: str, root: str, res: int, n: int) -> dict[str, Any]:
    """Images/s through the training Ray Data pipeline (read + decode map_batches), streamed (no cache)."""
    from replab.platform.data import pipeline
    from replab.platform.train.ray_train import ensure_ray
    from replab.validate import load_config

    ensure_ray(0)
    import ray

    cpus = int(ray.available_resources().get("CPU", 1))
    cfg = load_config(None, [f"data.dataset={dataset}", f"data.root={root}", f"data.resolution={res}",
                             f"data.limit={n}", "data.cache=off"]).data
    rates = []
    for _ in range(2):  # the first pass includes Ray Data's start-up; report the second
        t = time.perf_counter()
        train = pipeline.build_train_dataset(cfg)
        rows = sum(len(b["label"]) for b in train.dataset.iter_batches(batch_size=256, batch_format="numpy"))
        rates.append(rows / (time.perf_counter() - t))
    used = min(cpus, cores())
    return {"images_per_sec": round(rates[-1], 1), "first_pass_images_per_sec": round(rates[0], 1),
            "cpus": used, "images_per_sec_per_core": round(rates[-1] / used, 1)}
