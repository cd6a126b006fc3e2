"""Essential 6 (the saving half): crash-safe checkpoints.

A checkpoint is written to a temporary file in the same folder, flushed to
disk (fsync), then renamed over the old one with ``os.replace``, which is
atomic: a crash at any moment leaves either the old file or the new one,
never half of one. Checkpoints hold tensors, numbers, strings, lists and
dicts only, so ``torch.load(path, weights_only=True)`` reads them.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "{{ cookiecutter.package_name }}-checkpoint-v1"
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "scaler", "config", "step", "best_metric")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and the cause."""


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_old(path: Path) -> int | None:
    """A read handle on the file about to be replaced (POSIX only: Windows cannot rename over an open file)."""
    if os.name != "posix":
        return None
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call ``write(temp_path)`` for a temp file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    old = None
    try:
        write(tmp)  # by path: torch.save then uses its fast native writer
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        # Freeing the old file's disk blocks takes about 1 ms per 5 MB (ext4); holding it open
        # moves that work to the last close, done below off the calling thread.
        old = _open_old(path)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        if old is not None:
            threading.Thread(target=os.close, args=(old,), name="release-old-checkpoint", daemon=True).start()
    _fsync_dir(path.parent)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    try:
        atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))
    except OSError as e:
        raise CheckpointError(f"could not save {path}: {e.strerror or e}; the previous file is unchanged") from e


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint of this project, or raise CheckpointError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): {first_line}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project (expected format '{FORMAT}')")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return state


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load weights into ``model``; a shape or key mismatch names the first differences."""
    own = unwrap(model).state_dict()
    problems = [f"missing {k}" for k in own if k not in state_dict]
    problems += [f"unexpected {k}" for k in state_dict if k not in own]
    problems += [
        f"{k} is {tuple(v.shape)} in the file but {tuple(own[k].shape)} in the model"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"checkpoint {path} does not fit the model built from the config: {'; '.join(problems[:3])}{more}"
        )
    unwrap(model).load_state_dict(state_dict)
