"""Where images come from: a dataset name, path or URI resolved to a :class:`Source` (its kind, files, split and
columns).

1. Parquet in the Hugging Face image layout: the image column (``data.image_column``) is a struct
   ``{bytes, path}`` or plain binary; the label column (``data.label_column``) is optional (missing: label
   -1) and may be integers or strings (strings: classes = sorted unique values).
2. A folder of images: class sub-folders give labels 0..C-1 in sorted name order; a flat folder is
   unlabeled (-1). Every regular file is a sample (hidden files, ``_*`` and a few metadata names such as
   ``classes.json``/``README.md`` aside): a file that is not a decodable image is skipped and counted.
3. Tar shards (webdataset style, uncompressed ``.tar``): members ``key.jpg``/``key.png``/... plus an
   optional ``key.cls`` (an integer label); class names from ``classes.json`` beside the shards.
4. Named datasets ``cifar10``, ``tinyimagenet``, ``imagenette128`` under the data root
   (``{root}/{name}/{split}-NNNNN-of-MMMMM.parquet`` + ``classes.json`` + ``info.json``).

Splits: files named ``{split}-*``/``{split}_*`` or under a ``{split}/`` folder (``val`` also matches
``validation``/``valid``); a source without split naming is the ``train`` split only. Paths may be local
(made absolute before they reach Ray workers), ``file://``, ``s3://``, ``gs://`` or anything
``pyarrow.fs.FileSystem.from_uri`` reads; a local path may contain ``*`` globs.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from replab.platform.data.datasets import NAMED_DATASETS, DataError, data_root, download, how_to_fix, is_uri

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "pnm", "jfif", "jpe"}


LABEL_EXTS = {"cls", "cls.txt", "label", "label.txt", "class", "class.txt", "cls2"}


KNOWN_SPLITS = ("train", "test", "val", "validation", "valid", "dev", "unlabeled", "unsupervised")


SPLIT_ALIASES = {"val": ("val", "validation", "valid"), "validation": ("validation", "val", "valid"),
                 "valid": ("valid", "val", "validation")}


IGNORED_FILES = {"classes.json", "info.json", "readme", "readme.md", "readme.txt", "license", "license.txt",
                 "thumbs.db", "desktop.ini", "dataset_info.json", "state.json", "dataset_dict.json"}


@dataclass
class Source:
    """A resolved dataset split: what kind, which files, how to read them (picklable)."""

    kind: str
    """``parquet``, ``folder`` or ``tar``."""
    name: str
    split: str
    uri: str
    """Absolute local path or URI of the resolved location (shown in messages)."""
    files: list[str]
    """Paths inside ``filesystem`` (absolute for local files), sorted."""
    filesystem: pafs.FileSystem
    base: str
    """Folder the files are relative to (for row names and class sub-folders)."""
    image_column: str = "image"
    label_column: str = "label"
    class_names: list[str] | None = None
    file_labels: list[int] | None = None
    """folder: label of each file (-1: unlabeled)."""
    file_sizes: list[int] | None = None
    file_mtimes: list[float] | None = None

    def rel(self, path: str) -> str:
        return posixpath.relpath(path, self.base) if path.startswith(self.base) else path

    def fingerprint(self) -> str:
        """Changes when the files change (keys the array cache)."""
        h = hashlib.sha1()
        h.update(json.dumps([self.kind, self.uri, self.split, self.image_column, self.label_column]).encode())
        for i, f in enumerate(self.files):
            size = self.file_sizes[i] if self.file_sizes else None
            mtime = self.file_mtimes[i] if self.file_mtimes else None
            h.update(f"{f}|{size}|{mtime}\n".encode())
        return h.hexdigest()


def filesystem(path: str) -> tuple[pafs.FileSystem, str, str]:
    """``(filesystem, path inside it, display form)``; local paths made absolute."""
    if is_uri(path):
        try:
            fs, inner = pafs.FileSystem.from_uri(path)
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"cannot open {path}: {exc}") from None
        return fs, inner.rstrip("/") or "/", path.rstrip("/")
    p = str(Path(path).expanduser().resolve())
    return pafs.LocalFileSystem(), p, p


def _hidden(rel: str) -> bool:
    parts = rel.split("/")
    return any(part.startswith((".", "_")) for part in parts) or parts[-1].lower() in IGNORED_FILES


def list_files(fs: pafs.FileSystem, base: str) -> list[pafs.FileInfo]:
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    out = [i for i in infos if i.type == pafs.FileType.File and not _hidden(posixpath.relpath(i.path, base))]
    return sorted(out, key=lambda i: i.path)


def split_token(rel: str) -> str | None:
    """The split named by a relative path: its first component (``train/...``) or a ``{split}-`` prefix."""
    for comp in rel.split("/"):
        head = re.split(r"[-_.]", comp, maxsplit=1)[0].lower()
        if head in KNOWN_SPLITS:
            return head
    return None


def _split_matches(token: str | None, split: str) -> bool:
    return token is not None and token in SPLIT_ALIASES.get(split, (split,))


def _select_split(rels: list[str], split: str, where: str) -> list[int]:
    tokens = [split_token(r) for r in rels]
    chosen = [i for i, t in enumerate(tokens) if _split_matches(t, split)]
    if chosen:
        return chosen
    present = sorted({t for t in tokens if t is not None})
    if not present and split == "train":
        return list(range(len(rels)))
    if not present:
        raise DataError(
            f"{where} has no split naming, so it is served as split 'train' only (asked for {split!r}); "
            "name files {split}-*.parquet / {split}-*.tar or use {split}/ sub-folders"
        )
    raise DataError(f"{where} has no split {split!r} (splits found: {', '.join(present)})")


def _expand_glob(path: str) -> tuple[pafs.FileSystem, list[pafs.FileInfo], str, str]:
    fs, inner, display = filesystem(path)
    # The pattern lives in the last components; list from the longest prefix without wildcards.
    parts = inner.split("/")
    fixed = []
    for part in parts:
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    base = "/".join(fixed) or "/"
    import fnmatch

    try:
        infos = list_files(fs, base)
    except (FileNotFoundError, OSError):
        infos = []
    matched = [i for i in infos if fnmatch.fnmatch(i.path, inner)]
    return fs, matched, base, display


def resolve(
    dataset: str,
    root: str = "",
    split: str = "train",
    *,
    image_column: str = "image",
    label_column: str = "label",
) -> Source:
    """Find ``split`` of ``dataset`` (a named dataset under the data root, or a path/URI); raises DataError."""
    if not dataset:
        raise DataError(f"data.dataset is empty; use a named dataset ({', '.join(NAMED_DATASETS)}) or a path")
    dataset = str(dataset)
    split = split or "train"
    if dataset in NAMED_DATASETS and not dataset.startswith((".", "/")):
        base = data_root(root)
        location = posixpath.join(base, dataset) if is_uri(base) else os.path.join(base, dataset)
        fs, inner, display = filesystem(location)
        info = fs.get_file_info(inner)
        files = list_files(fs, inner) if info.type == pafs.FileType.Directory else []
        parquet = [f for f in files if f.path.endswith(".parquet")]
        if not parquet:
            raise DataError(
                f"dataset {dataset!r} not found: looked for {display}/{split}-*.parquet "
                f"({'no such folder' if info.type == pafs.FileType.NotFound else 'no parquet files there'}). "
                f"To fix: {how_to_fix(dataset)}"
            )
        src = _source_from_files(fs, parquet, inner, display, dataset, split, "parquet", image_column, label_column)
        src.class_names = src.class_names or _classes_json(fs, inner)
        return src

    if any(c in dataset for c in "*?[") and not is_uri(dataset):
        fs, infos, base, display = _expand_glob(dataset)
        if not infos:
            raise DataError(f"{dataset}: the pattern matches no files")
        kinds = {_kind_of(i.path) for i in infos}
        kind = "parquet" if "parquet" in kinds else "tar" if "tar" in kinds else "folder"
        infos = [i for i in infos if _kind_of(i.path) == kind] if kind != "folder" else infos
        return _source_from_files(fs, infos, base, display, dataset, split, kind, image_column, label_column)

    fs, inner, display = filesystem(dataset)
    try:
        info = fs.get_file_info(inner)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read {display}: {exc}") from None
    if info.type == pafs.FileType.NotFound:
        if "/" not in dataset and not is_uri(dataset):
            raise DataError(
                f"{dataset!r} is not a named dataset ({', '.join(NAMED_DATASETS)}) and not an existing path "
                f"(looked for {display})"
            )
        raise DataError(f"dataset path not found: {display}")
    if info.type == pafs.FileType.File:
        kind = _kind_of(inner)
        if kind not in ("parquet", "tar"):
            raise DataError(f"{display}: expected a .parquet file, a .tar shard or a folder")
        base = posixpath.dirname(inner)
        return _source_from_files(fs, [info], base, display, dataset, split, kind, image_column, label_column)

    files = list_files(fs, inner)
    parquet = [f for f in files if f.path.endswith(".parquet")]
    tars = [f for f in files if f.path.endswith(".tar")]
    if parquet:
        src = _source_from_files(fs, parquet, inner, display, dataset, split, "parquet", image_column, label_column)
        src.class_names = src.class_names or _classes_json(fs, inner)
        return src
    if tars:
        src = _source_from_files(fs, tars, inner, display, dataset, split, "tar", image_column, label_column)
        src.class_names = src.class_names or _classes_json(fs, inner)
        return src
    if any(f.path.endswith((".tar.gz", ".tgz", ".zip")) for f in files):
        raise DataError(f"{display}: compressed archives are not read directly; extract them or use `replab data download`")
    return _folder_source(fs, files, inner, display, dataset, split)


def _kind_of(path: str) -> str:
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith(".tar"):
        return "tar"
    return "folder"


def _classes_json(fs: pafs.FileSystem, base: str) -> list[str] | None:
    for name in ("classes.json", "classes.txt"):
        path = posixpath.join(base, name)
        try:
            if fs.get_file_info(path).type != pafs.FileType.File:
                continue
            with fs.open_input_stream(path) as f:
                text = f.read().decode()
            return [str(c) for c in json.loads(text)] if name.endswith(".json") else [
                line.strip() for line in text.splitlines() if line.strip()
            ]
        except Exception:  # noqa: BLE001
            continue
    return None


def _source_from_files(fs, infos, base, display, name, split, kind, image_column, label_column) -> Source:
    rels = [posixpath.relpath(i.path, base) for i in infos]
    chosen = _select_split(rels, split, display)
    infos = [infos[i] for i in chosen]
    return Source(
        kind=kind,
        name=name,
        split=split,
        uri=display,
        files=[i.path for i in infos],
        filesystem=fs,
        base=base,
        image_column=image_column,
        label_column=label_column,
        file_sizes=[int(i.size or 0) for i in infos],
        file_mtimes=[float(i.mtime.timestamp()) if i.mtime else 0.0 for i in infos],
    )


def _folder_source(fs, files, inner, display, name, split) -> Source:
    base = inner
    top_dirs = {posixpath.relpath(f.path, inner).split("/")[0] for f in files if "/" in posixpath.relpath(f.path, inner)}
    split_dirs = {d for d in top_dirs if d.lower() in KNOWN_SPLITS}
    if split_dirs:
        match = [d for d in sorted(split_dirs) if _split_matches(d.lower(), split)]
        if not match:
            raise DataError(f"{display} has no split {split!r} (splits found: {', '.join(sorted(split_dirs))})")
        base = posixpath.join(inner, match[0])
        files = [f for f in files if f.path.startswith(base + "/")]
    elif split != "train":
        raise DataError(
            f"{display} has no split sub-folders, so it is served as split 'train' only (asked for {split!r}); "
            "use train/, val/ or test/ sub-folders"
        )
    rels = [posixpath.relpath(f.path, base) for f in files]
    class_dirs = sorted({r.split("/")[0] for r in rels if "/" in r})
    if class_dirs:
        index = {c: i for i, c in enumerate(class_dirs)}
        keep = [i for i, r in enumerate(rels) if "/" in r]  # files beside the class folders are not samples
        files = [files[i] for i in keep]
        labels = [index[rels[i].split("/")[0]] for i in keep]
        class_names: list[str] | None = class_dirs
    else:
        labels = [-1] * len(files)
        class_names = None
    if not files:
        raise DataError(f"{display}: no files found")
    return Source(
        kind="folder",
        name=name,
        split=split,
        uri=display if base == inner else f"{display}/{posixpath.relpath(base, inner)}",
        files=[f.path for f in files],
        filesystem=fs,
        base=base,
        class_names=class_names,
        file_labels=labels,
        file_sizes=[int(f.size or 0) for f in files],
        file_mtimes=[float(f.mtime.timestamp()) if f.mtime else 0.0 for f in files],
    )


def resolve_config(cfg, split: str | None = None) -> Source:
    """:func:`resolve` for a :class:`replab.config.DataConfig` (``split`` defaults to ``cfg.split``),
    downloading a missing named dataset first when ``cfg.download`` is set; raises DataError otherwise."""
    return resolve_for_split(cfg, split or cfg.split)


def resolve_for_split(cfg, split: str) -> Source:
    """resolve() for a DataConfig, downloading a missing named dataset when ``cfg.download`` is set."""
    try:
        return resolve(cfg.dataset, cfg.root, split, image_column=cfg.image_column, label_column=cfg.label_column)
    except DataError:
        if not (getattr(cfg, "download", False) and cfg.dataset in NAMED_DATASETS):
            raise
    download(cfg.dataset, cfg.root)
    return resolve(cfg.dataset, cfg.root, split, image_column=cfg.image_column, label_column=cfg.label_column)
