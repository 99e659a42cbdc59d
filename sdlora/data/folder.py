"""Finding training images and their captions in a folder.

Supports kohya's convention: sub-folders named `N_words` (e.g. `10_sks dog`) repeat their images
N times per epoch and use `words` as the prompt for images without a caption.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from sdlora.data.images import ImageError, load_image
from sdlora.errors import SdloraError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# A caption is text for a 77-token text encoder: kilobytes, never megabytes. Longer files are cut.
MAX_CAPTION_BYTES = 16 * 1024
KOHYA_DIR = re.compile(r"^(\d+)_(.+)$")


class DataError(SdloraError, ValueError):
    """The training data can't be used; the message says what to fix."""


@dataclass(frozen=True)
class Item:
    """One training image: where it is, what it shows, and how often it is seen per epoch."""

    path: Path
    caption: str
    repeats: int = 1


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted for a stable order."""
    # Not `is_file()`: a dangling link or unreadable entry must reach the loader and be reported, not vanish.
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())


def read_caption(image_path: Path, extension: str = ".txt") -> str | None:
    """The same-name caption (.txt, or `extension`), decoded whatever its encoding (BOMs, UTF-16, Latin-1);
    only its first MAX_CAPTION_BYTES are read, so a huge file can't fill memory."""
    caption_path = image_path.with_suffix(extension)
    if not caption_path.is_file():
        return None
    with open(caption_path, "rb") as handle:
        raw = handle.read(MAX_CAPTION_BYTES + 1)
    if len(raw) > MAX_CAPTION_BYTES:
        log.warning(
            "%s is longer than %d KiB: only its start is used.", caption_path, MAX_CAPTION_BYTES // 1024
        )
        raw = raw[: MAX_CAPTION_BYTES - (MAX_CAPTION_BYTES % 2)]
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = raw.decode("utf-16")
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
    text = " ".join(text.replace("\x00", "").split())
    return text or None


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks: byte-identical images have the same one."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def scan_folder(
    root: str | Path, prompt: str | None, *, check_images: bool = True, caption_extension: str = ".txt"
) -> list[Item]:
    """Every usable image under `root` with its caption and repeat count.

    Images that can't be decoded are skipped with a warning naming the file; a folder with no
    usable image at all raises `DataError` (before any model is loaded).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder.")
    groups: list[tuple[Path, int, str | None]] = [(root, 1, prompt)]
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        match = KOHYA_DIR.match(sub.name)
        if match and int(match.group(1)) == 0:
            log.warning("Leaving out %s: a kohya folder with 0 repeats is never trained on.", sub.name)
        elif match:
            groups.append((sub, int(match.group(1)), match.group(2).strip()))
    items: list[Item] = []
    seen: dict[str, Path] = {}
    for folder, repeats, default_prompt in groups:
        for path in list_images(folder):
            if check_images:
                try:
                    load_image(path)
                except ImageError as error:
                    log.warning("Skipping %s", error)
                    continue
                first = seen.setdefault(file_digest(path), path)
                if first != path:
                    log.warning(
                        "%s is the same picture as %s: it is trained on as two images.",
                        path.relative_to(root),
                        first.relative_to(root),
                    )
            caption = read_caption(path, caption_extension) or default_prompt or prompt
            if not caption:
                raise DataError(
                    f"{path} has no caption ({caption_extension}) and no --prompt was given to use instead."
                )
            items.append(Item(path, caption, repeats))
    if not items:
        raise DataError(
            f"No usable images in {root}: expected {', '.join(IMAGE_EXTENSIONS)} files "
            "(directly inside, or in kohya-style 'N_words' sub-folders)."
        )
    return items


def missing_captions(items: list[Item], extension: str = ".txt") -> list[str]:
    """A warning for each folder whose images have no `extension` caption at all: they all train on the
    folder's prompt, which is what users whose captions are .caption (or .txt) files did not mean."""
    warnings = []
    folders: dict[Path, list[Path]] = {}
    for item in items:
        folders.setdefault(item.path.parent, []).append(item.path)
    for folder, images in folders.items():
        if any(image.with_suffix(extension).is_file() for image in images):
            continue
        others = sorted(
            {
                other.suffix
                for image in images
                for other in folder.glob(f"{glob.escape(image.stem)}.*")
                if other.suffix.lower() not in (*IMAGE_EXTENSIONS, extension) and other.is_file()
            }
        )
        hint = (
            f" Found {', '.join(others)} files with the images' names: give --caption-extension {others[0]}."
            if others
            else ""
        )
        warnings.append(
            f"No {extension} caption for any of the {len(images)} images in {folder}: every one trains on the "
            f"prompt alone.{hint}"
        )
    return warnings
