"""A run's checkpoints: writing and reading ``state.pt``, and finding and fetching the newest one (local paths
or URIs, through pyarrow filesystems).

Ray Train writes ``<storage_path>/<run name>/checkpoint_<timestamp>/state.pt``; a plain run of the loop
writes ``checkpoint_epoch_<n>``. Either way the newest folder holding ``state.pt`` is the last checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs
import torch

if TYPE_CHECKING:
    from replab.config import RunConfig
    from replab.methods.base import Method

CHECKPOINT_FILE = "state.pt"


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


def save_checkpoint(method: Method, optimizer: torch.optim.Optimizer, epoch: int, step: int, cfg: RunConfig) -> str:
    """Write a checkpoint into a fresh folder (``mkdtemp``: Ray uploads it after this returns)."""
    folder = tempfile.mkdtemp(prefix="replab-ckpt-")
    state = {
        "method": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "step": step,
        "config": cfg.to_dict(),
    }
    tmp = os.path.join(folder, CHECKPOINT_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(folder, CHECKPOINT_FILE))
    return folder


def load_checkpoint(folder: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    return torch.load(Path(folder) / CHECKPOINT_FILE, map_location=map_location, weights_only=True)

