"""Making a U-Net step fast: TF32, channels-last memory, and torch.compile checked against eager gradients."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from sdlora.config import TrainConfig
from sdlora.train.cache import Batch
from sdlora.train.loss import LossContext, diffusion_loss

COMPILE_TOLERANCE = 0.05  # relative gradient difference allowed between compiled and eager U-Nets


@dataclass(frozen=True)
class Speed:
    """What was switched on, for the start event (its fields are the event's)."""

    attention: str
    tf32: bool
    channels_last: bool
    compiled: bool = False
    compile_gradient_error: float | None = None


def tune_for_speed(config: TrainConfig, unet: torch.nn.Module, device: torch.device) -> Speed:
    """Switch on what makes a U-Net step fast on this device; returns what was chosen.

    Attention already goes through PyTorch's fused scaled_dot_product_attention (diffusers' default
    processor), which picks flash or memory-efficient kernels on a GPU; it is reported, not changed.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.tf32
        torch.backends.cudnn.allow_tf32 = config.tf32
    if config.channels_last:
        unet.to(memory_format=torch.channels_last)
    attention = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    return Speed(
        attention=",".join(attention),
        tf32=config.tf32 and device.type == "cuda",
        channels_last=config.channels_last,
    )


def compile_unet(
    ctx: LossContext, batch: Batch, params: list[torch.nn.Parameter]
) -> tuple[torch.nn.Module, float]:
    """torch.compile the U-Net; returns it with how far one step's LoRA gradients are from the eager ones.

    Compilers can be silently wrong (inductor on the CPU, torch 2.13, zeroed the mid-block LoRA
    gradients of a small U-Net), and a wrong gradient wastes a whole run: one extra step at the start
    is the cheap way to know. Static shapes: one graph per bucket size. The module in `ctx` is left
    as it was, so parameter names (checkpoints, adapters) never see the compiler's wrapper.
    """
    eager, compiled = ctx.unet, torch.compile(ctx.unet, dynamic=False)
    noise_state, grads = ctx.rng.get_state(), []
    for unet in (eager, compiled):
        ctx.rng.set_state(noise_state)  # the same noise and timesteps for both
        diffusion_loss(replace(ctx, unet=unet), *batch).backward()
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params])
        for p in params:
            p.grad = None
    ctx.rng.set_state(noise_state)
    error = max(
        ((c - e).norm() / torch.maximum(e.norm(), c.norm()).clamp_min(1e-30)).item()
        for e, c in zip(*grads, strict=True)
    )
    return compiled, error
