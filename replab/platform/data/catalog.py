"""What a dataset holds: its splits, classes and sizes (:func:`dataset_info`), the default test split, and
``replab data inspect`` (rows, classes, image sizes, modes, unreadable files of a source).
"""

from __future__ import annotations

import os
import posixpath
from collections import Counter

import numpy as np
import pyarrow.fs as pafs

from replab.platform.data import decode as _decode
from replab.platform.data.datasets import NAMED_DATASETS, DataError, DatasetInfo, data_root, is_uri
from replab.platform.data.indexes import build_index, subset_indices
from replab.platform.data.plan import ReadPlan, read_pieces
from replab.platform.data.sources import filesystem, list_files, resolve, split_token


def _available_splits(dataset: str, root: str = "") -> list[str]:
    if dataset in NAMED_DATASETS and not dataset.startswith((".", "/")):
        base = data_root(root)
        location = posixpath.join(base, dataset) if is_uri(base) else os.path.join(base, dataset)
    else:
        location = dataset
    fs, inner, display = filesystem(location)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        resolve(dataset, root, "train")  # raises the clear not-found error
        return []
    if info.type == pafs.FileType.File:
        token = split_token(posixpath.basename(inner))
        return [token or "train"]
    files = list_files(fs, inner)
    shards = [f for f in files if f.path.endswith((".parquet", ".tar"))]
    if shards:
        tokens = {split_token(posixpath.relpath(f.path, inner)) for f in shards}
    else:
        tokens = {split_token(posixpath.relpath(f.path, inner).split("/")[0])
                  for f in files if "/" in posixpath.relpath(f.path, inner)}
    tokens.discard(None)
    return sorted(tokens) if tokens else ["train"]


def dataset_info(dataset: str, root: str = "") -> DatasetInfo:
    """Name, classes (``classes.json`` when present, else class folders / label values) and rows per split
    (from the parquet footers, the folder listing or the tar headers)."""
    splits: dict[str, int] = {}
    class_names: list[str] | None = None
    num_classes: int | None = None
    for split in _available_splits(dataset, root):
        src = resolve(dataset, root, split)
        index = build_index(src)
        splits[split] = index.total_rows
        class_names = class_names or src.class_names
        if index.num_classes is not None:
            num_classes = max(num_classes or 0, index.num_classes)
    if class_names:
        num_classes = len(class_names)
    return DatasetInfo(name=dataset, num_classes=num_classes, class_names=class_names, splits=splits)


def default_test_split(dataset: str, root: str = "") -> str:
    """``"test"`` or ``"val"``, whichever the dataset has (test first); DataError when neither."""
    splits = _available_splits(dataset, root)
    if "test" in splits:
        return "test"
    for name in ("val", "validation", "valid"):
        if name in splits:
            return "val"
    raise DataError(f"{dataset}: no test or val split (splits: {', '.join(splits)}); set --set eval.test_split=NAME")


def inspect(source: str, root: str = "", split: str = "train", sample: int = 2000,
            image_column: str = "image", label_column: str = "label") -> dict:
    """Summary of a source: rows, classes, label counts and, on a seeded sample, image sizes, modes and
    formats, and how many images do not decode (with a few names and reasons)."""
    from PIL import Image

    src = resolve(source, root, split, image_column=image_column, label_column=label_column)
    index = build_index(src)
    selected = subset_indices(index.total_rows, min(sample, index.total_rows), 0)
    plan = ReadPlan.build(index, selected)
    widths, heights = [], []
    modes: Counter = Counter()
    formats: Counter = Counter()
    label_counts: Counter = Counter()
    unreadable = 0
    reasons: Counter = Counter()
    examples: list[tuple[str, str]] = []
    import io
    import warnings

    for start in range(0, len(plan.pieces), 64):
        table = read_pieces(plan.spec, plan.pieces[start:start + 64])
        blobs = table.column("bytes").to_pylist()
        names = table.column("name").to_pylist()
        label_counts.update(table.column("label").to_pylist())
        _, ok, why = _decode.decode_batch(blobs, 8)
        for blob, good, reason, name in zip(blobs, ok, why, names):
            if not good:
                unreadable += 1
                reasons[_decode.category(reason)] += 1
                if len(examples) < 10:
                    examples.append((name, reason))
            limit = Image.MAX_IMAGE_PIXELS
            try:
                Image.MAX_IMAGE_PIXELS = None  # header only: report the size of decompression bombs too
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with Image.open(io.BytesIO(blob)) as im:
                        widths.append(im.size[0])
                        heights.append(im.size[1])
                        modes[im.mode] += 1
                        formats[im.format or "?"] += 1
            except Exception:  # noqa: BLE001
                continue
            finally:
                Image.MAX_IMAGE_PIXELS = limit

    def dist(values: list[int]) -> dict:
        if not values:
            return {}
        arr = np.asarray(values)
        return {"min": int(arr.min()), "median": float(np.median(arr)), "max": int(arr.max())}

    return {
        "source": src.uri,
        "kind": src.kind,
        "split": split,
        "files": len(src.files),
        "rows": index.total_rows,
        "num_classes": index.num_classes,
        "class_names": src.class_names,
        "labeled": index.has_labels,
        "sampled": plan.num_rows,
        "sample_label_counts": {int(k): v for k, v in sorted(label_counts.items())},
        "width": dist(widths),
        "height": dist(heights),
        "modes": dict(modes),
        "formats": dict(formats),
        "unreadable": unreadable,
        "unreadable_reasons": dict(reasons),
        "unreadable_examples": examples,
    }
