"""Sample images during training: the same prompts and seed each time, so the images show what changed."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from sdlora.config import TrainConfig
from sdlora.generate import GenerationParams, Generator, save_png

SAMPLE_STEPS = 20
SAMPLE_GUIDANCE = 5.0


def make_samples(
    sampler: Generator,
    trainables: Iterable[torch.nn.Module],
    config: TrainConfig,
    resolution: int,
    folder: Path,
    step: int,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[Path]:
    """Images for the sample prompts with the adapter as it is now; the same seed every time.
    `on_progress(made, total)` is called before each image and after the last; `should_stop()` is asked
    before each image, and when it says yes the images made so far are returned."""
    trainables = list(trainables)
    for model in trainables:
        model.eval()
    paths = []
    try:
        for index, prompt in enumerate(config.sample_prompt):
            if should_stop and should_stop():
                break
            if on_progress:
                on_progress(index, len(config.sample_prompt))
            params = GenerationParams(
                prompt,
                seed=config.seed,
                steps=SAMPLE_STEPS,
                guidance=SAMPLE_GUIDANCE,
                width=resolution,
                height=resolution,
            )
            paths.append(save_png(sampler.generate(params), folder / f"step-{step:06d}-{index}.png"))
    finally:
        for model in trainables:
            model.train()
    if on_progress:
        on_progress(len(paths), len(paths))
    return paths
