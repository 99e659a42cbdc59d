"""Writing files so that a crash never leaves a half-written one where a finished one is expected."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

_UNSAFE_NAME = re.compile(r"[^\w.-]+", re.UNICODE)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder, fsync, then rename.

    A reader sees either the previous file or the complete new one, never a partial write,
    even if the process is killed or the disk fills up half-way.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_replace_dir(tmp_dir: Path, final_dir: Path) -> Path:
    """Move a fully written folder into place, replacing any previous one with the same name."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    return final_dir


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def safe_name(name: str, default: str = "adapter") -> str:
    """A file-system-safe name: letters (any script), digits, '.', '_' and '-'; no path parts."""
    cleaned = _UNSAFE_NAME.sub("_", name.strip()).strip("._")
    return cleaned[:100] or default


def new_stamped_folder(parent: Path, name: str) -> Path:
    """A new, empty PARENT/NAME-YYYYmmdd-HHMMSS folder (-2, -3, ... appended if that one exists)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, suffix = parent / f"{name}-{stamp}", 1
    while path.exists():
        suffix += 1
        path = parent / f"{name}-{stamp}-{suffix}"
    path.mkdir(parents=True)
    return path
