"""Finding and fetching a run's checkpoints (local paths or URIs, through pyarrow filesystems).

Ray Train writes ``<storage_path>/<run name>/checkpoint_<timestamp>/state.pt``; a plain run of the loop
writes ``checkpoint_epoch_<n>``. Either way the newest folder holding ``state.pt`` is the last checkpoint.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from replab.platform.loop import CHECKPOINT_FILE


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest ``checkpoint_*`` folder under ``run_dir`` that holds a complete ``state.pt``."""
    fs, base = _fs(run_dir)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        return None
    found = []
    for entry in fs.get_file_info(pafs.FileSelector(base, recursive=False)):
        if entry.type == pafs.FileType.Directory and entry.base_name.startswith("checkpoint"):
            state = fs.get_file_info(f"{entry.path}/{CHECKPOINT_FILE}")
            if state.type == pafs.FileType.File:
                found.append((state.mtime_ns or 0, entry.path))
    if not found:
        return None
    newest = max(found)[1]
    return newest if "://" not in run_dir else run_dir.split("://")[0] + "://" + newest


def fetch(checkpoint: str) -> str:
    """A local folder with the checkpoint's files (downloaded when ``checkpoint`` is a URI)."""
    if "://" not in checkpoint:
        return checkpoint
    local = tempfile.mkdtemp(prefix="replab-ckpt-")
    pafs.copy_files(checkpoint, local)
    return local
