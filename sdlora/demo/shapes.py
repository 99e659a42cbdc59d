"""Procedural coloured-shape images with captions: the world the demo model knows.

Everything is drawn with PIL at ``supersample`` times the output size and box-downsampled, so edges are
antialiased like a real (if very simple) photo. All randomness goes through a seeded ``random.Random`` so
a given seed always yields the same dataset, which keeps the demo model build reproducible.

The base model is trained only on :data:`BASE_SHAPES` drawn ``"filled"`` (:func:`make_dataset`), mostly
on light backgrounds and on a few dark ones that its captions always name. :data:`NEW_SUBJECT_SHAPES`
(star, ring) and the ``"outlined"`` style are held back from it so that LoRA examples
can teach something it has genuinely never seen; only the VAE sees them (:func:`vae_variety`), so that
what a LoRA teaches can be encoded and drawn at all.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

NATIVE_RESOLUTION = 32
SUPERSAMPLE = 4

BASE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
NEW_SUBJECT_SHAPES: tuple[str, ...] = ("star", "ring")
ALL_SHAPES: tuple[str, ...] = BASE_SHAPES + NEW_SUBJECT_SHAPES

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (240, 205, 20),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 180),
    "black": (25, 25, 25),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light gray": (215, 215, 215),
    "light yellow": (250, 245, 205),
    "light blue": (210, 230, 250),
}
# In the base data only when the caption names them (see BASE_BACKGROUND_WEIGHTS).
DARK_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "navy": (28, 32, 72),
    "dark gray": (52, 52, 58),
}
BACKGROUNDS.update(DARK_BACKGROUNDS)
# White dominates so that "on a white background" is the well-trodden default prompt.
BACKGROUND_WEIGHTS: dict[str, float] = {
    "white": 0.7,
    "light gray": 0.1,
    "light yellow": 0.1,
    "light blue": 0.1,
}
# The base model's data: the same, plus dark backgrounds in one image of four, always named in the
# caption. The base can then draw "on a navy background", and a plain "a red circle" still means a light
# one, so a dark-background style LoRA only has to make the dark one the default.
BASE_BACKGROUND_WEIGHTS: dict[str, float] = {
    **{name: weight * 0.75 for name, weight in BACKGROUND_WEIGHTS.items()},
    **dict.fromkeys(DARK_BACKGROUNDS, 0.125),
}

# No striped style: 6 px stripes don't survive the 32 px VAE, and a decoder that had learned them
# painted faint stripes inside plain fills.
STYLES: tuple[str, ...] = ("filled", "outlined")
GENERIC_NOUN = "shape"

# Geometry in native pixels; scaled by the supersampling factor when drawing.
OUTLINE_WIDTH = 2.5

SMALL_SIZE, LARGE_SIZE = 0.45, 0.65
SIZE_RANGE = (0.35, 0.75)
COLOUR_JITTER = 10


@dataclass(frozen=True)
class ShapeSpec:
    """Everything needed to draw one image; ``size`` and ``centre`` are fractions of the image side."""

    shape: str
    colour: str | tuple[int, int, int] = "red"
    size: float = 0.6
    centre: tuple[float, float] = (0.5, 0.5)
    background: str = "white"
    style: str = "filled"
    tint: tuple[int, int, int] = (0, 0, 0)  # small RGB offset so one colour name covers nearby shades

    def caption(self, *, size_word: bool = False, short: bool = False, generic: bool = False) -> str:
        """Caption in the dataset's template, e.g. ``"a red circle on a white background"``.

        ``generic`` names the shape just "shape", which teaches the base model a class word for any shape
        (DreamBooth-style prior preservation can then use a prompt like "a purple shape").
        """
        colour = self.colour if isinstance(self.colour, str) else "coloured"
        adjective = f"{size_label(self.size)} " if size_word and size_label(self.size) else ""
        first = f"{adjective}{colour} {GENERIC_NOUN if generic else self.shape}"
        text = f"{'an' if first[0] in 'aeiou' else 'a'} {first}"
        if not short:
            text += f" on a {self.background} background"
        if self.style != "filled":
            text += f", {self.style} style"
        return text


def size_label(size: float) -> str:
    """The size word a caption may carry: "small", "large" or "" for middling sizes."""
    if size < SMALL_SIZE:
        return "small"
    if size > LARGE_SIZE:
        return "large"
    return ""


def caption_words() -> list[str]:
    """Every word that can appear in a generated caption (the tokenizer gives each its own token)."""
    words = {
        "a",
        "an",
        "on",
        "background",
        "style",
        "small",
        "large",
        GENERIC_NOUN,
        *ALL_SHAPES,
        *STYLES,
        *COLOURS,
    }
    for name in BACKGROUNDS:
        words.update(name.split())
    return sorted(words)


def _rgb(colour: str | tuple[int, int, int], table: dict[str, tuple[int, int, int]]) -> tuple[int, int, int]:
    return table[colour] if isinstance(colour, str) else tuple(colour)


def _polygon(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    """Vertices of the polygonal shapes, centred on (cx, cy) with a bounding box of side ``2 * half``."""
    if shape == "square":
        return [
            (cx - half, cy - half),
            (cx + half, cy - half),
            (cx + half, cy + half),
            (cx - half, cy + half),
        ]
    if shape == "triangle":
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "diamond":
        return [(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)]
    if shape == "cross":
        arm = half / 3
        return [
            (cx - arm, cy - half), (cx + arm, cy - half), (cx + arm, cy - arm), (cx + half, cy - arm),
            (cx + half, cy + arm), (cx + arm, cy + arm), (cx + arm, cy + half), (cx - arm, cy + half),
            (cx - arm, cy + arm), (cx - half, cy + arm), (cx - half, cy - arm), (cx - arm, cy - arm),
        ]  # fmt: skip
    if shape == "star":
        # Five points, the top one pointing up; the inner radius makes it clearly spiky at 32 px.
        points = []
        for k in range(10):
            radius = half if k % 2 == 0 else half * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}; expected one of {ALL_SHAPES}")


def shape_mask(shape: str, side: int, centre: tuple[float, float], size: float) -> Image.Image:
    """Binary ("L") silhouette of ``shape`` on a ``side`` x ``side`` canvas."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, half = centre[0] * side, centre[1] * side, size * side / 2
    if shape in ("circle", "ring"):
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=255)
        if shape == "ring":
            hole = half * 0.55
            draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, half), fill=255)
    return mask


def _erode(mask: Image.Image, width: int) -> Image.Image:
    return mask.filter(ImageFilter.MinFilter(2 * width + 1)) if width > 0 else mask


def styled_mask(mask: Image.Image, style: str, scale: int) -> Image.Image:
    """Turn a filled silhouette into the ink mask of ``style`` (the outline: a ring inside its edge)."""
    if style == "filled":
        return mask
    if style == "outlined":
        return ImageChops.subtract(mask, _erode(mask, round(OUTLINE_WIDTH * scale)))
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


def render(
    spec: ShapeSpec, *, resolution: int = NATIVE_RESOLUTION, supersample: int = SUPERSAMPLE
) -> Image.Image:
    """Draw one RGB image of ``spec`` (antialiased by drawing at ``supersample``x and box-downsampling)."""
    side = resolution * supersample
    scale = side // NATIVE_RESOLUTION or 1
    ink = styled_mask(shape_mask(spec.shape, side, spec.centre, spec.size), spec.style, scale)
    background = Image.new("RGB", (side, side), _rgb(spec.background, BACKGROUNDS))
    ink_colour = tuple(
        min(255, max(0, c + t)) for c, t in zip(_rgb(spec.colour, COLOURS), spec.tint, strict=True)
    )
    foreground = Image.new("RGB", (side, side), ink_colour)
    return Image.composite(foreground, background, ink).reduce(supersample)


def random_spec(
    rng: random.Random,
    *,
    shapes: Sequence[str] = BASE_SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    backgrounds: dict[str, float] = BACKGROUND_WEIGHTS,
    style: str = "filled",
    size_range: tuple[float, float] = SIZE_RANGE,
) -> ShapeSpec:
    """A random shape that fits inside the frame with at least one pixel of margin."""
    size = rng.uniform(*size_range)
    margin = size / 2 + 1.5 / NATIVE_RESOLUTION
    return ShapeSpec(
        shape=rng.choice(list(shapes)),
        colour=rng.choice(list(colours)),
        size=size,
        centre=(rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)),
        background=rng.choices(list(backgrounds), weights=list(backgrounds.values()))[0],
        style=style,
        tint=tuple(rng.randint(-COLOUR_JITTER, COLOUR_JITTER) for _ in range(3)),
    )


def random_caption(rng: random.Random, spec: ShapeSpec) -> str:
    """Caption for ``spec``: mostly the full template, sometimes short, generic or with a size word.

    The short form ("a red circle") lets users leave out a light background (a dark one is always
    named); size words appear only for clearly small or large shapes so they stay truthful; one caption
    in ten says "shape" instead of the shape's name.
    """
    size_word, short, generic = rng.random() < 0.5, rng.random() < 0.2, rng.random() < 0.1
    short = short and spec.background not in DARK_BACKGROUNDS
    return spec.caption(size_word=size_word, short=short, generic=generic)


def vae_variety(count: int, *, seed: int = 0) -> np.ndarray:
    """Images of every shape, style and background, held-back ones included, for the VAE alone.

    A LoRA can only teach the U-Net to ask for what the VAE can draw: a VAE that never saw an outline
    or a dark background decodes them as smudges of the wrong colour.
    """
    rng = random.Random(seed)
    backgrounds = dict.fromkeys(BACKGROUNDS, 1.0)
    images = np.empty((count, NATIVE_RESOLUTION, NATIVE_RESOLUTION, 3), dtype=np.uint8)
    for index in range(count):
        style = rng.choice(STYLES)
        images[index] = np.asarray(
            render(random_spec(rng, shapes=ALL_SHAPES, backgrounds=backgrounds, style=style))
        )
    return images


def make_dataset(count: int, *, seed: int = 0, **spec_options: object) -> tuple[np.ndarray, list[str]]:
    """``count`` random images of the base model's data as a uint8 array (N, H, W, 3) with their captions;
    same seed, same data."""
    spec_options.setdefault("backgrounds", BASE_BACKGROUND_WEIGHTS)
    rng = random.Random(seed)
    images = np.empty((count, NATIVE_RESOLUTION, NATIVE_RESOLUTION, 3), dtype=np.uint8)
    captions = []
    for index in range(count):
        spec = random_spec(rng, **spec_options)
        images[index] = np.asarray(render(spec))
        captions.append(random_caption(rng, spec))
    return images, captions
