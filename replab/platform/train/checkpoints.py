"""A run's checkpoints: writing and reading ``state.pt``, and finding and fetching the newest one (local paths
or URIs, through pyarrow filesystems).

Ray Train writes ``<storage_path>/<run name>/checkpoint_<timestamp>/state.pt``; a plain run of the loop
writes ``checkpoint_epoch_<n>``. Either way the newest folder holding ``state.pt`` is the last checkpoint.

Before a run resumes, :func:`prepare_resume` picks the newest *readable* checkpoint: a newer one that is
truncated or garbage is moved aside (``corrupt_<name>``, nothing is deleted) and named in one line, and Ray
Train's own list of the run's checkpoints (``checkpoint_manager_snapshot.json``) is trimmed to the folders
that remain, since Ray refuses a run whose list names a folder that is gone.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs
import torch

from replab.platform.train.errors import CheckpointError

if TYPE_CHECKING:
    from replab.config import RunConfig
    from replab.methods.base import Method

CHECKPOINT_FILE = "state.pt"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # ray.train.v2._internal.constants, Ray 2.60


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


def load_checkpoint(folder: str | os.PathLike, map_location="cpu", mmap: bool = False) -> dict[str, Any]:
    """The state dict of ``folder/state.pt``; :class:`CheckpointError` naming the file when it is unreadable."""
    path = Path(folder) / CHECKPOINT_FILE
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch's own message may suggest weights_only=False: never for a bad file
        raise CheckpointError(f"{path}: unreadable checkpoint ({_reason(exc)})") from None


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, zipfile.BadZipFile) or "zip archive" in text or "central directory" in text:
        return "truncated or not a torch checkpoint"
    if "weights_only" in text or "Unpickl" in type(exc).__name__:
        return "not a replab checkpoint"
    return text[:200]


def verify_checkpoint(folder: str) -> dict[str, Any]:
    """Read ``folder/state.pt`` end to end (every zip member's CRC, then the pickle, tensors memory-mapped);
    returns its ``epoch`` and ``step``, or raises :class:`CheckpointError` naming the file."""
    local = fetch(folder)
    path = Path(local) / CHECKPOINT_FILE
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({_reason(exc)})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: unreadable checkpoint (member {bad} fails its CRC check)")
    state = load_checkpoint(local, mmap=True)
    if not isinstance(state, dict) or "epoch" not in state or "step" not in state:
        raise CheckpointError(f"{path}: not a replab checkpoint (no epoch / step)")
    return {"epoch": int(state["epoch"]), "step": int(state["step"])}


@dataclass
class Resume:
    """Where a run continues: ``path`` None means from scratch."""

    path: str | None = None
    epoch: int = 0
    step: int = 0
    set_aside: list[str] = field(default_factory=list)
    """One line per unreadable checkpoint moved aside (which file, why, where it went)."""


def prepare_resume(run_dir: str) -> Resume:
    """The newest readable checkpoint of ``run_dir`` (see the module doc); unreadable newer ones are moved to
    ``corrupt_<name>`` beside it (listed in ``set_aside``), and Ray's snapshot is trimmed to what remains."""
    fs, base = _fs(run_dir)
    resume = Resume()
    while (newest := latest_checkpoint(run_dir)) is not None:
        try:
            info = verify_checkpoint(newest)
        except CheckpointError as exc:
            src = _fs(newest)[1]
            aside = f"{src.rsplit('/', 1)[0]}/corrupt_{src.rsplit('/', 1)[1]}"
            fs.move(src, aside)
            resume.set_aside.append(f"{exc}; moved aside to {aside}")
            continue
        resume.path, resume.epoch, resume.step = newest, info["epoch"], info["step"]
        break
    _trim_ray_snapshot(fs, base)
    return resume


def _trim_ray_snapshot(fs: pafs.FileSystem, base: str) -> None:
    """Drop from Ray Train's checkpoint list the folders that no longer exist (moved aside, deleted by hand);
    the newest remaining becomes its latest. An unparseable list is moved aside (the run then resumes from
    the checkpoint replab passes to the workers)."""
    path = f"{base}/{RAY_SNAPSHOT}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return
    with fs.open_input_stream(path) as f:
        text = f.read().decode("utf-8", "replace")

    def present(name: str) -> bool:
        return fs.get_file_info(f"{base}/{name}").type == pafs.FileType.Directory

    try:
        state = json.loads(text)
        pairs = list(zip(state["checkpoint_results"], state["checkpoint_report_indices"]))
        keep = [(r, i) for r, i in pairs if present(r["checkpoint_dir_name"])]
        if len(keep) == len(pairs):
            return
        names = {r["checkpoint_dir_name"] for r, _ in keep}
        state["checkpoint_results"] = [r for r, _ in keep]
        state["checkpoint_report_indices"] = [i for _, i in keep]
        state["latest_checkpoint_result"] = max(keep, key=lambda ri: ri[1])[0] if keep else None
        pending = [(r, v) for r, v in zip(state["pending_training_results"], state["pending_validation_specs"])
                   if r["checkpoint_dir_name"] in names]
        state["pending_training_results"] = [r for r, _ in pending]
        state["pending_validation_specs"] = [v for _, v in pending]
        for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                    "failed_validation_checkpoint_dir_names"):
            state[key] = [n for n in state.get(key, []) if n in names]
    except (ValueError, KeyError, TypeError):
        fs.move(path, f"{path}.unreadable")
        return
    with fs.open_output_stream(f"{path}.tmp") as f:
        f.write(json.dumps(state).encode("utf-8"))
    fs.move(f"{path}.tmp", path)

