"""Turning an upload (a dropped folder, some files or one .zip) into a training folder.

The browser sends each file on its own, so the app's page names each file of a dropped folder by its path
inside it (see `RELATIVE_SEP`); the CLI hands over a .zip given as its data folder. Either way everything
is copied into one fresh folder under ``outputs/uploads/`` that the trainer then reads like any folder
given on the command line (kohya `N_words` sub-folders included), and whose captions can be edited as a
table before training.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TypeVar

from sdlora.data import IMAGE_EXTENSIONS, ImageError, list_images, load_image, read_caption
from sdlora.data.folder import KOHYA_DIR, MAX_CAPTION_BYTES, file_digest
from sdlora.errors import SdloraError
from sdlora.files import atomic_write_text, disk_errors, safe_name
from sdlora.outputs import Outputs

CAPTION_SUFFIX = ".txt"
# The app's page names each file of a dropped folder by its path inside it, parts joined by this (a
# division slash: browsers send bare names and Gradio keeps every character but real separators).
RELATIVE_SEP = "\u2215"
EMPTY_FOLDER = "sdlora-empty-folder"  # what the page sends for a picked folder the browser found empty
# Upper bounds on one upload, so a small crafted file can't fill the disk or the server's memory. A zip's
# entry count is read from its end record before its directory is loaded; every member is streamed to disk.
MAX_FILES = 20_000  # images and captions in one upload
MAX_ZIP_ENTRIES = 2 * MAX_FILES  # central-directory entries, counting folders and junk
MAX_ZIP_DIRECTORY_BYTES = 64 * 1024**2
MAX_UNPACKED_BYTES = 2 * 1024**3  # all members together
MAX_IMAGE_BYTES = 256 * 1024**2  # one image member (a 64 Mpx PNG is ~200 MB)
MAX_SHOWN = 10  # left-out files named in a message; the rest are counted
MAX_SHOWN_NAME = 80  # characters of an uploaded name echoed back
UNUSED_UPLOAD_AGE_S = 6 * 3600  # an upload no run used is removed after this long
_CHUNK = 1024 * 1024
# Files that operating systems leave in folders and zips; silently left out rather than reported.
_JUNK = re.compile(r"^(\.|__MACOSX$|Thumbs\.db$|desktop\.ini$)", re.IGNORECASE)


T = TypeVar("T")


class UploadError(SdloraError, ValueError):
    """The upload can't be used for training; the message says what is wrong and what to upload instead."""


@dataclass
class StagedUpload:
    """A training folder made from an upload, the adapter name it suggests, and what was left out and why."""

    folder: Path
    name: str
    images: int
    skipped: list[str] = field(default_factory=list)

    def left_out(self) -> str:
        """What was left out, in a message of bounded length ('' when nothing was)."""
        return f"Left out {len(self.skipped)} file(s): {shown_list(self.skipped)}." if self.skipped else ""


def shown(name: str, limit: int = MAX_SHOWN_NAME) -> str:
    """An uploaded name cut to `limit` characters (its start and end kept), for echoing to a page."""
    return name if len(name) <= limit else f"{name[: limit // 2 - 1]}…{name[-(limit // 2) :]}"


def shown_list(items: Sequence[str]) -> str:
    """The first MAX_SHOWN items joined, with how many more there are."""
    text = "; ".join(items[:MAX_SHOWN])
    return text + (f"; … and {len(items) - MAX_SHOWN} more" if len(items) > MAX_SHOWN else "")


def stage_upload(paths: Sequence[str | Path] | None, outputs: Outputs) -> StagedUpload:
    """Copy an upload (image and caption files, or a single .zip) into a new folder under outputs/uploads.

    Files of a dropped folder may carry their path inside it in their name (`RELATIVE_SEP` between the
    parts, as the app's page sends them), so kohya `N_words` sub-folders are kept with their repeats and
    prompts (those with 0 repeats are left out), and files of other sub-folders are brought to the top
    (renamed when a name is taken there). Files that are neither images nor captions, images that can't
    be decoded or are too large, captions over MAX_CAPTION_BYTES and exact duplicates are left out and
    listed in `skipped`; an upload with no usable image raises `UploadError` and leaves nothing behind, as
    does a full or read-only disk.
    """
    files = [Path(p) for p in paths or [] if p]
    if any(p.name == EMPTY_FOLDER for p in files):
        raise UploadError(
            "The folder you picked has no files the browser could send: drop a folder of images "
            "(with optional .txt captions), or a .zip."
        )
    if not files:
        raise UploadError(
            "Nothing was uploaded: drop a folder of images (with optional .txt captions) or a .zip."
        )
    if len(files) > MAX_FILES:
        raise UploadError(f"The upload has {len(files)} files; at most {MAX_FILES:,} are accepted.")
    zips = [p for p in files if p.suffix.lower() == ".zip"]
    if zips and len(files) > 1:
        raise UploadError("Upload either one .zip or a folder of images, not both at once.")
    with disk_errors(outputs.uploads, "Nothing was kept from this upload."):
        folder = outputs.new_upload_dir(".staging")  # hidden until complete
        try:
            if zips:
                skipped = _unpack_zip(zips[0], folder)
                name = zips[0].stem.split(RELATIVE_SEP)[-1]  # the file the user dropped
            else:
                top, skipped = _copy_files(files, folder)
                name = top or suggest_name(
                    [p.stem.split(RELATIVE_SEP)[-1] for p in files if _is_image(p.name)]
                )
            skipped += _drop_unreadable_images(folder)
            skipped += _drop_duplicates(folder)
            images = len(training_images(folder))
            if not images:
                details = f" Left out: {shown_list(skipped)}." if skipped else ""
                raise UploadError(
                    f"No usable images in the upload (expected {', '.join(IMAGE_EXTENSIONS)}).{details}"
                )
            named = outputs.new_upload_dir(safe_name(name))  # named after the drop, once its name is known
            named.rmdir()
            folder = folder.rename(named)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    return StagedUpload(folder, safe_name(name), images, skipped)


def suggest_name(stems: Sequence[str]) -> str:
    """An adapter name from image names: their common start without a trailing counter ('star_01' -> 'star')."""
    if not stems:
        return "adapter"
    prefix = os.path.commonprefix(list(stems))
    return safe_name(prefix.rstrip("0123456789 _-."), default="adapter")


def training_images(folder: Path) -> list[Path]:
    """The images a training run reads: at the top and in kohya `N_words` sub-folders."""
    found = list_images(folder)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and KOHYA_DIR.match(p.name)):
        found += list_images(sub)
    return found


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _size(limit: int) -> str:
    return f"{limit // 1024**2} MiB" if limit >= 1024**2 else f"{limit // 1024} KiB"


class _Placer:
    """Decides where each uploaded file goes inside the training folder, keeping kohya sub-folders and
    an image with its caption, and renaming a file of another sub-folder whose name is taken."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.skipped: list[str] = []
        self.owners: dict[tuple[Path, str], tuple[str, ...]] = {}  # (target folder, stem) -> source folder
        self.zero: set[str] = set()  # kohya folders with 0 repeats, reported once each

    def target(self, parts: tuple[str, ...], size: int) -> Path | None:
        """Where the file at `parts` (its path inside the upload) of `size` bytes goes, or None (the reason
        in `skipped`) if it is left out."""
        name, where = parts[-1], parts[:-1]
        if any(_JUNK.match(p) for p in parts):
            return None
        kohya = KOHYA_DIR.match(where[0]) if where else None
        if kohya and int(kohya.group(1)) == 0:
            if where[0] not in self.zero:
                self.zero.add(where[0])
                self.skipped.append(f"{shown(where[0])}/: a kohya folder with 0 repeats is never trained on")
            return None
        path = shown("/".join(parts))
        suffix = Path(name).suffix.lower()
        if suffix not in IMAGE_EXTENSIONS and suffix != CAPTION_SUFFIX:
            self.skipped.append(f"{path}: not an image or a .txt caption")
            return None
        limit = MAX_CAPTION_BYTES if suffix == CAPTION_SUFFIX else MAX_IMAGE_BYTES
        if size > limit:
            kind = "a caption" if suffix == CAPTION_SUFFIX else "an image"
            self.skipped.append(
                f"{path}: {size / 1024**2:.1f} MiB is too large for {kind} (at most {_size(limit)})"
            )
            return None
        folder = self.folder / where[0] if kohya else self.folder
        stem = safe_name(Path(name).stem, default="image")
        owner = self.owners.setdefault((folder, stem), where)
        if owner != where:  # another sub-folder has a file of this name: prefix where this one came from
            stem = safe_name("_".join((*where[1 if kohya else 0 :], Path(name).stem)), default="image")
            self.owners.setdefault((folder, stem), where)
        target = folder / (stem + suffix)
        if target.exists():
            self.skipped.append(f"{path}: another file has the same name")
            return None
        folder.mkdir(exist_ok=True)
        return target


def _split_top(all_parts: list[tuple[str, ...]]) -> tuple[str | None, list[tuple[str, ...]]]:
    """The dropped folder's name (when every file lies in one folder) and each file's path inside it."""
    tops = {parts[0] for parts in all_parts if len(parts) > 1}
    if len(tops) == 1 and all(len(parts) > 1 for parts in all_parts):
        return next(iter(tops)), [parts[1:] for parts in all_parts]
    return None, all_parts


def _top_first(pairs: Iterable[tuple[T, tuple[str, ...]]]) -> list[tuple[T, tuple[str, ...]]]:
    """Files at the top of the upload first, so theirs are the names a sub-folder's file must give way to."""
    return sorted(pairs, key=lambda pair: len(pair[1]))


def _copy_files(files: list[Path], folder: Path) -> tuple[str | None, list[str]]:
    top, inside = _split_top([_member_parts(path.name.replace(RELATIVE_SEP, "/")) for path in files])
    placer = _Placer(folder)
    for path, parts in _top_first(zip(files, inside, strict=True)):
        target = placer.target(parts, path.stat().st_size)
        if target is not None:
            shutil.copyfile(path, target)
    return top, placer.skipped


def _unpack_zip(archive: Path, folder: Path) -> list[str]:
    """Unpack a zip: its files at the top or in one folder (what zipping a folder gives), with kohya
    `N_words` sub-folders kept (those with 0 repeats left out).

    Each member is streamed to disk and never read past its declared size, which is checked against the
    limits first."""
    name = shown(archive.name.split(RELATIVE_SEP)[-1])  # the file the user dropped, not the server's path
    _check_zip_directory(archive, name)
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [m for m in zipped.infolist() if not m.is_dir()]
            parts = {m.filename: _member_parts(m.filename) for m in members}
            members = [m for m in members if not any(_JUNK.match(p) for p in parts[m.filename])]
            if len(members) > MAX_FILES or sum(m.file_size for m in members) > MAX_UNPACKED_BYTES:
                raise UploadError(
                    f"{name} is too large to unpack (at most {MAX_FILES:,} files and "
                    f"{MAX_UNPACKED_BYTES // 1024**3} GiB)."
                )
            _, inside = _split_top([parts[m.filename] for m in members])
            placer = _Placer(folder)
            for member, member_parts in _top_first(zip(members, inside, strict=True)):
                target = placer.target(member_parts, member.file_size)
                if target is not None:
                    _stream_member(zipped, member, target)
            return placer.skipped
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError) as error:
        raise UploadError(f"{name} can't be unpacked as a zip file ({error}).") from error


def _stream_member(zipped: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path) -> None:
    """Copy one member to `target` in blocks; zipfile stops at the declared size and checks the CRC."""
    written = 0
    with zipped.open(member) as source, open(target, "wb") as out:
        for block in iter(lambda: source.read(_CHUNK), b""):
            written += len(block)
            if written > member.file_size:  # never trust a member to stop where it says
                raise zipfile.BadZipFile(f"{shown(member.filename)} is longer than its header says")
            out.write(block)


def _check_zip_directory(archive: Path, name: str) -> None:
    """Refuse a zip with too many entries from its end record, before its directory is read into memory
    (`name`: the zip's name as the user knows it)."""
    try:
        with open(archive, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - (65_536 + 22)))
            tail = handle.read()
            at = tail.rfind(b"PK\x05\x06")
            if at < 0 or len(tail) - at < 22:
                return  # not a zip: zipfile says so with its own message
            entries, directory_bytes = struct.unpack("<HI", tail[at + 10 : at + 16])
            if entries == 0xFFFF or directory_bytes == 0xFFFFFFFF:  # Zip64: the real counts are elsewhere
                locator = tail.rfind(b"PK\x06\x07", 0, at)
                if locator >= 0:
                    (offset,) = struct.unpack("<Q", tail[locator + 8 : locator + 16])
                    handle.seek(offset)
                    record = handle.read(56)
                    if record[:4] == b"PK\x06\x06":
                        entries, directory_bytes = struct.unpack("<QQ", record[32:48])
    except (OSError, struct.error) as error:
        raise UploadError(f"{name} can't be read as a zip file ({error}).") from error
    if entries > MAX_ZIP_ENTRIES or directory_bytes > MAX_ZIP_DIRECTORY_BYTES:
        raise UploadError(f"{name} lists {entries:,} entries; at most {MAX_ZIP_ENTRIES:,} are accepted.")


def _member_parts(name: str) -> tuple[str, ...]:
    """A path's parts inside an upload; absolute paths and '..' (which could write outside the folder) are
    refused."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or ":" in path.parts[0]:
        raise UploadError(f"The upload contains an unsafe path: {shown(name)!r}.")
    return path.parts


def _drop_unreadable_images(folder: Path) -> list[str]:
    skipped = []
    for path in training_images(folder):
        try:
            load_image(path)
        except ImageError as error:
            relative = path.relative_to(folder).as_posix()
            if error.__cause__ is not None:  # the decoder's complaint
                cause = str(error.__cause__).replace(str(path), relative)
                reason = f"can't be read as an image ({cause[:120]})"
            else:  # refused from its header: the message says why
                reason = str(error).removeprefix(f"{path}: ").removeprefix(f"{path.name}: ")
                reason = reason.replace(str(path), relative)
            skipped.append(f"{shown(relative)}: {reason}")
            path.unlink()
            path.with_suffix(CAPTION_SUFFIX).unlink(missing_ok=True)
    return skipped


def _drop_duplicates(folder: Path) -> list[str]:
    """Leave out byte-identical copies of an image (they would be trained on twice as often)."""
    skipped, seen = [], {}
    for path in training_images(folder):
        first = seen.setdefault(file_digest(path), path)
        if first != path:
            relative, original = (p.relative_to(folder).as_posix() for p in (path, first))
            skipped.append(f"{shown(relative)}: the same picture as {shown(original)}")
            path.unlink()
            path.with_suffix(CAPTION_SUFFIX).unlink(missing_ok=True)
    return skipped


class UploadLedger:
    """The files this server handed out from its upload route, by client.

    A request may name only files its own client uploaded, so no API call can make the app read a file
    it was not sent (an adapter already in outputs/, a path guessed in the upload cache). Bounded: the
    oldest records are forgotten first.
    """

    def __init__(self, capacity: int = 4 * MAX_FILES) -> None:
        self._paths: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def record(self, owner: str, paths: Iterable[str | Path]) -> None:
        with self._lock:
            for path in paths:
                key = (owner, os.path.realpath(path))
                self._paths[key] = None
                self._paths.move_to_end(key)
            while len(self._paths) > self._capacity:
                self._paths.popitem(last=False)

    def check(self, owner: str, paths: Iterable[str | Path | None]) -> list[Path]:
        """`paths` as Paths if this client uploaded every one; UploadError naming the first that it did not."""
        checked = []
        with self._lock:
            for path in paths:
                if not path:
                    continue
                if (owner, os.path.realpath(path)) not in self._paths:
                    raise UploadError(
                        f"{shown(Path(path).name)} was not uploaded to this server in this session: "
                        "only files you upload here can be used."
                    )
                checked.append(Path(path))
        return checked

    def discard(self, owner: str, paths: Iterable[str | Path]) -> None:
        """Forget files once they were copied where they are used, and delete the cached copies."""
        for path in paths:
            with self._lock:
                known = self._paths.pop((owner, os.path.realpath(path)), "missing") is None
            if known:
                Path(path).unlink(missing_ok=True)


def clean_uploads(
    outputs: Outputs, in_use: Iterable[str | Path] = (), min_age_s: float = UNUSED_UPLOAD_AGE_S
) -> list[Path]:
    """Remove upload folders that no run used, no job in `in_use` waits on, and that are older than
    `min_age_s` (so one just staged for a run about to start stays). Run folders and adapters are never
    touched. Returns what was removed."""
    if not outputs.uploads.is_dir():
        return []
    keep = {os.path.realpath(path) for path in in_use if path}
    for config in outputs.runs.glob("*/config.json"):
        try:
            data_dir = json.loads(config.read_text(encoding="utf-8")).get("data_dir")
        except (OSError, ValueError):
            continue
        if data_dir:
            keep.add(os.path.realpath(data_dir))
    removed = []
    now = time.time()
    for folder in outputs.uploads.iterdir():
        try:
            old = now - folder.lstat().st_mtime > min_age_s
        except OSError:
            continue
        if old and folder.is_dir() and not folder.is_symlink() and os.path.realpath(folder) not in keep:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def clean_upload_cache(outputs: Outputs, min_age_s: float) -> list[Path]:
    """Remove what the web server's upload cache has held for longer than `min_age_s`: copies that a
    server stopped without cleaning up (killed, crashed) left behind. No run reads this cache (uploads are
    copied under uploads/ first), so nothing a run or an adapter needs is touched. Returns what was removed."""
    if not outputs.upload_cache.is_dir():
        return []
    removed = []
    now = time.time()
    for entry in outputs.upload_cache.iterdir():
        try:
            newest = max(path.lstat().st_mtime for path in [entry, *entry.rglob("*")])
        except OSError:
            continue
        if now - newest > min_age_s:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def caption_rows(folder: str | Path | None) -> list[list[str]]:
    """[image file name, caption] for each image of a training folder, for an editable table."""
    if not folder or not Path(folder).is_dir():
        return []
    folder = Path(folder)
    return [
        [path.relative_to(folder).as_posix(), read_caption(path) or ""] for path in training_images(folder)
    ]


def save_captions(folder: str | Path, rows: Sequence[Sequence[str]]) -> int:
    """Write edited captions back as .txt files (an empty caption removes the file); returns how many changed.

    Only names of images already in `folder` are accepted, so a crafted row can't write anywhere else.
    """
    folder = Path(folder)
    images = {path.relative_to(folder).as_posix(): path for path in training_images(folder)}
    changed = 0
    for row in rows:
        if len(row) < 2 or str(row[0]) not in images:
            continue
        image = images[str(row[0])]
        caption = " ".join(str(row[1] or "").split())
        if caption == (read_caption(image) or ""):
            continue
        caption_path = image.with_suffix(CAPTION_SUFFIX)
        if caption:
            atomic_write_text(caption_path, caption)
        else:
            caption_path.unlink(missing_ok=True)
        changed += 1
    return changed


def thumbnails(folder: str | Path | None) -> list[tuple[str, str]]:
    """(image path, caption) pairs for a gallery of the training folder."""
    return [
        (str(Path(folder) / name), caption or "(no caption: the instance prompt is used)")
        for name, caption in caption_rows(folder)
    ]
