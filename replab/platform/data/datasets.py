"""Named datasets: where they live, how they are laid out, and how to download and convert them.

Layout (the Hugging Face ``datasets`` image-parquet layout, as in ``../shared/datasets``)::

    {root}/{name}/{split}-NNNNN-of-MMMMM.parquet   rows: image struct<bytes: binary, path: string>, label int64
    {root}/{name}/classes.json                      class names, indexed by label
    {root}/{name}/info.json                         name, image_size, splits {split: rows}, source

The root is ``data.root`` if set, else ``$REPLAB_DATA_ROOT``, else ``~/.cache/replab/datasets``.

:func:`download` fetches the official archive (checksum-verified), converts it into that layout in a temporary
folder next to the target and renames it into place, so an interrupted download never leaves a half dataset:

- ``cifar10``: the CIFAR-10 python pickles, every 32x32 array PNG-encoded (lossless), original row order;
- ``tinyimagenet``: Tiny-ImageNet-200, the original 64x64 JPEG bytes (train 100,000 / val 10,000; the
  unlabeled test split is dropped), classes = sorted WordNet ids, names from ``words.txt``;
- ``imagenette128``: Imagenette 160 px, each image resized (short side) and centre-cropped to 128x128 and
  re-encoded as JPEG q90 (train 9,469 / val 3,925).

The converters take the archive path, so they are tested on small synthetic archives (no network needed).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from replab.platform.progress import bar

ENV_ROOT = "REPLAB_DATA_ROOT"
DEFAULT_ROOT = "~/.cache/replab/datasets"


class DataError(ValueError):
    """A data problem the user can fix (missing dataset, bad path, unknown split): the message says how."""


@dataclass
class DatasetInfo:
    name: str
    num_classes: int | None
    class_names: list[str] | None
    splits: dict[str, int] = field(default_factory=dict)


def is_uri(path: str) -> bool:
    return "://" in str(path)


def data_root(cfg_root: str = "") -> str:
    """``cfg_root`` if given, else ``$REPLAB_DATA_ROOT``, else ``~/.cache/replab/datasets``.

    Local paths are returned absolute (they travel to Ray workers whose cwd differs); URIs unchanged.
    """
    root = str(cfg_root or os.environ.get(ENV_ROOT, "") or DEFAULT_ROOT)
    if is_uri(root):
        return root.rstrip("/")
    return str(Path(root).expanduser().resolve())


# ---------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class NamedDataset:
    name: str
    url: str
    md5: str
    archive_size: int | None
    convert: Callable[[str, str], None]
    description: str


IMAGENETTE_NAMES = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
}


def _registry() -> dict[str, NamedDataset]:
    return {
        "cifar10": NamedDataset(
            "cifar10",
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "c58f30108f718f92721af3b95e74349a",
            170498071,
            convert_cifar10,
            "CIFAR-10, 60,000 32x32 images in 10 classes (PNG-encoded original arrays)",
        ),
        "tinyimagenet": NamedDataset(
            "tinyimagenet",
            "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
            "90528d7ca1a48142e341f4ef8d21d0de",
            248100043,
            convert_tinyimagenet,
            "Tiny-ImageNet-200, 64x64 JPEG, 200 classes (train 100,000, val 10,000)",
        ),
        "imagenette128": NamedDataset(
            "imagenette128",
            "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz",
            # md5 as published by torchvision.datasets.Imagenette for the 160 px archive
            "e793b78cc4c9e9a4ccc0c1155377a412",
            None,
            convert_imagenette,
            "Imagenette (10 ImageNet classes), 160 px archive resized and centre-cropped to 128x128",
        ),
    }


NAMED_DATASETS: tuple[str, ...] = ("cifar10", "tinyimagenet", "imagenette128")


def named(name: str) -> NamedDataset:
    reg = _registry()
    if name not in reg:
        raise DataError(f"unknown dataset {name!r}; named datasets: {', '.join(NAMED_DATASETS)}")
    return reg[name]


def how_to_fix(name: str) -> str:
    return (
        f"set the data root with --set data.root=/path/to/datasets or the environment variable {ENV_ROOT} "
        f"(it must contain {name}/), or download it with --set data.download=true "
        f"(or `replab data download {name}`: needs a network, or `--archive PATH` for an archive already on disk)"
    )


# ---------------------------------------------------------------------------------------------- download


def _md5(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, dest: str, md5: str | None, *, log: Callable[[str], None] | None = None) -> str:
    """Download ``url`` to ``dest`` (via ``dest.part``), verify ``md5``; reuse a verified existing file."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if os.path.exists(dest):
        if md5 is None or _md5(dest) == md5:
            log(f"using the already downloaded {dest}")
            return dest
        log(f"{dest} has the wrong checksum; downloading again")
        os.remove(dest)
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    part = dest + ".part"
    h = hashlib.md5()
    request = urllib.request.Request(url, headers={"User-Agent": "replab-data/1.0"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, last = 0, time.monotonic()
            progress = bar(total=total or None, desc=os.path.basename(dest), unit="B", unit_scale=True)
            while block := response.read(1 << 20):
                out.write(block)
                h.update(block)
                done += len(block)
                progress.update(len(block))
                if progress.disable and time.monotonic() - last > 5:  # no terminal: a plain line every 5 s
                    pct = f" ({100 * done / total:.0f}%)" if total else ""
                    log(f"downloading {url}: {done / 1e6:.0f} MB{pct}")
                    last = time.monotonic()
            progress.close()
    except OSError as exc:
        if os.path.exists(part):
            os.remove(part)
        raise DataError(f"could not download {url}: {exc}") from None
    if md5 is not None and h.hexdigest() != md5:
        os.remove(part)
        raise DataError(f"checksum mismatch for {url}: md5 {h.hexdigest()}, expected {md5}; the file was removed")
    os.replace(part, dest)
    return dest


def download(
    name: str,
    root: str = "",
    *,
    url: str | None = None,
    md5: str | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    archive: str | None = None,
) -> str:
    """Download and convert the named dataset into ``{root}/{name}``; returns that folder.

    ``url``/``md5`` override the registry (mirrors; tests use ``file://`` URLs). The archive is kept under
    ``{root}/_downloads`` so a failed conversion does not download again. ``archive``: the dataset's archive
    already on disk (fetched elsewhere); it is checked against the registry's md5 and converted, no network.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    spec = named(name)
    base = data_root(root)
    if is_uri(base):
        raise DataError(f"download writes to a local data root; {base} is a URI (download locally, then copy)")
    target = os.path.join(base, name)
    if os.path.isdir(target) and any(p.endswith(".parquet") for p in os.listdir(target)) and not force:
        log(f"{name} is already in {target}")
        return target
    url = url or spec.url
    md5 = spec.md5 if md5 is None else (md5 or None)
    if archive is not None:
        archive = os.path.abspath(os.path.expanduser(archive))
        if not os.path.isfile(archive):
            raise DataError(f"--archive {archive}: no such file (expected the archive of {url})")
        if md5 is not None and _md5(archive) != md5:
            raise DataError(f"--archive {archive}: md5 {_md5(archive)} is not the expected {md5} of {url}")
    else:
        archive = os.path.join(base, "_downloads", os.path.basename(url.split("?")[0]))
        try:
            fetch(url, archive, md5, log=log)
        except DataError as exc:
            raise DataError(f"{exc}; offline? set {ENV_ROOT} (or --set data.root=...) to a folder holding "
                            f"{name}/, or fetch {url} elsewhere and run "
                            f"`replab data download {name} --archive PATH`") from None
    log(f"converting {archive} -> {target}")
    os.makedirs(base, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=base)
    try:
        spec.convert(archive, tmp)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"{name} ready in {target}")
    return target


# ---------------------------------------------------------------------------------------------- writing


def write_split(
    out_dir: str,
    split: str,
    rows: list[tuple[bytes, str, int]],
    *,
    rows_per_shard: int = 10000,
    row_group_size: int = 1000,
) -> int:
    """Write ``(encoded bytes, path, label)`` rows as ``{split}-NNNNN-of-MMMMM.parquet`` shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())]
    )
    n_shards = max(1, -(-len(rows) // rows_per_shard))
    for shard in range(n_shards):
        chunk = rows[shard * rows_per_shard : (shard + 1) * rows_per_shard]
        image = pa.StructArray.from_arrays(
            [pa.array([r[0] for r in chunk], pa.binary()), pa.array([r[1] for r in chunk], pa.string())],
            fields=list(schema.field("image").type),
        )
        table = pa.Table.from_arrays([image, pa.array([r[2] for r in chunk], pa.int64())], schema=schema)
        path = os.path.join(out_dir, f"{split}-{shard:05d}-of-{n_shards:05d}.parquet")
        pq.write_table(table, path, row_group_size=row_group_size, compression="none")
    return len(rows)


def write_metadata(out_dir: str, name: str, class_names: list[str], splits: dict[str, int], **extra) -> None:
    with open(os.path.join(out_dir, "classes.json"), "w") as f:
        json.dump(class_names, f, indent=0)
    with open(os.path.join(out_dir, "info.json"), "w") as f:
        json.dump({"name": name, **extra, "splits": splits}, f, indent=1)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- converters


def _key(d: dict, name: str):
    return d[name] if name in d else d[name.encode()]


def convert_cifar10(archive: str, out_dir: str) -> None:
    """``cifar-10-python.tar.gz`` -> parquet layout (PNG-encoded 32x32 arrays, original order)."""
    batches: dict[str, list[str]] = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    with tarfile.open(archive, "r:*") as tar:
        members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}

        def load(member: str) -> dict:
            if member not in members:
                raise DataError(f"{archive}: no {member} inside; is this the CIFAR-10 python archive?")
            return pickle.load(tar.extractfile(members[member]), encoding="bytes")  # noqa: S301 (md5-verified)

        meta = load("batches.meta")
        class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in _key(meta, "label_names")]
        counts = {}
        for split, names in batches.items():
            rows: list[tuple[bytes, str, int]] = []
            for batch_name in names:
                batch = load(batch_name)
                data = np.asarray(_key(batch, "data"), dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                labels = [int(x) for x in _key(batch, "labels")]
                for arr, label in zip(data, labels):
                    rows.append((_png(np.ascontiguousarray(arr)), f"{split}/{len(rows):05d}.png", label))
            counts[split] = write_split(out_dir, split, rows)
    write_metadata(out_dir, "cifar10", class_names, counts, image_size=32,
                   source="CIFAR-10 python version (Krizhevsky 2009), arrays PNG-encoded")


def convert_tinyimagenet(archive: str, out_dir: str) -> None:
    """``tiny-imagenet-200.zip`` -> parquet layout (original JPEG bytes; train and val splits)."""
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        prefix = next((n.split("wnids.txt")[0] for n in names if n.endswith("wnids.txt")), None)
        if prefix is None:
            raise DataError(f"{archive}: no wnids.txt inside; is this tiny-imagenet-200.zip?")
        wnids = sorted(w.strip() for w in zf.read(prefix + "wnids.txt").decode().split() if w.strip())
        index = {w: i for i, w in enumerate(wnids)}
        words: dict[str, str] = {}
        if prefix + "words.txt" in names:
            for line in zf.read(prefix + "words.txt").decode().splitlines():
                wnid, _, text = line.partition("\t")
                words[wnid.strip()] = text.split(",")[0].strip()
        class_names = [words.get(w, w) for w in wnids]

        train: list[tuple[bytes, str, int]] = []
        for name in sorted(names):
            rel = name[len(prefix):]
            parts = rel.split("/")
            if len(parts) == 4 and parts[0] == "train" and parts[2] == "images" and parts[1] in index:
                train.append((zf.read(name), rel, index[parts[1]]))
        val: list[tuple[bytes, str, int]] = []
        ann_name = prefix + "val/val_annotations.txt"
        if ann_name in names:
            for line in zf.read(ann_name).decode().splitlines():
                fields = line.split("\t")
                if len(fields) >= 2 and fields[1] in index:
                    rel = f"val/images/{fields[0]}"
                    val.append((zf.read(prefix + rel), rel, index[fields[1]]))
    if not train:
        raise DataError(f"{archive}: no train/<wnid>/images/*.JPEG files inside")
    counts = {"train": write_split(out_dir, "train", train, rows_per_shard=20000)}
    if val:
        counts["val"] = write_split(out_dir, "val", val, rows_per_shard=20000)
    write_metadata(out_dir, "tinyimagenet", class_names, counts, image_size=64, wnids=wnids,
                   source="Tiny-ImageNet-200 (Stanford CS231n), original 64x64 JPEG")


def convert_imagenette(archive: str, out_dir: str, size: int = 128, quality: int = 90) -> None:
    """``imagenette2-160.tgz`` -> parquet layout, every image short-side resized + centre-cropped to ``size``."""
    from PIL import Image

    from replab.platform.data.decode import SkipImage, decode_image

    splits: dict[str, list[tuple[bytes, str, int]]] = {"train": [], "val": []}
    wnids: set[str] = set()
    entries: list[tuple[str, str, str, bytes]] = []
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            parts = member.name.split("/")
            if len(parts) >= 4 and parts[-3] in splits and parts[-2].startswith("n"):
                split, wnid = parts[-3], parts[-2]
                wnids.add(wnid)
                entries.append((split, wnid, "/".join(parts[-3:]), tar.extractfile(member).read()))
    if not entries:
        raise DataError(f"{archive}: no <split>/<wnid>/*.JPEG files inside; is this imagenette2-160.tgz?")
    classes = sorted(wnids)
    index = {w: i for i, w in enumerate(classes)}
    for split, wnid, rel, data in sorted(entries, key=lambda e: e[2]):
        try:
            arr = decode_image(data, size)
        except SkipImage:
            continue
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        splits[split].append((buf.getvalue(), rel, index[wnid]))
    counts = {split: write_split(out_dir, split, rows) for split, rows in splits.items() if rows}
    write_metadata(out_dir, "imagenette128", [IMAGENETTE_NAMES.get(w, w) for w in classes], counts,
                   image_size=size, wnids=classes,
                   source=f"Imagenette 160 px (fast.ai), resized and centre-cropped to {size}x{size}, JPEG q{quality}")


def main(argv: list[str] | None = None) -> int:
    """``python -m replab.platform.data.datasets download NAME [--root DIR] [--force]`` (also ``list``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m replab.platform.data.datasets")
    sub = parser.add_subparsers(dest="cmd", required=True)
    dl = sub.add_parser("download", help="download and convert a named dataset")
    dl.add_argument("name", choices=NAMED_DATASETS)
    dl.add_argument("--root", default="", help=f"data root (default: ${ENV_ROOT} or {DEFAULT_ROOT})")
    dl.add_argument("--force", action="store_true", help="convert again even if present")
    sub.add_parser("list", help="the named datasets and their sources")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        for spec in _registry().values():
            print(f"{spec.name:14s} {spec.description}\n{'':14s} {spec.url} (md5 {spec.md5})")
        return 0
    try:
        print(download(args.name, args.root, force=args.force))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
