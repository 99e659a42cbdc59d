"""What the U-Net is conditioned on: the one piece of training that differs between model families.

Which text encoders and tokenizers come from the family table (`sdlora.models.families`); how their
output is used follows the U-Net's `addition_embed_type`:
- none (SD 1.x/2.x): the text encoder's last hidden state.
- "text_time" (SDXL): the second-to-last hidden states of all text encoders side by side, the last
  encoder's pooled embedding, and the size and crop "time ids".
A family with another kind of conditioning adds its case here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from sdlora.data import Bucket
from sdlora.models import family_of


@dataclass
class Conditioning:
    hidden: torch.Tensor  # (batch, tokens, width)
    pooled: torch.Tensor | None = None  # "text_time" only: (batch, width of the last encoder)

    def __getitem__(self, index: int) -> Conditioning:
        return Conditioning(self.hidden[index], None if self.pooled is None else self.pooled[index])

    @staticmethod
    def stack(items: list[Conditioning]) -> Conditioning:
        pooled = None if items[0].pooled is None else torch.stack([c.pooled for c in items])
        return Conditioning(torch.stack([c.hidden for c in items]), pooled)


@dataclass(frozen=True)
class SizeInfo:
    """SDXL's micro-conditioning of one example: its size before fitting, the crop, the bucket."""

    original: tuple[int, int]  # (height, width)
    crop_top_left: tuple[int, int]
    bucket: Bucket


class TextConditioner:
    """Turns captions (and image sizes) into the U-Net's conditioning inputs."""

    def __init__(self, pipe: DiffusionPipeline):
        family = family_of(pipe)
        self.text_time = family.addition_embed_type == "text_time"
        self.encoders: dict[str, torch.nn.Module] = {
            e.component: getattr(pipe, e.component) for e in family.text_encoders
        }
        self.tokenizers = [getattr(pipe, e.tokenizer) for e in family.text_encoders]

    def encode(
        self, captions: list[str], device, encoders: dict[str, torch.nn.Module] | None = None
    ) -> Conditioning:
        """`encoders` replaces the pipeline's own (e.g. the accelerate-wrapped ones being trained)."""
        encoders = {**self.encoders, **(encoders or {})}
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, encoders.values(), strict=True):
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            if not self.text_time:
                return Conditioning(encoder(ids)[0])
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]  # the last encoder's projected pooled embedding
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    def unet_kwargs(self, conditioning: Conditioning, sizes: list[SizeInfo], dtype: torch.dtype) -> dict:
        kwargs = {"encoder_hidden_states": conditioning.hidden.to(dtype)}
        if self.text_time:
            time_ids = torch.tensor(
                [[*s.original, *s.crop_top_left, s.bucket.height, s.bucket.width] for s in sizes],
                device=conditioning.hidden.device,
                dtype=dtype,
            )
            kwargs["added_cond_kwargs"] = {"text_embeds": conditioning.pooled.to(dtype), "time_ids": time_ids}
        return kwargs
