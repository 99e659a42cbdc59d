"""Optimizers by name: one builder per `--optimizer` choice, the parameter groups they update (with
LoRA+'s faster B matrices), and the switch schedule-free optimizers need around evaluation."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch

from sdlora.config import TrainConfig
from sdlora.train.result import TrainingError

ParamGroups = list[dict[str, Any]]
OptimizerBuilder = Callable[[TrainConfig, ParamGroups, torch.device], torch.optim.Optimizer]


def param_groups(config: TrainConfig, parts: dict[str, torch.nn.Module]) -> ParamGroups:
    """The trainable weights, one group per part (for --text-encoder-lr); with --loraplus-ratio each part's
    LoRA B matrices get their own group at ratio x the learning rate (LoRA+, Hayou et al. 2024)."""
    groups = []
    for part, model in parts.items():
        lr = config.lr if part == "unet" else config.text_encoder_lr or config.lr
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        faster = [p for name, p in named if config.loraplus_ratio and ".lora_B." in name]
        groups.append({"params": [p for _, p in named if not any(p is q for q in faster)], "lr": lr})
        if faster:
            groups.append({"params": faster, "lr": lr * config.loraplus_ratio})
    return groups


def _optional(module: str, package: str, option: str) -> ModuleType:
    """Import an optional optimizer package, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise TrainingError(
            f"{option} needs {package}: pip install 'sdlora[optim]' (or {package})."
        ) from error


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


def prodigy(config: TrainConfig, groups: ParamGroups, device: torch.device) -> torch.optim.Optimizer:
    """Prodigy estimates the step size itself; --lr (about 1) only scales that estimate."""
    module = _optional("prodigyopt", "prodigyopt", "--optimizer prodigy")
    return module.Prodigy(groups, weight_decay=config.weight_decay, safeguard_warmup=True)


def adafactor(config: TrainConfig, groups: ParamGroups, device: torch.device) -> torch.optim.Optimizer:
    """transformers' Adafactor at the given learning rate (its own relative step sizes off): factored
    second moments, so less optimizer memory than AdamW."""
    from transformers.optimization import Adafactor

    return Adafactor(
        groups,
        lr=config.lr,
        scale_parameter=False,
        relative_step=False,
        warmup_init=False,
        weight_decay=config.weight_decay,
    )


def adamw_schedulefree(
    config: TrainConfig, groups: ParamGroups, device: torch.device
) -> torch.optim.Optimizer:
    """Schedule-free AdamW (Defazio et al. 2024): no decay schedule needed; it warms up by itself and
    evaluates on averaged weights (see `evaluation_weights`)."""
    module = _optional("schedulefree", "schedulefree", "--optimizer adamw-schedulefree")
    optimizer = module.AdamWScheduleFree(
        groups, lr=config.lr, warmup_steps=config.warmup_steps, weight_decay=config.weight_decay
    )
    optimizer.train()
    return optimizer


OPTIMIZERS: dict[str, OptimizerBuilder] = {
    "adamw": adamw,
    "adamw8bit": adamw8bit,
    "prodigy": prodigy,
    "adafactor": adafactor,
    "adamw-schedulefree": adamw_schedulefree,
}


def make_optimizer(config: TrainConfig, groups: ParamGroups, device: torch.device) -> torch.optim.Optimizer:
    return OPTIMIZERS[config.optimizer](config, groups, device)


@contextmanager
def evaluation_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The weights to sample, validate and save with: schedule-free optimizers step on one sequence of
    weights and evaluate on their average, switched in by `eval()` and back by `train()`."""
    inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    switch = callable(getattr(inner, "eval", None)) and callable(getattr(inner, "train", None))
    if switch:
        inner.eval()
    try:
        yield
    finally:
        if switch:
            inner.train()
