"""Writing files so that a crash never leaves a half-written one where a finished one is expected.

A full or read-only disk is a user's problem, not a bug: the helpers here turn it into `DiskError`, whose
message names the folder and says what was kept, and they never leave a partial file behind.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from sdlora.errors import SdloraError

T = TypeVar("T")
_UNSAFE_NAME = re.compile(r"[^\w.-]+", re.UNICODE)
# File systems limit a name to 255 bytes; a safe name stays well below so a suffix and a stamp still fit.
MAX_NAME_BYTES = 100
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_DISK_ERRNOS = {errno.ENOSPC: "full", errno.EDQUOT: "over its quota", errno.EROFS: "read-only"}


class DiskError(SdloraError, OSError):
    """A folder is full, over quota, read-only or not writable; the message names it and what was kept."""

    def __str__(self) -> str:  # the plain message, without OSError's "[Errno 28]" prefix
        return str(self.strerror)


def disk_problem(error: OSError, folder: str | os.PathLike) -> DiskError | None:
    """A `DiskError` for an out-of-space or permission failure while writing into `folder`, else None."""
    if error.errno in _DISK_ERRNOS:
        state = _DISK_ERRNOS[error.errno]
    elif error.errno in (errno.EACCES, errno.EPERM):
        state = "not writable (permission denied)"
    else:
        return None
    return DiskError(error.errno, f"{Path(folder)} is {state}")


@contextmanager
def disk_errors(folder: str | os.PathLike, kept: str = "") -> Iterator[None]:
    """Turn a full or read-only disk inside the block into `DiskError` naming `folder` and what was `kept`."""
    try:
        yield
    except DiskError:
        raise
    except Exception as error:
        code = _errno_of(error)
        problem = disk_problem(OSError(code, str(error)), folder) if code else None
        if problem is None:
            raise
        advice = "Free some space" if code in (errno.ENOSPC, errno.EDQUOT) else "Make it writable"
        message = f"Can't save: {problem.strerror}. {advice} and try again."
        raise DiskError(code, f"{message} {kept}".strip()) from error


def _errno_of(error: Exception) -> int | None:
    """The errno of an OSError, or of a Rust-backed library's error (safetensors says "(os error 28)")."""
    if isinstance(error, OSError):
        return error.errno
    found = _RUST_OS_ERROR.search(str(error))
    return int(found.group(1)) if found else None


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write the whole file to; when the block ends it is fsynced and
    renamed to `path`, and if the block fails it is removed.

    A reader sees the previous file or the complete new one, never a partial write, even if the process
    is killed or the disk fills up half-way; a full or read-only disk is a `DiskError` naming the folder.
    """
    path = Path(path)
    with disk_errors(path.parent, f"{path.name} was not written; nothing else was changed."):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask's mode, as any file
        try:
            yield tmp
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Copy a file to `path` atomically, so a full disk leaves no partial copy."""
    with atomic_file(path) as tmp:
        shutil.copyfile(source, tmp)
    return Path(path)


def retry_until_written(
    write: Callable[[], T],
    *,
    wait_s: float,
    every_s: float,
    on_first_failure: Callable[[DiskError], None],
    should_stop: Callable[[], bool],
) -> T:
    """`write()`, tried again every `every_s` seconds while it fails on a full or read-only disk, so a
    user who frees space (or makes the folder writable) gets the file without losing what is in memory.

    Gives up after `wait_s` seconds or as soon as `should_stop()` says so, raising the last `DiskError`.
    """
    deadline = time.monotonic() + wait_s
    try:
        return write()
    except DiskError as error:
        on_first_failure(error)
        last = error
    while time.monotonic() < deadline:
        retry_at = min(time.monotonic() + every_s, deadline)
        while time.monotonic() < retry_at:
            if should_stop():
                raise last
            time.sleep(min(0.1, every_s))
        try:
            return write()
        except DiskError as error:
            last = error
    raise last


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_folder(path: str | os.PathLike, kept: str = "") -> Iterator[Path]:
    """A temporary folder beside `path` to write a whole folder into; when the block ends it replaces
    `path` (and any previous folder of that name), and if the block fails it is removed.

    A reader sees the previous folder or the complete new one; a full or read-only disk is a `DiskError`
    naming the parent folder and what was `kept` (by default: nothing else was changed).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with disk_errors(path.parent, kept or f"{path.name} was not written; nothing else was changed."):
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a process that was killed while writing
            tmp.mkdir()
            yield tmp
            for file in (f for f in tmp.rglob("*") if f.is_file()):
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
            fsync_dir(tmp)
            atomic_replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_replace_dir(tmp_dir: Path, final_dir: Path) -> Path:
    """Move a fully written folder into place, replacing any previous one with the same name."""
    with disk_errors(final_dir.parent, f"{final_dir.name} was not replaced."):
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
    """A file-system-safe name: letters (any script), digits, '.', '_' and '-'; no path parts.

    A long name is cut to `MAX_NAME_BYTES` of UTF-8 (not characters: 86 CJK characters already pass the
    255-byte limit of most file systems) and ends in a short hash, so two long names stay apart."""
    cleaned = _UNSAFE_NAME.sub("_", name.strip()).strip("._")
    if len(cleaned.encode("utf-8")) > MAX_NAME_BYTES:
        digest = hashlib.sha256(cleaned.encode("utf-8")).hexdigest()[:8]
        head = cleaned.encode("utf-8")[: MAX_NAME_BYTES - 9].decode("utf-8", errors="ignore").rstrip("._")
        cleaned = f"{head}_{digest}"
    return cleaned or default


def new_stamped_folder(parent: Path, name: str) -> Path:
    """A new, empty PARENT/NAME-YYYYmmdd-HHMMSS folder (-2, -3, ... appended if that one exists)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, suffix = parent / f"{name}-{stamp}", 1
    while path.exists():
        suffix += 1
        path = parent / f"{name}-{stamp}-{suffix}"
    path.mkdir(parents=True)
    return path
