"""An exponential moving average of the adapter weights (diffusers' `EMAModel`): steadier weights for the
saved adapter, samples and validation, at the cost of one more copy of the (small) adapter."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.training_utils import EMAModel

from sdlora.config import TrainConfig


def make_ema(config: TrainConfig, params: list[torch.nn.Parameter]) -> EMAModel | None:
    """The average of `params` when --ema is on. Its decay ramps up as (1 + t) / (10 + t) to --ema-decay,
    so short runs are not dominated by the untrained start."""
    return EMAModel(params, decay=config.ema_decay) if config.ema else None


@contextmanager
def ema_weights(ema: EMAModel | None, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """The averaged weights in place of the trained ones for the duration, then the trained ones back."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)
