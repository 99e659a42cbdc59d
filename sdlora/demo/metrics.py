"""Small numpy measures that say what a demo image shows, so tests can check generations automatically.

An image of the demo world is one flat-coloured shape on a plain background. We take the background colour
from the corners, estimate per-pixel ink coverage (``alpha``) by projecting each pixel onto the line from
background to ink colour (this undoes antialiasing, so areas are sub-pixel accurate), and derive:

* the ink colour and its nearest named colour from :data:`sdlora.demo.shapes.COLOURS`;
* the fill ratio, shape area / bounding-box area: in theory 0.785 for a circle, 1.0 for a square, 0.5 for a
  triangle or diamond and 0.56 for a cross (measured on 32 px renderings: 0.78, 1.0, 0.54, 0.54, 0.57);
* compactness, 4 pi area / perimeter^2: in theory 1.0 for a circle, 0.785 for a square, 0.6 for the
  triangle (measured: 0.97, 0.83, 0.65; a cross 0.52, a ring 0.28).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdlora.demo.shapes import COLOURS

# Reference fill ratios of the shapes a test can tell apart by fill alone.
FILL_RATIOS: dict[str, float] = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}

# A pixel this far (RGB distance, 0-441) from the background counts as possible ink when looking for it.
INK_DISTANCE = 60.0
# Coverage below this is treated as noise; otherwise faint speckle inflates bounding boxes and perimeters.
NOISE_FLOOR = 0.15


def as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """RGB image as a float array (H, W, 3) in 0-255."""
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)


def background_colour(image: Image.Image | np.ndarray) -> np.ndarray:
    """Median of the four 2x2 corner patches: shapes never touch all corners, so this is the background."""
    pixels = as_array(image)
    corners = np.concatenate(
        [pixels[:2, :2], pixels[:2, -2:], pixels[-2:, :2], pixels[-2:, -2:]], axis=0
    ).reshape(-1, 3)
    return np.median(corners, axis=0)


def ink_colour(image: Image.Image | np.ndarray) -> np.ndarray | None:
    """Typical colour of the most clearly non-background pixels, or None if nothing stands out."""
    pixels = as_array(image)
    distance = np.linalg.norm(pixels - background_colour(pixels), axis=-1)
    if distance.max() < INK_DISTANCE:
        return None
    solid = distance >= 0.8 * distance.max()
    return np.median(pixels[solid], axis=0)


def coverage(image: Image.Image | np.ndarray) -> np.ndarray:
    """Per-pixel ink coverage in [0, 1]: where each pixel sits between background (0) and ink colour (1).

    Values under :data:`NOISE_FLOOR` are set to 0 so generation noise does not count as ink.
    """
    pixels = as_array(image)
    background = background_colour(pixels)
    ink = ink_colour(pixels)
    if ink is None:
        return np.zeros(pixels.shape[:2])
    direction = ink - background
    alpha = (pixels - background) @ direction / (direction @ direction)
    alpha = np.clip(alpha, 0.0, 1.0)
    return np.where(alpha < NOISE_FLOOR, 0.0, alpha)


def nearest_colour_name(rgb: np.ndarray) -> str:
    """Name of the palette colour closest to ``rgb`` (Euclidean in RGB; the palette is well separated)."""
    return min(COLOURS, key=lambda name: float(np.linalg.norm(np.asarray(COLOURS[name]) - rgb)))


def dominant_hue(image: Image.Image | np.ndarray) -> float | None:
    """Hue (degrees, 0-360) of the ink colour, or None for no ink."""
    ink = ink_colour(image)
    if ink is None:
        return None
    hue, _, _ = colorsys.rgb_to_hsv(*(ink / 255))
    return hue * 360


def fill_ratio(alpha: np.ndarray) -> float:
    """Ink area over bounding-box area, with sub-pixel extents from the per-row / per-column coverage."""
    width = alpha.max(axis=0).sum()
    height = alpha.max(axis=1).sum()
    return float(alpha.sum() / (width * height)) if width and height else 0.0


def compactness(alpha: np.ndarray) -> float:
    """Isoperimetric quotient 4 pi A / P^2, with the perimeter as the total variation of the coverage."""
    padded = np.pad(alpha, 1)
    gradient_y, gradient_x = np.gradient(padded)
    perimeter = np.hypot(gradient_x, gradient_y).sum()
    return float(4 * math.pi * alpha.sum() / perimeter**2) if perimeter else 0.0


def closest_shape(ratio: float, candidates: dict[str, float] = FILL_RATIOS) -> str:
    """The candidate shape whose reference fill ratio is nearest to ``ratio``."""
    return min(candidates, key=lambda name: abs(candidates[name] - ratio))


@dataclass(frozen=True)
class Reading:
    """What one image shows, as measured."""

    colour: str | None
    hue: float | None
    background: tuple[int, int, int]
    area_fraction: float
    fill_ratio: float
    compactness: float

    @property
    def shape(self) -> str:
        return closest_shape(self.fill_ratio)


def read_image(image: Image.Image | np.ndarray) -> Reading:
    """Measure colour, background, size and shape statistics of one demo-style image."""
    pixels = as_array(image)
    ink = ink_colour(pixels)
    alpha = coverage(pixels)
    return Reading(
        colour=None if ink is None else nearest_colour_name(ink),
        hue=dominant_hue(pixels),
        background=tuple(int(v) for v in background_colour(pixels)),
        area_fraction=float(alpha.mean()),
        fill_ratio=fill_ratio(alpha),
        compactness=compactness(alpha),
    )
