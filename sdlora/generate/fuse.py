"""Folding adapters into a base for good: a full model with the LoRAs baked into its weights.

It lives with generation, not with the adapter files, because it needs a loaded base; `sdlora.adapters`
stays below `sdlora.generate` and never imports it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdlora.files import atomic_folder
from sdlora.generate.generator import Generator
from sdlora.models.single_file import FUSED_KEY, save_single_file


def fuse_into_base(
    base: str | None,
    adapters: list[tuple[str | Path, float]],
    out: str | Path,
    *,
    dtype: torch.dtype | None = torch.float16,
) -> Path:
    """Fold adapters at weights into the base's weights and save the full model.

    `out` ending in .safetensors: one original-layout file that A1111, Forge and ComfyUI load, in `dtype`
    (fp16 by default), its metadata naming the fused adapters and weights. Otherwise a diffusers folder,
    in the precision the base was computed in (fp32).
    """
    generator = Generator(base, device="cpu", dtype=torch.float32)
    names = {generator.load_adapter(path): (Path(path), weight) for path, weight in adapters}
    generator.activate({name: weight for name, (_, weight) in names.items()})  # written into W
    out = Path(out)
    if out.suffix == ".safetensors":
        fused = [{"adapter": path.name, "weight": weight} for path, weight in names.values()]
        metadata = {FUSED_KEY: json.dumps(fused), "modelspec.description": _description(fused, generator)}
        return save_single_file(generator.pipe, out, dtype=dtype, metadata=metadata)
    with atomic_folder(out) as tmp:
        generator.pipe.save_pretrained(tmp, safe_serialization=True)
    return out


def _description(fused: list[dict], generator: Generator) -> str:
    mix = ", ".join(f"{item['adapter']} at {item['weight']:g}" for item in fused) or "no adapters"
    return f"{Path(generator.base_name).name} with {mix} fused in by sdlora"
