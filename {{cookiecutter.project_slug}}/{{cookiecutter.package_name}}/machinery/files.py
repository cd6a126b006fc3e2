"""The run's files: written so that no crash can corrupt them, and removed.

``atomic_write`` writes to a temporary file in the same folder, flushes it to
disk (fsync), then renames it over the old one with ``os.replace``, which is
atomic: a crash at any moment leaves either the old file or the new one, never
half of one. Checkpoints (checkpoint.py) and ``metrics.jsonl`` cut back on
resume (metrics.py) are written this way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path


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


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call ``write(temp_path)`` for a temp file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    old = None
    try:
        write(tmp)  # by path: torch.save then uses its fast native writer
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it private (0600); like any file the user writes
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


def remove(path: Path) -> None:
    """Delete a file, or a folder (a sharded checkpoint) with what it holds; nothing if there is none."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
