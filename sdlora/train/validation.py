"""Validation loss: the denoising loss on held-out images with fixed noise, timesteps and order, so two
evaluations of the same weights give the same number and a rise means overfitting, not luck.

The images come from `--validation-dir` or a seeded `--validation-split` of the training folder; the
run remembers the loss at each step it was measured and which checkpoint had the lowest.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch

from sdlora.config import TrainConfig
from sdlora.data import Item, scan_folder
from sdlora.train.cache import Example
from sdlora.train.loss import LossContext, per_example_loss
from sdlora.train.result import TrainingError

VALIDATION_SEED = 20240229  # any fixed number: the same noise every time the loss is measured
DRAWS_PER_IMAGE = 4  # noise/timestep draws per image, to steady the estimate


@dataclass
class Validation:
    """The held-out examples and what was measured on them."""

    examples: list[Example]
    losses: dict[int, float] = field(default_factory=dict)  # step -> validation loss
    checkpoints: dict[int, str] = field(default_factory=dict)  # step -> checkpoint folder

    def best_step(self, steps: Iterable[int]) -> int | None:
        """Of `steps`, the one with the lowest measured loss (None when none was measured)."""
        measured = [step for step in steps if step in self.losses]
        return min(measured, key=lambda step: (self.losses[step], step)) if measured else None

    @property
    def best_checkpoint(self) -> tuple[int, str] | None:
        step = self.best_step(self.checkpoints)
        return None if step is None else (step, self.checkpoints[step])


def split_validation(items: list[Item], config: TrainConfig) -> tuple[list[Item], list[Item]]:
    """(training items, validation items): the --validation-dir images, or a seeded share of the
    training images held out; none when neither option is given."""
    if config.validation_dir:
        return items, scan_folder(
            config.validation_dir, config.prompt, caption_extension=config.caption_extension
        )
    if not config.validation_split:
        return items, []
    count = max(1, round(len(items) * config.validation_split))
    if count >= len(items):
        raise TrainingError(
            f"--validation-split {config.validation_split} holds out all {len(items)} images; "
            "lower it or give --validation-dir."
        )
    held = set(random.Random(config.seed).sample(range(len(items)), count))
    return [it for i, it in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def needs_validation(config: TrainConfig, validation: Validation | None, step: int) -> bool:
    """With a validation set: every --validate-every steps, at every checkpoint step and at the last."""
    if validation is None:
        return False
    periodic = any(every and step % every == 0 for every in (config.validate_every, config.save_every))
    return periodic or step == config.steps


@torch.no_grad()
def validation_loss(ctx: LossContext, examples: list[Example], parts: Iterable[torch.nn.Module]) -> float:
    """The mean denoising loss over `examples` with fixed draws, the trained parts in eval mode (no
    dropout). Every process computes the whole of it, so all agree without communicating."""
    fixed = replace(
        ctx,
        config=replace(
            ctx.config, flip=False, noise_offset=0.0, shuffle_tags=False, keep_tokens=0, caption_dropout=0.0
        ),
        rng=torch.Generator(device=ctx.device).manual_seed(VALIDATION_SEED),
        rank=0,
        world=1,
    )
    parts = list(parts)
    modes = [part.training for part in parts]
    for part in parts:
        part.eval()
    try:
        keep = list(range(DRAWS_PER_IMAGE))
        losses = [per_example_loss(fixed, [example] * DRAWS_PER_IMAGE, keep) for example in examples]
    finally:
        for part, mode in zip(parts, modes, strict=True):
            part.train(mode)
    return float(torch.cat(losses).mean())
