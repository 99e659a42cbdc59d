"""The denoising loss: noise the cached latents, predict with the U-Net, compare with the scheduler's target.

Prior preservation adds the class images' loss; min-SNR-gamma reweights timesteps; v-prediction bases
(SD 2.x 768) are trained on the velocity instead of the noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from sdlora.config import TrainConfig
from sdlora.train.cache import Example
from sdlora.train.captions import caption_variant, varies_captions
from sdlora.train.conditioning import Conditioning, TextConditioner
from sdlora.train.result import TrainingError


@dataclass
class LossContext:
    """What the loss needs besides the batch: the trained parts, the frozen encoders' caches, the noise RNG."""

    config: TrainConfig
    unet: torch.nn.Module
    conditioner: TextConditioner
    text_encoders: dict[str, torch.nn.Module]  # the ones being trained (wrapped by accelerate)
    scheduler: DDPMScheduler
    cached_text: dict[str, Conditioning] | None
    rng: torch.Generator
    device: torch.device
    weight_dtype: torch.dtype
    vae_scale: float
    rank: int = 0  # this process among `world` data-parallel processes
    world: int = 1


def diffusion_loss(ctx: LossContext, instance: list[Example], prior: list[Example]) -> torch.Tensor:
    """The denoising loss of the instance examples plus the prior-weighted loss of the class examples.

    With several processes, `instance` and `prior` are the global batch: every process draws the same
    noise for all of it and trains on every `world`-th example, so N processes at batch B see exactly
    what one process at batch N·B sees (DDP then averages their gradients).
    """
    mine = [i for i in range(len(instance)) if i % ctx.world == ctx.rank]
    mine_prior = [i for i in range(len(prior)) if i % ctx.world == ctx.rank]
    if prior and prior[0].mean.shape == instance[0].mean.shape:  # one forward pass when the shapes allow it
        per_example = per_example_loss(ctx, instance + prior, mine + [len(instance) + i for i in mine_prior])
    else:
        per_example = torch.cat(
            [
                per_example_loss(ctx, group, keep)
                for group, keep in ((instance, mine), (prior, mine_prior))
                if group
            ]
        )
    instance_loss = per_example[: len(mine)].mean()
    if not prior:
        return instance_loss
    prior_weight = 1.0 if ctx.config.prior_weight is None else ctx.config.prior_weight
    return instance_loss + prior_weight * per_example[len(mine) :].mean()


def prediction_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the U-Net should predict: the noise, or for v-prediction the velocity
    v = sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * latents."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def training_scheduler(config: TrainConfig, base_config: dict) -> DDPMScheduler:
    """The base's noise schedule, rescaled to zero terminal SNR with --zero-terminal-snr (Lin et al. 2023):
    the last step is then pure noise, as at sampling time, so the model learns true darks and brights.
    With no signal left the noise can't be predicted, so that needs a v-prediction base."""
    if not config.zero_terminal_snr:
        return DDPMScheduler.from_config(base_config)
    if base_config.get("prediction_type") != "v_prediction":
        raise TrainingError(
            "--zero-terminal-snr needs a v-prediction base (like SD 2.x 768): at zero SNR the last step "
            f"holds no signal and its noise can't be predicted; this base predicts {base_config.get('prediction_type')}."
        )
    return DDPMScheduler.from_config(base_config, rescale_betas_zero_snr=True)


def debiased_weight(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2023), as kohya applies it: 1/sqrt(SNR) for noise prediction,
    1/(SNR + 1) for v-prediction, with SNR capped at 1000 where t = 0 makes it huge."""
    snr = compute_snr(scheduler, timesteps).clamp(max=1000)
    if scheduler.config.prediction_type == "v_prediction":
        return 1 / (snr + 1)
    return 1 / snr.sqrt()


def min_snr_weight(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR, so easy low-noise steps stop dominating;
    for v-prediction the weight is relative to SNR + 1."""
    snr = compute_snr(scheduler, timesteps)
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    return torch.clamp(snr, max=gamma) / (snr + 1 if v_prediction else snr)


def per_example_loss(ctx: LossContext, group: list[Example], keep: list[int]) -> torch.Tensor:
    """Noise is drawn for the whole group (the same on every process); the U-Net runs on `keep` only."""
    config, scheduler, rng, device = ctx.config, ctx.scheduler, ctx.rng, ctx.device
    latents = torch.stack([_sample_latent(e, config.flip, rng, device) for e in group]) * ctx.vae_scale
    noise = torch.randn(latents.shape, generator=rng, device=device)
    if config.noise_offset:
        noise = noise + config.noise_offset * torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), generator=rng, device=device
        )
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=rng, device=device
    )
    captions = [e.caption for e in group]
    if varies_captions(config):
        captions = [caption_variant(c, config, rng) for c in captions]
    index = torch.tensor(keep, dtype=torch.long, device=device)
    latents, noise, timesteps = latents[index], noise[index], timesteps[index]
    group, captions = [group[i] for i in keep], [captions[i] for i in keep]
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = prediction_target(scheduler, latents, noise, timesteps)
    if ctx.cached_text is not None:
        conditioning = Conditioning.stack([ctx.cached_text[c] for c in captions])
    else:
        conditioning = ctx.conditioner.encode(captions, device, ctx.text_encoders)
    unet_inputs = ctx.conditioner.unet_kwargs(conditioning, [e.size for e in group], ctx.weight_dtype)
    noisy = noisy.to(
        ctx.weight_dtype,
        memory_format=torch.channels_last if config.channels_last else torch.contiguous_format,
    )
    prediction = ctx.unet(noisy, timesteps, **unet_inputs).sample
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if config.snr_gamma:
        loss = loss * min_snr_weight(scheduler, timesteps, config.snr_gamma)
    if config.debiased_estimation:
        loss = loss * debiased_weight(scheduler, timesteps)
    return loss


def _sample_latent(example: Example, flip: bool, rng: torch.Generator, device: torch.device) -> torch.Tensor:
    mean, std = example.mean, example.std
    if flip and example.flipped is not None and torch.rand((), generator=rng, device=device) < 0.5:
        mean, std = example.flipped
    mean, std = mean.to(device), std.to(device)
    return mean + std * torch.randn(mean.shape, generator=rng, device=device)
