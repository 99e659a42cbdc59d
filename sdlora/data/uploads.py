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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from sdlora.data import IMAGE_EXTENSIONS, ImageError, list_images, load_image, read_caption
from sdlora.errors import SdloraError
from sdlora.files import atomic_write_text, safe_name
from sdlora.outputs import Outputs

CAPTION_SUFFIX = ".txt"
# A zip is unpacked only if it is modest: this stops a small "zip bomb" from filling the disk.
MAX_UNPACKED_BYTES = 4 * 1024**3
MAX_FILES = 20_000
# Files that operating systems leave in folders and zips; silently left out rather than reported.
_JUNK = re.compile(r"^(\.|__MACOSX$|Thumbs\.db$|desktop\.ini$)", re.IGNORECASE)


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

    Files that are neither images nor captions, and images that can't be decoded, are left out and
    listed in `skipped`; an upload with no usable image raises `UploadError` and leaves nothing behind.
    """
    files = [Path(p) for p in paths or [] if p]
    if not files:
        raise UploadError(
            "Nothing was uploaded: drop a folder of images (with optional .txt captions) or a .zip."
        )
    zips = [p for p in files if p.suffix.lower() == ".zip"]
    if zips and len(files) > 1:
        raise UploadError("Upload either one .zip or a folder of images, not both at once.")
    name = zips[0].stem if zips else suggest_name([p.stem for p in files if _is_image(p.name)])
    folder = outputs.new_upload_dir(safe_name(name))
    try:
        skipped = _unpack_zip(zips[0], folder) if zips else _copy_files(files, folder)
        skipped += _drop_unreadable_images(folder)
        images = len(list_images(folder))
        if not images:
            details = f" Left out: {'; '.join(skipped)}." if skipped else ""
            raise UploadError(
                f"No usable images in the upload (expected {', '.join(IMAGE_EXTENSIONS)}).{details}"
            )
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


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _target_name(name: str, folder: Path, skipped: list[str]) -> Path | None:
    """Where an uploaded file goes, or None (with the reason in `skipped`) if it is left out."""
    if _JUNK.match(name):
        return None
    suffix = Path(name).suffix.lower()
    if suffix not in IMAGE_EXTENSIONS and suffix != CAPTION_SUFFIX:
        skipped.append(f"{name}: not an image or a .txt caption")
        return None
    target = folder / (safe_name(Path(name).stem, default="image") + suffix)
    if target.exists():
        skipped.append(f"{name}: another file has the same name")
        return None
    return target


def _copy_files(files: list[Path], folder: Path) -> list[str]:
    skipped: list[str] = []
    if len(files) > MAX_FILES:
        raise UploadError(f"The upload has {len(files)} files; at most {MAX_FILES} are accepted.")
    for path in files:
        target = _target_name(path.name, folder, skipped)
        if target is not None:
            shutil.copyfile(path, target)
    return skipped


def _unpack_zip(archive: Path, folder: Path) -> list[str]:
    """Unpack a zip whose files lie at its top or in one folder (what zipping a folder gives)."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [m for m in zipped.infolist() if not m.is_dir()]
            parts = {m.filename: _member_parts(m.filename) for m in members}
            members = [m for m in members if not any(_JUNK.match(p) for p in parts[m.filename])]
            if len(members) > MAX_FILES or sum(m.file_size for m in members) > MAX_UNPACKED_BYTES:
                raise UploadError(
                    f"{archive.name} is too large to unpack (at most {MAX_FILES} files and "
                    f"{MAX_UNPACKED_BYTES // 1024**3} GiB)."
                )
            tops = {parts[m.filename][0] for m in members if len(parts[m.filename]) > 1}
            strip = 1 if len(tops) == 1 and all(len(parts[m.filename]) > 1 for m in members) else 0
            nested = [m.filename for m in members if len(parts[m.filename]) - strip > 1]
            if nested:
                raise UploadError(
                    f"{archive.name} has folders inside (e.g. '{nested[0]}'): put the images and captions "
                    "directly in the zip, or in a single folder inside it."
                )
            skipped: list[str] = []
            for member in members:
                target = _target_name(parts[member.filename][-1], folder, skipped)
                if target is not None:
                    target.write_bytes(zipped.read(member))
            return skipped
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError) as error:
        raise UploadError(f"{archive.name} can't be unpacked as a zip file ({error}).") from error


def _member_parts(name: str) -> tuple[str, ...]:
    """A zip member's path parts; absolute paths and '..' (which could write outside the folder) are refused."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or ":" in path.parts[0]:
        raise UploadError(f"The zip contains an unsafe path: {name!r}.")
    return path.parts


def _drop_unreadable_images(folder: Path) -> list[str]:
    skipped = []
    for path in list_images(folder):
        try:
            load_image(path)
        except ImageError as error:
            skipped.append(f"{path.name}: can't be read as an image ({str(error.__cause__ or error)[:80]})")
            path.unlink()
    return skipped


def caption_rows(folder: str | Path | None) -> list[list[str]]:
    """[image file name, caption] for each image of a training folder, for an editable table."""
    if not folder or not Path(folder).is_dir():
        return []
    return [[path.name, read_caption(path) or ""] for path in list_images(Path(folder))]


def save_captions(folder: str | Path, rows: Sequence[Sequence[str]]) -> int:
    """Write edited captions back as .txt files (an empty caption removes the file); returns how many changed.

    Only names of images already in `folder` are accepted, so a crafted row can't write anywhere else.
    """
    folder = Path(folder)
    images = {path.name: path for path in list_images(folder)}
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
