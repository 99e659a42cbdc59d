"""Opening user images safely and fitting them to a bucket."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from sdlora.data.buckets import Bucket
from sdlora.errors import SdloraError

# Refuse decompression bombs outright rather than only warning (PIL's default warns at ~89 Mpx): a 64 Mpx
# photo already needs ~200 MB decoded. Both limits are checked from the header, before any pixel is decoded.
MAX_PIXELS = 64_000_000
# A strip much longer than wide, once scaled to cover a training bucket, becomes enormous (1 x 1,000,000 px
# needs gigabytes); panoramas stay well within 10:1.
MAX_ASPECT = 10.0


class ImageError(SdloraError, ValueError):
    """An image file can't be used; the message names the file and the reason."""


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB: EXIF-rotated, transparency composited on white, first frame of animations."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                check_size(path, image.width, image.height)
                image.seek(0)
                image.load()
                image = ImageOps.exif_transpose(image)
                return _to_rgb(image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"{path}: refused as a possible decompression bomb ({error}).") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageError(f"{path}: can't be read as an image ({error}).") from error


def check_size(path: str | Path, width: int, height: int) -> None:
    """Refuse, naming the file, an image whose size would need far more memory than a normal photo."""
    if width < 1 or height < 1:
        raise ImageError(f"{Path(path).name}: {width}x{height} has no pixels.")
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{Path(path).name}: {width}x{height} is too large to train on "
            f"(at most {MAX_PIXELS // 1_000_000} million pixels)."
        )
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ImageError(
            f"{Path(path).name}: {width}x{height} is too long and thin to train on "
            f"(at most {MAX_ASPECT:g}:1)."
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything to white.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def bucket_fit(size: tuple[int, int], bucket: Bucket) -> tuple[tuple[int, int], tuple[int, int]]:
    """For an image of `size` (w, h): the size it is resized to so it covers the bucket, and the crop's
    top-left corner (top, left) in that resized image. SDXL is conditioned on both."""
    scale = max(bucket.width / size[0], bucket.height / size[1])
    resized = (max(bucket.width, round(size[0] * scale)), max(bucket.height, round(size[1] * scale)))
    return resized, ((resized[1] - bucket.height) // 2, (resized[0] - bucket.width) // 2)


def fit_to_bucket(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Resize so the image covers the bucket, then crop the overflow evenly from both sides.

    The bucket was chosen for its aspect ratio, so the crop is small, unlike a blind centre crop to a square.
    """
    resized, (top, left) = bucket_fit(image.size, bucket)
    return image.resize(resized, Image.Resampling.LANCZOS).crop(
        (left, top, left + bucket.width, top + bucket.height)
    )
