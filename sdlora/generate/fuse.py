"""Folding adapters into a base for good: a full diffusers pipeline with the LoRAs baked into its weights.

It lives with generation, not with the adapter files, because it needs a loaded base; `sdlora.adapters`
stays below `sdlora.generate` and never imports it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdlora.files import atomic_replace_dir
from sdlora.generate.generator import Generator


def fuse_into_base(base: str | None, adapters: list[tuple[str | Path, float]], out: str | Path) -> Path:
    """Fold adapters at weights into the base's weights and save a full diffusers pipeline folder."""
    generator = Generator(base, device="cpu", dtype=torch.float32)
    generator.activate({generator.load_adapter(path): weight for path, weight in adapters})  # written into W
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    generator.pipe.save_pretrained(tmp, safe_serialization=True)
    return atomic_replace_dir(tmp, out)
