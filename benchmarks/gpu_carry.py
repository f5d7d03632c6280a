"""Prepare the data that travels to a lent GPU machine for ``benchmarks/gpu_session.sh``.

    REPLAB_DATA_ROOT=../shared/datasets python benchmarks/gpu_carry.py      # -> .gpucarry/ (git-ignored)

The device tool carries the working tree plus named ignored paths, 64 MiB in all, and not ``../shared``:
this copies CIFAR-10's train shards whole (46 MB: the epoch target is a full 50,000-image epoch) and a
class-strided 512-image subset of Imagenette-128's train split (the DINO multi-crop augmentation case).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from replab.platform.data.datasets import data_root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="", help="dataset root (default: $REPLAB_DATA_ROOT)")
    parser.add_argument("--dest", default=".gpucarry/datasets")
    parser.add_argument("--imagenette-images", type=int, default=512)
    args = parser.parse_args(argv)
    source, dest = Path(data_root(args.root)), Path(args.dest)
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "cifar10").mkdir(parents=True)
    for f in sorted((source / "cifar10").glob("train-*.parquet")) + [source / "cifar10" / "info.json",
                                                                     source / "cifar10" / "classes.json"]:
        shutil.copy2(f, dest / "cifar10" / f.name)
    (dest / "imagenette128").mkdir()
    for name in ("info.json", "classes.json"):
        shutil.copy2(source / "imagenette128" / name, dest / "imagenette128" / name)
    table = pq.read_table(source / "imagenette128" / "train-00000-of-00001.parquet")
    stride = max(1, table.num_rows // args.imagenette_images)  # rows are sorted by class: stride over all
    pq.write_table(table.take(list(range(0, table.num_rows, stride))[:args.imagenette_images]),
                   dest / "imagenette128" / "train-00000-of-00001.parquet")
    total = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{dest}: {total / 2**20:.1f} MiB (the device tool carries 64 MiB with the working tree)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
