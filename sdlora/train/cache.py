"""What the frozen parts compute, computed once: image latents, caption embeddings, and the batches of them.

The VAE (and, unless it trains, the text encoder) gives the same answer every step, so each image is
encoded once before the loop and the loop only draws from the latent distribution.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from sdlora.data import Bucket, Item, assign_bucket, bucket_batches, bucket_fit, fit_to_bucket, load_image
from sdlora.train.conditioning import Conditioning, SizeInfo, TextConditioner

Batch = tuple[list["Example"], list["Example"]]  # (instance examples, class examples)


@dataclass
class Example:
    """One image as the frozen VAE sees it: its latent distribution (and its mirror's), bucket, caption."""

    mean: torch.Tensor
    std: torch.Tensor
    flipped: tuple[torch.Tensor, torch.Tensor] | None
    size: SizeInfo
    caption: str
    repeats: int

    @property
    def bucket(self) -> Bucket:
        return self.size.bucket


@torch.no_grad()
def encode_images(
    vae: torch.nn.Module, items: list[Item], buckets: list[Bucket], flip: bool, device: torch.device
) -> list[Example]:
    """Each image fitted to its bucket and encoded once; the mirror image too when flips are on."""
    examples = []
    for item in tqdm(items, desc="caching latents", leave=False, disable=len(items) < 8):
        image = load_image(item.path)
        bucket = assign_bucket(image.width, image.height, buckets)
        pixels = _to_tensor(fit_to_bucket(image, bucket)).to(device)
        batch = torch.stack([pixels, pixels.flip(-1)]) if flip else pixels[None]
        dist = vae.encode(batch).latent_dist
        mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
        size = SizeInfo((image.height, image.width), bucket_fit(image.size, bucket)[1], bucket)
        examples.append(
            Example(mean[0], std[0], (mean[1], std[1]) if flip else None, size, item.caption, item.repeats)
        )
    return examples


@torch.no_grad()
def encode_captions(
    conditioner: TextConditioner, examples: list[Example], device: torch.device
) -> dict[str, Conditioning]:
    """Every distinct caption's conditioning, for runs where the text encoder stays frozen."""
    captions = sorted({e.caption for e in examples})
    encoded = conditioner.encode(captions, device)
    return {caption: encoded[i] for i, caption in enumerate(captions)}


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def training_batches(
    examples: list[Example], class_examples: list[Example], batch_size: int, seed: int
) -> Iterator[Batch]:
    """Endless (instance examples, class examples) pairs: one bucket per batch, one class image per instance."""
    instance_order = bucket_batches(
        [e.bucket for e in examples], [e.repeats for e in examples], batch_size, seed
    )
    class_order = (
        bucket_batches([e.bucket for e in class_examples], [1] * len(class_examples), 1, seed + 1)
        if class_examples
        else None
    )
    for indices in instance_order:
        instance = [examples[i] for i in indices]
        prior = [class_examples[next(class_order)[0]] for _ in indices] if class_order else []
        yield instance, prior
