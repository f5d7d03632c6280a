"""The data layer: sources, robust decoding, limit subsets, shuffling, downloads/converters, Ray Data.

Most tests run without Ray (load_arrays, decode, converters); the ``ray``-marked ones share one small Ray
instance (``ray_data`` fixture) and keep corpora to a few hundred images (except one first-batch check on
the full streamed CIFAR-10 train split).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from replab.config import DataConfig
from replab.platform.data import arrays, catalog, datasets, indexes, pipeline, plan, skips, sources
from replab.platform.data import datasets as DS
from replab.platform.data import decode as dec

try:
    from tests.data_fixtures import (
        BROKEN_DECODED,
        BROKEN_SKIPPED,
        array_cache_dir,
        build_broken_folder,
        class_color,
        encode,
        jpeg_with_huge_header,
        palette_with_transparency,
        png16,
        png_with_huge_header,
        ray_data,
        shared_root,
        solid,
        truncated_jpeg,
        write_parquet,
        write_tar,
    )
except ImportError:  # rootdir-relative import when tests/ is not a package
    from data_fixtures import (  # type: ignore[no-redef]
        BROKEN_DECODED,
        BROKEN_SKIPPED,
        array_cache_dir,
        build_broken_folder,
        class_color,
        encode,
        jpeg_with_huge_header,
        palette_with_transparency,
        png16,
        png_with_huge_header,
        ray_data,
        shared_root,
        solid,
        truncated_jpeg,
        write_parquet,
        write_tar,
    )

__all__ = ["array_cache_dir", "ray_data", "shared_root"]  # fixtures used by name


@pytest.fixture(autouse=True)
def _isolated_cache(array_cache_dir):
    return array_cache_dir


def mean_color(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1, 3).mean(axis=1)


def labels_from_colors(images: np.ndarray, n_classes: int) -> np.ndarray:
    palette = np.array([class_color(c) for c in range(n_classes)], dtype=float)
    dist = ((mean_color(images)[:, None, :] - palette[None]) ** 2).sum(-1)
    return dist.argmin(1)


# ============================================================================================ decoding


def test_decode_modes_become_rgb():
    r = 12
    gray = dec.decode_image(encode(solid(77, mode="L"), "PNG"), r)
    assert gray.shape == (r, r, 3) and gray.dtype == np.uint8 and (gray == 77).all()
    cmyk = dec.decode_image(encode(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG", quality=95), r)
    assert np.allclose(cmyk.reshape(-1, 3).mean(0), (255, 0, 0), atol=6)
    # palette + transparency: the transparent left half is composited on white, not black
    pal = dec.decode_image(palette_with_transparency(), 20)
    assert (pal[:, :8] == 255).all() and (pal[:, 12:] == (255, 0, 0)).all()
    rgba = dec.decode_image(encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG"), r)
    assert (rgba == 255).all()  # fully transparent -> white
    la = dec.decode_image(encode(Image.new("LA", (8, 8), (40, 255)), "PNG"), r)
    assert (la == 40).all()
    # 16-bit grayscale is scaled (>> 8), not clipped
    grid = np.zeros((16, 16), np.uint16)
    grid[:, 8:] = 0x8000
    sixteen = dec.decode_image(png16(grid), 16)
    assert (sixteen[:, :7] == 0).all() and (sixteen[:, 9:] == 128).all()
    one_bit = dec.decode_image(encode(Image.new("1", (10, 10), 1), "PNG"), r)
    assert (one_bit == 255).all()
    i32 = dec.decode_image(encode(Image.fromarray(np.full((9, 9), 50000, np.int32)), "TIFF"), r)
    assert np.abs(i32.astype(int) - 50000 // 256).max() <= 1


def test_decode_resizes_short_side_and_center_crops():
    # 64 x 32: red | green | green | blue quarters -> the centre 32 x 32 square is all green
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :16] = (255, 0, 0)
    arr[:, 16:48] = (0, 255, 0)
    arr[:, 48:] = (0, 0, 255)
    out = dec.decode_image(encode(Image.fromarray(arr), "PNG"), 16)
    assert out.shape == (16, 16, 3)
    assert (out[:, 1:-1, 1] > 240).all() and (out[:, 1:-1, 0] < 15).all() and (out[:, 1:-1, 2] < 15).all()
    # portrait: top / bottom bands are cropped away
    tall = np.zeros((80, 40, 3), np.uint8)
    tall[20:60] = 200
    out = dec.decode_image(encode(Image.fromarray(tall), "PNG"), 20)
    assert (out[1:-1] > 190).all()
    # upscaling works too (cifar 32 -> 48)
    assert dec.decode_image(encode(solid((1, 2, 3), (32, 32)), "PNG"), 48).shape == (48, 48, 3)


def test_decode_applies_exif_orientation():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left red, right blue (stored)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise -> red on top
    data = encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())
    out = dec.decode_image(data, 20).astype(int)
    assert out[:5, :, 0].mean() > 200 and out[-5:, :, 2].mean() > 200


def test_decode_huge_images_draft_jpeg_and_skip_others(monkeypatch):
    monkeypatch.setattr(dec, "MAX_PIXELS", 1_000_000)
    big = solid((40, 90, 160), (2400, 1600))
    jpeg = encode(big, "JPEG", quality=80)
    png = encode(big, "PNG")
    out = dec.decode_image(jpeg, 32)  # drafted to 300 x 200 -> under the limit
    assert np.allclose(out.reshape(-1, 3).mean(0), (40, 90, 160), atol=4)
    with pytest.raises(dec.SkipImage) as exc:
        dec.decode_image(png, 32)
    assert exc.value.category == "too-large"
    _, ok, reasons = dec.decode_batch([png_with_huge_header(), jpeg_with_huge_header(60_000, 60_000)], 16)
    assert not ok.any() and all(dec.category(r) == "too-large" for r in reasons)


def test_decode_batch_never_raises_on_garbage():
    rng = np.random.default_rng(0)
    good = encode(solid((9, 9, 9), (33, 17)), "JPEG")
    items: list = [None, b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", good, truncated_jpeg(), jpeg_with_huge_header()]
    items += [good[: int(n)] for n in rng.integers(1, len(good), 20)]
    items += [bytes(rng.integers(0, 255, int(n), dtype=np.uint8)) for n in rng.integers(1, 500, 20)]
    items += [b"\xff\xd8\xff" + bytes(rng.integers(0, 255, 300, dtype=np.uint8)) for _ in range(10)]
    images, ok, reasons = dec.decode_batch(items, 8)
    assert len(images) == ok.sum() >= 1 and ok[4]
    assert all((r is None) == bool(o) for r, o in zip(reasons, ok))
    assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 3)


# ============================================================================================ sources


def _class_sorted_images(n_per_class: int, n_classes: int, fmt="PNG") -> tuple[list[bytes], list[int]]:
    images, labels = [], []
    for c in range(n_classes):
        for i in range(n_per_class):
            size = (24 + i % 3 * 8, 20 + i % 2 * 12)  # varied, non-square
            images.append(encode(solid(class_color(c), size), fmt, **({"quality": 95} if fmt == "JPEG" else {})))
            labels.append(c)
    return images, labels


def test_parquet_struct_layout_with_splits(tmp_path):
    images, labels = _class_sorted_images(8, 4)
    root = tmp_path / "pq"
    write_parquet(root / "train-00000-of-00002.parquet", images[:16], labels[:16])
    write_parquet(root / "train-00001-of-00002.parquet", images[16:], labels[16:])
    write_parquet(root / "test-00000-of-00001.parquet", images[::4], labels[::4])
    (root / "classes.json").write_text(json.dumps(["r", "g", "b", "y"]))
    x, y = arrays.load_arrays(str(root), "", "train", 16)
    assert x.shape == (32, 16, 16, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    assert y.tolist() == labels  # row-id order = files sorted, rows in order
    assert (labels_from_colors(x, 4) == y).all()
    xt, yt = arrays.load_arrays(str(root), "", "test", 16)
    assert len(xt) == 8 and yt.tolist() == labels[::4]
    assert catalog.default_test_split(str(root)) == "test"
    info = catalog.dataset_info(str(root))
    assert info.splits == {"test": 8, "train": 32} and info.num_classes == 4 and info.class_names == ["r", "g", "b", "y"]
    src = sources.resolve(str(root), split="train")
    assert src.kind == "parquet" and len(src.files) == 2 and Path(src.files[0]).is_absolute()
    with pytest.raises(datasets.DataError, match="no split 'val'"):
        sources.resolve(str(root), split="val")
    # the same files through a file:// URI (pyarrow filesystem) and through a glob
    xu, yu = arrays.load_arrays(root.as_uri(), "", "train", 16, cache=False)
    assert np.array_equal(xu, x) and np.array_equal(yu, y)
    xg, yg = arrays.load_arrays(str(root / "train-00001-*.parquet"), "", "train", 16, cache=False)
    assert yg.tolist() == labels[16:]


def test_parquet_plain_binary_custom_columns_and_no_labels(tmp_path):
    images, labels = _class_sorted_images(5, 2)
    path = write_parquet(tmp_path / "d.parquet", images, labels, image_column="img", label_column="target",
                         struct_layout=False)
    x, y = arrays.load_arrays(str(path), "", "train", 8, image_column="img", label_column="target")
    assert len(x) == 10 and y.tolist() == labels
    # no label column -> -1
    unl = write_parquet(tmp_path / "u" / "data.parquet", images, None, struct_layout=False)
    x, y = arrays.load_arrays(str(unl.parent), "", "train", 8)
    assert len(x) == 10 and (y == -1).all()
    with pytest.raises(datasets.DataError, match="no image column 'pixels'"):
        arrays.load_arrays(str(path), "", "train", 8, image_column="pixels")
    # string labels -> sorted class names
    strs = write_parquet(tmp_path / "s" / "train.parquet", images, ["dog" if v else "cat" for v in labels])
    x, y = arrays.load_arrays(str(strs), "", "train", 8)
    assert y.tolist() == labels and catalog.dataset_info(str(strs)).class_names == ["cat", "dog"]


def test_image_folder_with_classes_flat_and_split_folders(tmp_path):
    for cls, color in (("zebra", class_color(1)), ("ant", class_color(0))):
        for i in range(3):
            p = tmp_path / "classes" / cls / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(encode(solid(color), "PNG"))
    (tmp_path / "classes" / "README.md").write_text("ignored")
    x, y = arrays.load_arrays(str(tmp_path / "classes"), "", "train", 8)
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]  # ant=0, zebra=1 (sorted names)
    assert (labels_from_colors(x, 2) == y).all()
    assert catalog.dataset_info(str(tmp_path / "classes")).class_names == ["ant", "zebra"]
    # flat folder: unlabeled
    for i in range(4):
        (tmp_path / "flat").mkdir(exist_ok=True)
        (tmp_path / "flat" / f"{i}.jpg").write_bytes(encode(solid((i * 50, 0, 0)), "JPEG"))
    x, y = arrays.load_arrays(str(tmp_path / "flat"), "", "train", 8)
    assert len(x) == 4 and (y == -1).all()
    # train/ val/ split folders
    for split in ("train", "val"):
        for cls in ("a", "b"):
            p = tmp_path / "splits" / split / cls / "x.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(encode(solid((1, 1, 1)), "PNG"))
    assert catalog.default_test_split(str(tmp_path / "splits")) == "val"
    x, y = arrays.load_arrays(str(tmp_path / "splits"), "", "val", 8)
    assert sorted(y.tolist()) == [0, 1]


def test_tar_shards(tmp_path):
    images, labels = _class_sorted_images(6, 3, fmt="JPEG")
    samples = [(f"s{i:04d}", data, "jpg" if i % 2 else "png", label) for i, (data, label) in enumerate(zip(images, labels))]
    # re-encode the odd ones as PNG so both extensions really occur
    samples = [(k, d if e == "jpg" else encode(Image.open(io.BytesIO(d)), "PNG"), e, lab) for k, d, e, lab in samples]
    write_tar(tmp_path / "shards" / "train-000000.tar", samples[:10])
    write_tar(tmp_path / "shards" / "train-000001.tar", samples[10:])
    src = sources.resolve(str(tmp_path / "shards"))
    assert src.kind == "tar" and len(src.files) == 2
    x, y = arrays.load_arrays(str(tmp_path / "shards"), "", "train", 12)
    assert x.shape == (18, 12, 12, 3) and y.tolist() == labels
    assert (labels_from_colors(x, 3) == y).all()
    # a limit picks a subset across shards
    xs, ys = arrays.load_arrays(str(tmp_path / "shards"), "", "train", 12, limit=7, seed=3)
    assert len(xs) == 7 and set(ys.tolist()) <= {0, 1, 2}


def test_broken_folder_load_arrays_counts(tmp_path):
    root = build_broken_folder(tmp_path / "broken")
    stats: dict = {}
    x, y = arrays.load_arrays(str(root), "", "train", 24, stats=stats)
    assert len(x) == len(BROKEN_DECODED) and stats["skipped"] == len(BROKEN_SKIPPED)
    expected = {}
    for reason in BROKEN_SKIPPED.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert stats["reasons"] == expected
    named = {name: dec.category(reason) for name, reason in stats["examples"]}
    assert named == BROKEN_SKIPPED
    assert sorted(y.tolist()) == sorted(int(n.startswith("b/")) for n in BROKEN_DECODED)
    report = catalog.inspect(str(root), sample=100)
    assert report["rows"] == len(BROKEN_DECODED) + len(BROKEN_SKIPPED) and report["unreadable"] == len(BROKEN_SKIPPED)
    assert report["num_classes"] == 2 and "CMYK" in report["modes"] and report["width"]["max"] == 100_000


def test_named_dataset_missing_raises_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("REPLAB_DATA_ROOT", raising=False)
    with pytest.raises(datasets.DataError) as exc:
        sources.resolve("cifar10", root=str(tmp_path))
    msg = str(exc.value)
    assert str(tmp_path / "cifar10") in msg and "data.root" in msg and "REPLAB_DATA_ROOT" in msg
    assert "data.download=true" in msg
    monkeypatch.setenv("REPLAB_DATA_ROOT", str(tmp_path / "elsewhere"))
    with pytest.raises(datasets.DataError, match=str(tmp_path / "elsewhere" / "tinyimagenet")):
        arrays.load_arrays("tinyimagenet", "", "train", 32)
    with pytest.raises(datasets.DataError, match="not a named dataset"):
        sources.resolve("cifar100")
    # the trainer entry point fails before starting any Ray work
    with pytest.raises(datasets.DataError, match="imagenette128"):
        pipeline.build_train_dataset(DataConfig(dataset="imagenette128", root=str(tmp_path)))


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLAB_DATA_ROOT", str(tmp_path / "env"))
    assert datasets.data_root("") == str(tmp_path / "env")
    assert datasets.data_root(str(tmp_path / "cfg")) == str(tmp_path / "cfg")
    monkeypatch.chdir(tmp_path)
    assert datasets.data_root("rel") == str(tmp_path / "rel")  # made absolute for Ray workers
    monkeypatch.delenv("REPLAB_DATA_ROOT")
    assert datasets.data_root("") == str(Path("~/.cache/replab/datasets").expanduser())
    assert datasets.data_root("s3://bucket/data/") == "s3://bucket/data"


# ============================================================================================ limit / order


def test_subset_indices_nested_seeded_exact():
    a = indexes.subset_indices(10_000, 100, seed=1)
    b = indexes.subset_indices(10_000, 1000, seed=1)
    c = indexes.subset_indices(10_000, 100, seed=2)
    assert len(a) == 100 and len(b) == 1000 and len(np.unique(b)) == 1000
    assert np.isin(a, b).all() and (np.diff(a) > 0).all()
    assert not np.array_equal(a, c)
    assert np.array_equal(a, indexes.subset_indices(10_000, 100, seed=1))
    assert np.array_equal(indexes.subset_indices(50, None, 0), np.arange(50))
    assert np.array_equal(indexes.subset_indices(50, 80, 0), np.arange(50))
    # spread over the whole range (not the first N): the shards are sorted by class
    assert a.min() < 1000 and a.max() > 9000


def test_limit_on_cifar_is_nested_random_and_many_classes(shared_root):
    small_x, small_y = arrays.load_arrays("cifar10", str(shared_root), "train", 32, limit=200, seed=5)
    big_x, big_y = arrays.load_arrays("cifar10", str(shared_root), "train", 32, limit=600, seed=5)
    other_x, _ = arrays.load_arrays("cifar10", str(shared_root), "train", 32, limit=200, seed=6)
    assert len(small_x) == 200 and len(big_x) == 600
    digest = lambda x: {hashlib.md5(im.tobytes()).hexdigest() for im in x}  # noqa: E731
    assert digest(small_x) <= digest(big_x)
    assert digest(small_x) != digest(other_x)
    counts = np.bincount(small_y, minlength=10)
    assert (counts >= 8).all(), counts  # all 10 classes from a 200-image subset of class-sorted shards
    # cached arrays come back identical
    again = arrays.load_arrays("cifar10", str(shared_root), "train", 32, limit=200, seed=5)
    assert np.array_equal(again[0], small_x) and np.array_equal(again[1], small_y)


def test_iterate_batches_reshuffles_per_epoch():
    import torch

    images = np.arange(103, dtype=np.uint8).reshape(103, 1, 1, 1).repeat(3, -1)
    labels = np.arange(103, dtype=np.int64)
    e0 = list(arrays.iterate_batches(images, labels, 10, seed=0, epoch=0))
    e1 = list(arrays.iterate_batches(images, labels, 10, seed=0, epoch=1))
    assert len(e0) == 10 and e0[0]["image"].dtype == torch.uint8 and e0[0]["label"].dtype == torch.int64
    assert e0[0]["image"].shape == (10, 1, 1, 3)
    order0 = torch.cat([b["label"] for b in e0]).tolist()
    order1 = torch.cat([b["label"] for b in e1]).tolist()
    assert order0 != order1 and len(set(order0)) == 100
    assert all((b["image"][:, 0, 0, 0].long() == b["label"]).all() for b in e0)
    assert order0 == torch.cat([b["label"] for b in arrays.iterate_batches(images, labels, 10, 0, 0)]).tolist()
    assert sum(len(b["label"]) for b in arrays.iterate_batches(images, labels, 10, 0, 0, drop_last=False)) == 103


def test_shuffle_windows_cover_every_row_once_and_change_per_execution(tmp_path):
    images, labels = _class_sorted_images(10, 4)
    root = tmp_path / "pq"
    for f in range(4):  # 4 files x 2 row groups of 5, sorted by class
        write_parquet(root / f"train-{f:05d}-of-00004.parquet", images[f * 10:(f + 1) * 10], labels[f * 10:(f + 1) * 10])
    src = sources.resolve(str(root))
    index = indexes.build_index(src)
    read_plan = plan.ReadPlan.build(index, indexes.subset_indices(index.total_rows, 30, seed=0))
    datasource = pipeline.datasource_class()(read_plan, seed=0, window_bytes=3 * int(index.piece_bytes.max()))

    class Ctx:  # what Ray passes: the DataContext, whose _execution_idx grows by one per execution
        def __init__(self, idx):
            self._execution_idx = idx

    orders = []
    for execution in (0, 1):
        tasks = datasource.get_read_tasks(1, data_context=Ctx(execution))
        assert len(tasks) >= 3  # several windows of <= 3 row groups
        rows = np.concatenate([t.num_rows and np.asarray(t["row"]) for task in tasks for t in task()])
        assert sorted(rows.tolist()) == indexes.subset_indices(40, 30, 0).tolist()  # every kept row exactly once
        assert sum(t.metadata.num_rows for t in tasks) == 30
        orders.append(rows.tolist())
    assert orders[0] != orders[1]


def test_cache_decision():
    assert pipeline.should_cache("on", 10**9, 224, 1.0) and not pipeline.should_cache("off", 1, 8, 1e12)
    assert pipeline.should_cache("auto", 50_000, 32, 4e9)  # CIFAR-10: 150 MB of 4 GB
    assert not pipeline.should_cache("auto", 1_281_167, 224, 4e9)  # ImageNet at 224: streamed


# ============================================================================================ downloads


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _fake_cifar_tarball(path: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(0)
    out = {}
    with tarfile.open(path, "w:gz") as tar:
        def add(name, obj):
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            arr = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, 3).tolist()
            add(name, {b"data": arr, b"labels": labels, b"batch_label": name.encode()})
            out[name] = (arr, labels)
    return out


def test_cifar10_download_and_convert(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    batches = _fake_cifar_tarball(archive)
    root = tmp_path / "root"
    with pytest.raises(datasets.DataError, match="checksum mismatch"):
        DS.download("cifar10", str(root), url=archive.as_uri(), md5="0" * 32, log=lambda m: None)
    assert not (root / "cifar10").exists()
    out = DS.download("cifar10", str(root), url=archive.as_uri(), md5=_md5(archive), log=lambda m: None)
    assert Path(out) == root / "cifar10"
    info = catalog.dataset_info("cifar10", str(root))
    assert info.splits == {"test": 3, "train": 15} and info.class_names == [f"c{i}" for i in range(10)]
    x, y = arrays.load_arrays("cifar10", str(root), "train", 32, cache=False)
    expected = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    expected = expected.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert np.array_equal(x, expected)  # PNG is lossless: the original arrays, in the original order
    assert y.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    xt, _ = arrays.load_arrays("cifar10", str(root), "test", 32, cache=False)
    assert np.array_equal(xt, batches["test_batch"][0].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    # build_train_dataset-style auto download path: data.download=true finds it already there
    assert DS.download("cifar10", str(root), log=lambda m: None) == out


def test_data_download_flag_fetches_missing_named_dataset(tmp_path, monkeypatch):
    archive = tmp_path / "cifar-10-python.tar.gz"
    _fake_cifar_tarball(archive)
    calls = []

    def fake_download(name, root=""):  # the real one, pointed at the local archive (no network here)
        calls.append((name, root))
        return DS.download(name, root, url=archive.as_uri(), md5=_md5(archive), log=lambda m: None)

    monkeypatch.setattr(sources, "download", fake_download)
    root = tmp_path / "root"
    with pytest.raises(datasets.DataError, match="data.download=true"):
        arrays.load_arrays(DataConfig(dataset="cifar10", root=str(root)), split="test")
    assert calls == []
    x, y = arrays.load_arrays(DataConfig(dataset="cifar10", root=str(root), download=True, resolution=16), split="test")
    assert calls == [("cifar10", str(root))] and x.shape == (3, 16, 16, 3)


def test_tinyimagenet_convert(tmp_path):
    archive = tmp_path / "tiny-imagenet-200.zip"
    wnids = ["n02", "n01"]
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "\n".join(wnids) + "\n")
        zf.writestr("tiny-imagenet-200/words.txt", "n01\tgoldfish, Carassius auratus\nn02\tbullfrog, Rana\nn03\tother\n")
        for k, w in enumerate(sorted(wnids)):
            for i in range(3):
                zf.writestr(f"tiny-imagenet-200/train/{w}/images/{w}_{i}.JPEG",
                            encode(solid(class_color(k), (64, 64)), "JPEG", quality=95))
            zf.writestr(f"tiny-imagenet-200/train/{w}/{w}_boxes.txt", "ignored")
        ann = []
        for i in range(4):
            zf.writestr(f"tiny-imagenet-200/val/images/val_{i}.JPEG",
                        encode(solid(class_color(i % 2), (64, 64)), "JPEG", quality=95))
            ann.append(f"val_{i}.JPEG\t{sorted(wnids)[i % 2]}\t0\t0\t10\t10")
        zf.writestr("tiny-imagenet-200/val/val_annotations.txt", "\n".join(ann))
    out = tmp_path / "tinyimagenet"
    out.mkdir()
    DS.convert_tinyimagenet(str(archive), str(out))
    info = catalog.dataset_info("tinyimagenet", str(tmp_path))
    assert info.splits == {"train": 6, "val": 4} and info.class_names == ["goldfish", "bullfrog"]
    x, y = arrays.load_arrays("tinyimagenet", str(tmp_path), "val", 16, cache=False)
    assert y.tolist() == [0, 1, 0, 1] and (labels_from_colors(x, 2) == y).all()
    assert catalog.default_test_split("tinyimagenet", str(tmp_path)) == "val"


def test_imagenette_convert_resizes_to_128(tmp_path):
    archive = tmp_path / "imagenette2-160.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for split, n in (("train", 3), ("val", 2)):
            for k, wnid in enumerate(["n01440764", "n03888257"]):
                for i in range(n):
                    data = encode(solid(class_color(k), (213, 160)), "JPEG", quality=95)
                    info = tarfile.TarInfo(f"imagenette2-160/{split}/{wnid}/{wnid}_{i}.JPEG")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "imagenette128"
    out.mkdir()
    DS.convert_imagenette(str(archive), str(out))
    info = catalog.dataset_info("imagenette128", str(tmp_path))
    assert info.splits == {"train": 6, "val": 4} and info.class_names == ["tench", "parachute"]
    report = catalog.inspect("imagenette128", str(tmp_path), "train")
    assert report["width"] == {"min": 128, "median": 128.0, "max": 128} and report["formats"] == {"JPEG": 6}


# ============================================================================================ Ray Data


def _epoch(ds, batch_size, buffer=None, limit_batches=None):
    images, labels = [], []
    for i, batch in enumerate(ds.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=buffer,
                                                    drop_last=True)):
        images.append(batch["image"])
        labels.append(batch["label"])
        if limit_batches and i + 1 >= limit_batches:
            break
    return images, labels


@pytest.mark.ray
@pytest.mark.parametrize("cache", ["off", "on"])
def test_ray_train_dataset_cifar_subset(ray_data, shared_root, cache):
    import torch

    cfg = DataConfig(dataset="cifar10", root=str(shared_root), limit=300, resolution=40, cache=cache, seed=1,
                     shuffle_buffer=64, decode_batch_size=64)
    td = pipeline.build_train_dataset(cfg)
    assert td.num_rows == 300 and td.cached == (cache == "on")
    assert td.shuffle_buffer == 64
    # Ray 2.60 yields short batches when the local buffer is < 2x the batch: the helper raises it
    assert td.local_shuffle_buffer(50) == 100
    imgs0, labs0 = _epoch(td.dataset, 50, td.local_shuffle_buffer(50))
    imgs1, labs1 = _epoch(td.dataset, 50, td.local_shuffle_buffer(50))
    assert [len(b) for b in labs0] == [50] * 6 == [len(b) for b in labs1]
    assert imgs0[0].shape == (50, 40, 40, 3) and imgs0[0].dtype == torch.uint8
    assert labs0[0].dtype == torch.int64
    l0, l1 = torch.cat(labs0), torch.cat(labs1)
    assert sorted(l0.tolist()) == sorted(l1.tolist())  # the same 300 rows every epoch ...
    assert l0.tolist() != l1.tolist()  # ... in a new order
    # the same seeded subset as the no-Ray path
    _, ref = arrays.load_arrays("cifar10", str(shared_root), "train", 40, limit=300, seed=1)
    assert sorted(l0.tolist()) == sorted(ref.tolist())
    assert len(set(l0[:50].tolist())) >= 8
    assert td.skipped() == 0


@pytest.mark.ray
def test_ray_streaming_full_cifar_first_batch_mixes_classes(ray_data, shared_root):
    cfg = DataConfig(dataset="cifar10", root=str(shared_root), resolution=32, cache="off", shuffle_buffer=0)
    td = pipeline.build_train_dataset(cfg)
    assert td.num_rows == 50_000 and not td.cached and td.shuffle_buffer is None
    _, labels = _epoch(td.dataset, 256, None, limit_batches=1)
    assert labels[0].shape == (256,)
    assert len(set(labels[0].tolist())) >= 8, labels[0].bincount()


@pytest.mark.ray
def test_ray_broken_folder_skips_and_counts(ray_data, tmp_path):
    root = build_broken_folder(tmp_path / "broken")
    cfg = DataConfig(dataset=str(root), resolution=24, cache="off", shuffle_buffer=0, decode_batch_size=4)
    td = pipeline.build_train_dataset(cfg)
    assert td.num_rows == len(BROKEN_DECODED) + len(BROKEN_SKIPPED)
    for _ in range(2):  # re-decoded every epoch, counted once per row
        rows = sum(len(b["label"]) for b in td.dataset.iter_torch_batches(batch_size=1))
        assert rows == len(BROKEN_DECODED)
    assert td.skipped() == len(BROKEN_SKIPPED)
    summary = td.skipped_summary()
    assert {name: dec.category(reason) for name, reason in summary["examples"]} == BROKEN_SKIPPED

    @ray_data.remote(num_cpus=0)
    def from_a_worker(name):
        return skips.skipped_count(name)

    assert ray_data.get(from_a_worker.remote(td.counter_name)) == len(BROKEN_SKIPPED)


@pytest.mark.ray
def test_ray_tar_shards_and_limit(ray_data, tmp_path):
    images, labels = _class_sorted_images(10, 3, fmt="JPEG")
    samples = [(f"k{i:03d}", d, "jpg", lab) for i, (d, lab) in enumerate(zip(images, labels))]
    write_tar(tmp_path / "t" / "shard-0.tar", samples[:15])
    write_tar(tmp_path / "t" / "shard-1.tar", samples[15:])
    td = pipeline.build_train_dataset(DataConfig(dataset=str(tmp_path / "t"), resolution=16, limit=20, cache="on"))
    batches = list(td.dataset.iter_torch_batches(batch_size=5))
    got = np.concatenate([b["label"].numpy() for b in batches])
    assert len(got) == 20 and td.num_classes == 3
    _, ref = arrays.load_arrays(str(tmp_path / "t"), "", "train", 16, limit=20)
    assert sorted(got.tolist()) == sorted(ref.tolist())
