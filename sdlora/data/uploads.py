"""Turning an upload (a dropped folder, some files or one .zip) into a training folder.

The browser sends each file on its own, under its bare name, so a dropped folder arrives as a flat list
of paths in Gradio's cache; the CLI hands over a .zip given as its data folder. Either way everything is
copied into one fresh folder under ``outputs/uploads/`` that the trainer then reads like any folder given
on the command line, and whose captions can be edited as a table before training.
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TypeVar

from sdlora.data import IMAGE_EXTENSIONS, ImageError, list_images, load_image, read_caption
from sdlora.data.folder import KOHYA_DIR
from sdlora.errors import SdloraError
from sdlora.files import atomic_write_text, safe_name
from sdlora.outputs import Outputs

CAPTION_SUFFIX = ".txt"
# The app's page names each file of a dropped folder by its path inside it, parts joined by this (a
# division slash: browsers send bare names and Gradio keeps every character but real separators).
RELATIVE_SEP = "\u2215"
EMPTY_FOLDER = "sdlora-empty-folder"  # what the page sends for a picked folder the browser found empty
# A zip is unpacked only if it is modest: this stops a small "zip bomb" from filling the disk.
MAX_UNPACKED_BYTES = 4 * 1024**3
MAX_FILES = 20_000
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


def stage_upload(paths: Sequence[str | Path] | None, outputs: Outputs) -> StagedUpload:
    """Copy an upload (image and caption files, or a single .zip) into a new folder under outputs/uploads.

    Files of a dropped folder may carry their path inside it in their name (`RELATIVE_SEP` between the
    parts, as the app's page sends them), so kohya `N_words` sub-folders are kept with their repeats and
    prompts, and files of other sub-folders are brought to the top (renamed when a name is taken there).
    Files that are neither images nor captions, and images that can't be decoded, are left out and
    listed in `skipped`; an upload with no usable image raises `UploadError` and leaves nothing behind.
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
    zips = [p for p in files if p.suffix.lower() == ".zip"]
    if zips and len(files) > 1:
        raise UploadError("Upload either one .zip or a folder of images, not both at once.")
    folder = outputs.new_upload_dir(".staging")  # hidden until complete
    try:
        if zips:
            skipped = _unpack_zip(zips[0], folder)
            name = zips[0].stem.split(RELATIVE_SEP)[-1]  # the file the user dropped
        else:
            top, skipped = _copy_files(files, folder)
            name = top or suggest_name([p.stem for p in files if _is_image(p.name)])
        skipped += _drop_unreadable_images(folder)
        images = len(training_images(folder))
        if not images:
            details = f" Left out: {'; '.join(skipped)}." if skipped else ""
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


class _Placer:
    """Decides where each uploaded file goes inside the training folder, keeping kohya sub-folders and
    an image with its caption, and renaming a file of another sub-folder whose name is taken."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.skipped: list[str] = []
        self.owners: dict[tuple[Path, str], tuple[str, ...]] = {}  # (target folder, stem) -> source folder

    def target(self, parts: tuple[str, ...]) -> Path | None:
        """Where the file at `parts` (its path inside the upload) goes, or None (the reason in `skipped`)."""
        shown = "/".join(parts)
        name, where = parts[-1], parts[:-1]
        if any(_JUNK.match(p) for p in parts):
            return None
        suffix = Path(name).suffix.lower()
        if suffix not in IMAGE_EXTENSIONS and suffix != CAPTION_SUFFIX:
            self.skipped.append(f"{shown}: not an image or a .txt caption")
            return None
        kohya = bool(where) and KOHYA_DIR.match(where[0]) is not None
        folder = self.folder / where[0] if kohya else self.folder
        stem = safe_name(Path(name).stem, default="image")
        owner = self.owners.setdefault((folder, stem), where)
        if owner != where:  # another sub-folder has a file of this name: prefix where this one came from
            stem = safe_name("_".join((*where[1 if kohya else 0 :], Path(name).stem)), default="image")
            self.owners.setdefault((folder, stem), where)
        target = folder / (stem + suffix)
        if target.exists():
            self.skipped.append(f"{shown}: another file has the same name")
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
    if len(files) > MAX_FILES:
        raise UploadError(f"The upload has {len(files)} files; at most {MAX_FILES} are accepted.")
    top, inside = _split_top([_member_parts(path.name.replace(RELATIVE_SEP, "/")) for path in files])
    placer = _Placer(folder)
    for path, parts in _top_first(zip(files, inside, strict=True)):
        target = placer.target(parts)
        if target is not None:
            shutil.copyfile(path, target)
    return top, placer.skipped


def _unpack_zip(archive: Path, folder: Path) -> list[str]:
    """Unpack a zip: its files at the top or in one folder (what zipping a folder gives), with kohya
    `N_words` sub-folders kept."""
    shown = archive.name.split(RELATIVE_SEP)[-1]
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [m for m in zipped.infolist() if not m.is_dir()]
            parts = {m.filename: _member_parts(m.filename) for m in members}
            members = [m for m in members if not any(_JUNK.match(p) for p in parts[m.filename])]
            if len(members) > MAX_FILES or sum(m.file_size for m in members) > MAX_UNPACKED_BYTES:
                raise UploadError(
                    f"{shown} is too large to unpack (at most {MAX_FILES} files and "
                    f"{MAX_UNPACKED_BYTES // 1024**3} GiB)."
                )
            _, inside = _split_top([parts[m.filename] for m in members])
            placer = _Placer(folder)
            for member, member_parts in _top_first(zip(members, inside, strict=True)):
                target = placer.target(member_parts)
                if target is not None:
                    target.write_bytes(zipped.read(member))
            return placer.skipped
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError) as error:
        raise UploadError(f"{shown} can't be unpacked as a zip file ({error}).") from error


def _member_parts(name: str) -> tuple[str, ...]:
    """A path's parts inside an upload; absolute paths and '..' (which could write outside the folder) are
    refused."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or ":" in path.parts[0]:
        raise UploadError(f"The upload contains an unsafe path: {name}.")
    return path.parts


def _drop_unreadable_images(folder: Path) -> list[str]:
    skipped = []
    for path in training_images(folder):
        try:
            load_image(path)
        except ImageError as error:
            cause = error.__cause__ or error
            reason = str(cause).replace(str(path), path.name)
            skipped.append(f"{path.relative_to(folder).as_posix()}: can't be read as an image ({reason})")
            path.unlink()
    return skipped


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
