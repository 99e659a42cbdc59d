"""Caption variation per step: kohya-style tag shuffling (the first --keep-tokens tags stay in front) and
caption dropout (an empty caption now and then, so the adapter also learns the unconditional case).

Drawn from the run's noise generator, so runs stay reproducible and resume exactly.
"""

from __future__ import annotations

import torch

from sdlora.config import TrainConfig


def varies_captions(config: TrainConfig) -> bool:
    """Whether captions change from step to step (then their embeddings can't be cached)."""
    return config.shuffle_tags or config.caption_dropout > 0


def caption_variant(caption: str, config: TrainConfig, rng: torch.Generator) -> str:
    """This step's version of `caption`: dropped to '' with probability --caption-dropout, else with its
    comma-separated tags after the first --keep-tokens shuffled."""
    if config.caption_dropout and torch.rand((), generator=rng, device=rng.device) < config.caption_dropout:
        return ""
    if not config.shuffle_tags:
        return caption
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    fixed, rest = tags[: config.keep_tokens], tags[config.keep_tokens :]
    order = torch.randperm(len(rest), generator=rng, device=rng.device).tolist()
    return ", ".join(fixed + [rest[i] for i in order])
