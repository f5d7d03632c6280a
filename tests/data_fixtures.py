"""Fixtures and file builders for the data-layer tests (tests/test_data.py).

Kept out of conftest.py on purpose (the lead owns conftest.py and its session-scoped ``ray_session``);
test_data.py imports what it needs from here.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# ------------------------------------------------------------------------------------------------ fixtures


def shared_datasets_dir() -> Path:
    env = os.environ.get("REPLAB_DATA_ROOT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_root() -> Path:
    """The real datasets (cifar10, ...): $REPLAB_DATA_ROOT, else ../shared/datasets beside the checkout."""
    root = shared_datasets_dir()
    if not (root / "cifar10").is_dir():
        pytest.fail(f"real datasets not found at {root}; set REPLAB_DATA_ROOT to the shared datasets folder")
    return root


@pytest.fixture(autouse=False)
def array_cache_dir(tmp_path, monkeypatch) -> Path:
    """Point load_arrays' on-disk cache at a fresh folder."""
    path = tmp_path / "array-cache"
    monkeypatch.setenv("REPLAB_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="module")
def ray_data(request):
    """Ray for the data tests: the session-wide ``ray_session`` from conftest.py when it exists (one Ray
    instance per test session), else a small local instance (2 CPUs) shut down at the end of the module."""
    ray = pytest.importorskip("ray")
    try:
        request.getfixturevalue("ray_session")
        started = False
    except pytest.FixtureLookupError:
        started = not ray.is_initialized()
        if started:
            ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2,
                     log_to_driver=False, configure_logging=False)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    old_bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        yield ray
    finally:
        ctx.enable_progress_bars = old_bars
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------------------------ builders


def solid(color, size=(40, 30), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def class_color(label: int) -> tuple[int, int, int]:
    """A distinct, JPEG-robust colour per class (so decoded pixels identify the label)."""
    palette = [(230, 20, 20), (20, 200, 20), (20, 20, 230), (220, 220, 30), (200, 30, 200), (30, 200, 200)]
    return palette[label % len(palette)]


def png_with_huge_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A syntactically valid PNG header claiming a decompression-bomb size (the data is tiny)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def jpeg_with_huge_header(width: int = 30_000, height: int = 30_000) -> bytes:
    """A small real JPEG whose SOF0 marker is patched to claim ``width`` x ``height``."""
    data = bytearray(encode(solid((120, 60, 30), (16, 16)), "JPEG", quality=90))
    i = data.find(b"\xff\xc0")
    assert i > 0
    struct.pack_into(">HH", data, i + 5, height, width)
    return bytes(data)


def png16(value_grid: np.ndarray) -> bytes:
    im = Image.fromarray(value_grid.astype(np.uint16))  # mode I;16
    assert im.mode.startswith("I;16") or im.mode == "I", im.mode
    return encode(im, "PNG")


def palette_with_transparency() -> bytes:
    im = Image.new("P", (20, 20), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    for x in range(10, 20):
        for y in range(20):
            im.putpixel((x, y), 1)
    return encode(im, "PNG", transparency=0)  # index 0 (left half) fully transparent


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG", quality=95)  # red in CMYK


def truncated_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    full = encode(Image.fromarray(noise), "JPEG", quality=95)
    return full[: len(full) // 2]


BROKEN_DECODED = {
    "a/rgb.jpg", "a/rgb.png", "a/gray.jpg", "a/cmyk.jpg", "b/palette_transparent.png", "b/la.png",
    "b/rgba.png", "b/sixteen_bit.png", "b/big.jpg",
}
BROKEN_SKIPPED = {
    "a/corrupt.jpg": "not-an-image",
    "a/truncated.jpg": "truncated",
    "b/empty.jpg": "empty",
    "b/notes.txt": "not-an-image",
    "b/huge_header.png": "too-large",
}


def build_broken_folder(root: Path) -> Path:
    """Class folders ``a`` and ``b`` mixing good, odd-mode and broken files (see BROKEN_* above)."""
    files = {
        "a/rgb.jpg": encode(solid((200, 30, 30)), "JPEG", quality=90),
        "a/rgb.png": encode(solid((30, 200, 30)), "PNG"),
        "a/gray.jpg": encode(solid(128, mode="L"), "JPEG", quality=90),
        "a/cmyk.jpg": cmyk_jpeg(),
        "a/corrupt.jpg": bytes(np.random.default_rng(1).integers(0, 255, 3000, dtype=np.uint8)),
        "a/truncated.jpg": truncated_jpeg(),
        "b/palette_transparent.png": palette_with_transparency(),
        "b/la.png": encode(Image.new("LA", (24, 24), (90, 255)), "PNG"),
        "b/rgba.png": encode(Image.new("RGBA", (24, 24), (10, 20, 250, 255)), "PNG"),
        "b/sixteen_bit.png": png16(np.full((20, 20), 65535)),
        "b/big.jpg": encode(solid((40, 90, 160), (2400, 1600)), "JPEG", quality=80),
        "b/empty.jpg": b"",
        "b/notes.txt": b"this is not an image\n",
        "b/huge_header.png": png_with_huge_header(),
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def write_parquet(path: Path, images: list[bytes], labels: list | None, *, image_column="image",
                  label_column="label", struct_layout=True, row_group_size=5) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if struct_layout:
        image = pa.StructArray.from_arrays(
            [pa.array(images, pa.binary()), pa.array([f"img{i}.png" for i in range(len(images))])],
            names=["bytes", "path"],
        )
    else:
        image = pa.array(images, pa.binary())
    columns = {image_column: image}
    if labels is not None:
        columns[label_column] = pa.array(labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def write_tar(path: Path, samples: list[tuple[str, bytes, str, int | None]]) -> Path:
    """``samples``: (key, image bytes, image extension, label or None)."""
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, data, ext, label in samples:
            members = [(f"{key}.{ext}", data)]
            if label is not None:
                members.append((f"{key}.cls", str(label).encode()))
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path
