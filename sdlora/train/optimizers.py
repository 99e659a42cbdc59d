"""Optimizers by name: one builder per `--optimizer` choice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sdlora.config import TrainConfig
from sdlora.train.result import TrainingError

ParamGroups = list[dict[str, Any]]
OptimizerBuilder = Callable[[TrainConfig, ParamGroups, torch.device], torch.optim.Optimizer]


def adamw(config: TrainConfig, groups: ParamGroups, device: torch.device) -> torch.optim.Optimizer:
    # The fused kernel updates every LoRA tensor in one pass (CPU and CUDA); the default loops over
    # them one by one on the CPU, which costs more than the update itself for small LoRAs.
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=True)


def adamw8bit(config: TrainConfig, groups: ParamGroups, device: torch.device) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW: optimizer state at a quarter of the memory, CUDA only."""
    if torch.device(device).type != "cuda":
        raise TrainingError("--optimizer adamw8bit needs a CUDA GPU; use --optimizer adamw on the CPU.")
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise TrainingError(
            "--optimizer adamw8bit needs bitsandbytes: pip install 'sdlora[cuda]'."
        ) from error
    return bnb.optim.AdamW8bit(groups, weight_decay=config.weight_decay)


OPTIMIZERS: dict[str, OptimizerBuilder] = {"adamw": adamw, "adamw8bit": adamw8bit}


def make_optimizer(config: TrainConfig, groups: ParamGroups, device: torch.device) -> torch.optim.Optimizer:
    return OPTIMIZERS[config.optimizer](config, groups, device)
