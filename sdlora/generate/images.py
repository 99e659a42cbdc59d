"""Saving generated images with their parameters, and laying them out side by side."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from sdlora.files import atomic_write_bytes

MIN_SHOWN_SIDE = 128


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically with its generation parameters in a `parameters` text chunk (as A1111 does)."""
    info = PngInfo()
    for key, value in image.info.items():
        if isinstance(value, str):
            info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return atomic_write_bytes(path, buffer.getvalue())


def image_grid(labeled: list[tuple[str, Image.Image]], columns: int | None = None) -> Image.Image:
    """Images in a grid with a label above each; tiny images are enlarged (nearest) to stay visible."""
    columns = columns or len(labeled)
    first = labeled[0][1]
    scale = max(1, MIN_SHOWN_SIDE // min(first.size))
    cell_w, cell_h = first.width * scale, first.height * scale
    font = ImageFont.load_default()
    label_h = 16
    rows = (len(labeled) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell_w, rows * (cell_h + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (label, image) in enumerate(labeled):
        x, y = (index % columns) * cell_w, (index // columns) * (cell_h + label_h)
        draw.text((x + 3, y + 2), label, fill="black", font=font)
        grid.paste(image.resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y + label_h))
    grid.info["parameters"] = labeled_parameters(labeled)
    return grid


def labeled_parameters(labeled: Sequence[tuple[str, Image.Image]]) -> str:
    """The generation parameters of several images in one text, each under its label."""
    return "\n\n".join(f"[{label}]\n{image.info.get('parameters', '')}" for label, image in labeled)


# AUTOMATIC1111's "key: value, key: value" line (values may be quoted), the last line of its text.
_LABEL = re.compile(r"\[[^\]\n]*\]\n")  # "[label]" opening each image's text in labeled_parameters
_PARAMETER = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def read_parameters(image: Image.Image | str | Path) -> dict[str, str]:
    """The generation parameters a PNG carries (A1111's `parameters` text, as sdlora, A1111, Forge and
    ComfyUI's A1111-format savers write it): 'Prompt', 'Negative prompt', then each 'Key: value'."""
    return parse_parameters(parameters_text(image))


def parameters_text(image: Image.Image | str | Path) -> str:
    """The `parameters` text chunk of a PNG as written ('' when it has none, or is no image PIL reads)."""
    if not isinstance(image, Image.Image):
        try:
            with Image.open(image) as opened:
                return parameters_text(opened)
        except (OSError, ValueError):  # PIL.UnidentifiedImageError is an OSError
            return ""
    text = image.info.get("parameters", "")
    return text if isinstance(text, str) else ""


def parse_parameters(text: str) -> dict[str, str]:
    """A1111's text as fields; of several labelled images' texts (a grid's), the first image's."""
    if _LABEL.match(text) and "\n\n[" in text:
        text = text.split("\n\n[", 1)[0].split("]\n", 1)[1]
    lines = text.strip().split("\n")
    fields: dict[str, str] = {}
    if lines and _PARAMETER.findall(lines[-1]) and "Steps:" in lines[-1]:
        fields.update({key.strip(): value.strip().strip('"') for key, value in _PARAMETER.findall(lines[-1])})
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line.removeprefix("Negative prompt:").strip()
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt).strip(), "Negative prompt": "\n".join(negative).strip(), **fields}


def image_history(folder: str | Path, limit: int = 200) -> list[tuple[Path, dict[str, str]]]:
    """Generated images in `folder` (outputs/images), newest first, with their parameters."""
    folder = Path(folder)
    paths = (
        sorted(folder.glob("*.png"), key=lambda p: p.stat().st_mtime, reverse=True)[:limit]
        if folder.is_dir()
        else []
    )
    return [(path, read_parameters(path)) for path in paths]
