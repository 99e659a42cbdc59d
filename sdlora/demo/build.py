"""Train the tiny demo Stable Diffusion model from scratch and save it as a diffusers pipeline folder.

The demo model lets the whole LoRA workflow (training, mixing, generating, the UI) run offline on a laptop
CPU in seconds. It is a genuine SD 1.x architecture, only small: an ``AutoencoderKL`` (32 px images to 8x8x4
latents), a 2-layer ``CLIPTextModel`` and a ``UNet2DConditionModel`` with cross-attention, trained on the
procedural shapes of :mod:`sdlora.demo.shapes` with SD 1.x's noise schedule and epsilon objective.

Usage::

    python -m sdlora.demo.build                 # full build into sdlora/demo/model (~40 min on 2 cores)
    python -m sdlora.demo.build --quick --out /tmp/demo_quick   # smoke test of this script (~1 min)
"""

from __future__ import annotations

# ruff: noqa: E402 -- the OpenMP setting below only takes effect if made before torch is imported.
import os

# Passive OpenMP waiting: with the default busy-waiting, a build sharing its cores with another process
# (tests, an IDE) slowed down about sevenfold here; passive waiting keeps it near its fair share.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import platform
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import diffusers
import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import EMAModel, compute_snr
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdlora.demo import DEMO_MODEL_DIR
from sdlora.demo.shapes import NATIVE_RESOLUTION, make_dataset, vae_variety
from sdlora.demo.tokenizer import build_tokenizer, write_tokenizer_files
from sdlora.files import atomic_replace_dir

# SD 1.x noise schedule, so LoRA code written for the real model sees the same scheduler maths.
NOISE_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
)
SAMPLE_PROMPTS = (
    "a red circle on a white background",
    "a blue square on a white background",
    "a green triangle on a white background",
    "a yellow circle on a white background",
    "an orange diamond on a white background",
    "a purple cross on a white background",
    "a black square on a light gray background",
    "a large blue circle on a light yellow background",
    "a yellow triangle on a navy background",
)


@dataclass(frozen=True)
class BuildConfig:
    """Sizes, step and time budgets, learning rates; the defaults are the shipped model's recipe.

    The time budgets keep the full build near 40 minutes on a 2-core CPU even when it is shared.
    """

    dataset_size: int = 40_000
    decoder_variety_size: int = 10_000  # held-back shapes, styles, backgrounds for refining the decoder
    vae_variety_share: float = 0.3  # share of the VAE's training images drawn from `vae_variety`
    decoder_steps: int = 800
    decoder_batch: int = 64
    decoder_lr: float = 5e-4
    vae_steps: int = 800
    vae_minutes: float = 8.0
    vae_batch: int = 64
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 6_000
    unet_minutes: float = 25.0
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    text_hidden: int = 64
    text_layers: int = 2
    unet_channels: tuple[int, int] = (64, 128)
    unet_layers_per_block: int = 1
    log_every: int = 100


QUICK_CONFIG = BuildConfig(
    dataset_size=2_000,
    decoder_variety_size=500,
    decoder_steps=10,
    vae_steps=60,
    vae_minutes=0.5,
    vae_batch=32,
    unet_steps=80,
    unet_minutes=0.5,
    unet_batch=32,
    warmup_steps=10,
    log_every=20,
)


class Schedule:
    """Step and wall-clock budget of one training phase, its learning rate, and progress printing.

    A phase stops after ``max_steps`` or ``minutes``, whichever comes first, and the cosine decay follows
    whichever is further along. On a busy shared CPU the build therefore trains for fewer steps instead of
    overrunning its time limit, and still ends with a fully decayed learning rate.
    """

    def __init__(self, name: str, max_steps: int, minutes: float, warmup: int, every: int) -> None:
        self.name, self.max_steps, self.budget, self.warmup, self.every = (
            name,
            max_steps,
            minutes * 60,
            warmup,
            every,
        )
        self.start = time.monotonic()
        self.steps_done = 0
        self.recent: list[float] = []
        self.last_mean = float("nan")

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start

    def fraction(self, step: int) -> float:
        """How far through the phase we are, by steps or by time, whichever is larger."""
        return max(step / self.max_steps, self.seconds / self.budget)

    def lr_scale(self, step: int) -> float:
        """Linear warm-up, then cosine decay to zero over the phase (a stable, fast recipe)."""
        warm = min(1.0, (step + 1) / self.warmup)
        return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, self.fraction(step))))

    def steps(self, batches: Iterator[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
        """Enumerate ``batches`` until the phase's budget is spent."""
        for step, batch in enumerate(batches):
            if self.fraction(step) >= 1:
                return
            self.steps_done = step + 1
            yield step, batch

    def log(self, step: int, loss: float, lr: float) -> None:
        self.recent.append(loss)
        if (step + 1) % self.every:
            return
        self.last_mean = sum(self.recent) / len(self.recent)
        self.recent.clear()
        fraction = self.fraction(step + 1)
        eta = self.seconds / fraction * (1 - fraction)
        print(
            f"[{self.name}] step {step + 1} ({fraction:.0%}) loss {self.last_mean:.5f} lr {lr:.2e} "
            f"elapsed {self.seconds / 60:.1f} min eta {eta / 60:.1f} min",
            flush=True,
        )

    def summary(self) -> dict:
        return {
            "steps": self.steps_done,
            "max_steps": self.max_steps,
            "budget_minutes": self.budget / 60,
            "seconds": round(self.seconds),
            "final_loss": self.last_mean,
        }


def batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches drawn as shuffled epochs, so every image is seen equally often."""
    order = torch.empty(0, dtype=torch.long)
    while True:
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(count, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def to_model_space(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) images to float (N, 3, H, W) in [-1, 1], the range SD's VAE works in."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def make_vae() -> AutoencoderKL:
    """SD's autoencoder design with three resolution levels, so 32 px images become 8x8x4 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=NATIVE_RESOLUTION,
    )


def make_text_encoder(tokenizer: CLIPTokenizer, config: BuildConfig) -> CLIPTextModel:
    """A narrow CLIP text transformer sized to the tiny vocabulary and the tokenizer's context length."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_hidden,
            intermediate_size=4 * config.text_hidden,
            num_hidden_layers=config.text_layers,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def make_unet(config: BuildConfig) -> UNet2DConditionModel:
    """SD's conditional U-Net with two levels (8x8 and 4x4), cross-attending to the text encoder."""
    return UNet2DConditionModel(
        sample_size=NATIVE_RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=config.unet_channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=config.unet_layers_per_block,
        cross_attention_dim=config.text_hidden,
        attention_head_dim=4,
        norm_num_groups=32,
    )


def parameter_count(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


def train_vae(
    images: torch.Tensor,
    variety: torch.Tensor,
    config: BuildConfig,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[AutoencoderKL, dict]:
    """Fit the autoencoder with MSE plus SD's tiny KL term, then measure reconstruction on held-out images.

    It learns from the base images and from ``variety`` (held-back shapes, styles, dark backgrounds),
    as SD's VAE learned from far more than any one concept: the encoder then keeps a star, an outline
    or a navy corner apart in the latents, so the decoder never has to guess which one a latent means.
    """
    held_out, train = images[:512], torch.cat([images[512:], variety])
    vae = make_vae().to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = Schedule("vae", config.vae_steps, config.vae_minutes, config.warmup_steps, config.log_every)
    for step, index in schedule.steps(batches(len(train), config.vae_batch, generator)):
        lr = config.vae_lr * schedule.lr_scale(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = train[index].to(device)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, batch) + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.log(step, loss.item(), lr)
    vae.eval()
    with torch.no_grad():
        held_out = held_out.to(device)
        mse = F.mse_loss(vae.decode(vae.encode(held_out).latent_dist.mode()).sample, held_out).item()
    print(f"[vae] held-out reconstruction MSE {mse:.5f} (images in [-1, 1])", flush=True)
    return vae, {**schedule.summary(), "reconstruction_mse": mse}


def refine_decoder(
    vae: AutoencoderKL, images: torch.Tensor, config: BuildConfig, seed: int, device: torch.device
) -> dict:
    """Sharpen the decoder on what LoRAs can teach: held-back shapes, styles and dark backgrounds
    (in the shipped build, held-out MSE on base images 0.0056 -> 0.0032).

    Only the decoder learns (the encoder, and so the latent space the U-Net was trained in, stays
    exactly as it was), on batches half of base images (so they still decode as before) and half of
    `vae_variety` images, decoded from sampled latents as a LoRA-trained U-Net would produce them.
    A fixed number of steps on a seeded generator: the same seed gives the same decoder.
    """
    generator = torch.Generator().manual_seed(seed)
    variety = to_model_space(vae_variety(config.decoder_variety_size, seed=seed + 1))
    held_out = torch.cat([variety[:256], images[:256]])
    variety = variety[256:]
    vae = vae.to(device)
    vae.requires_grad_(False)
    parts = [vae.decoder, vae.post_quant_conv]
    for part in parts:
        part.requires_grad_(True).train()
    params = [p for part in parts for p in part.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.decoder_lr, weight_decay=0.0)
    half = config.decoder_batch // 2
    started = time.monotonic()
    for step in range(config.decoder_steps):
        lr = config.decoder_lr * 0.5 * (1 + math.cos(math.pi * step / config.decoder_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        pick = [
            variety[torch.randint(len(variety), (half,), generator=generator)],
            images[torch.randint(len(images), (half,), generator=generator)],
        ]
        batch = torch.cat(pick).to(device)
        with torch.no_grad():
            posterior = vae.encode(batch).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        loss = F.mse_loss(vae.decode(latents.to(device)).sample, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % config.log_every == 0 or step == config.decoder_steps - 1:
            print(f"[decoder] step {step} loss {loss.item():.5f} lr {lr:.2e}", flush=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        held_out = held_out.to(device)
        reconstructed = vae.decode(vae.encode(held_out).latent_dist.mode()).sample
        errors = ((reconstructed - held_out) ** 2).mean(dim=(1, 2, 3))
    return {
        "steps": config.decoder_steps,
        "seconds": round(time.monotonic() - started),
        "held_out_mse_variety": float(errors[:256].mean()),
        "held_out_mse_base": float(errors[256:].mean()),
    }


def refine_shipped_decoder(model_dir: Path, *, seed: int = 0, config: BuildConfig = BuildConfig()) -> dict:
    """Run `refine_decoder` on an existing model folder's VAE and record it in its build_info.json;
    the U-Net, text encoder and latent space are untouched."""
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32)
    images_u8, _ = make_dataset(config.dataset_size, seed=seed)
    info = refine_decoder(vae, to_model_space(images_u8), config, seed, device)
    staging = model_dir.with_name(f".{model_dir.name}.refining")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(model_dir, staging)
    vae.cpu().save_pretrained(staging / "vae", safe_serialization=True)
    config_path = staging / "vae" / "config.json"  # no trace of where the refinement ran
    vae_config = {k: v for k, v in json.loads(config_path.read_text()).items() if k != "_name_or_path"}
    config_path.write_text(json.dumps(vae_config, indent=2, sort_keys=True) + "\n")
    save_fp16(staging / "vae")
    build_info = json.loads((staging / "build_info.json").read_text())
    build_info["decoder_refinement"] = info
    build_info["config"] = {
        **build_info["config"],
        **{k: v for k, v in asdict(config).items() if k.startswith("decoder_")},
    }
    (staging / "build_info.json").write_text(json.dumps(build_info, indent=2) + "\n")
    sample_grid(staging, SAMPLE_PROMPTS, seed).save(staging / "samples.png")
    write_model_card(staging)
    atomic_replace_dir(staging, model_dir)
    return info


@torch.no_grad()
def encode_latents(
    vae: AutoencoderKL, images: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, computed once so U-Net training never runs the encoder."""
    means, stds = [], []
    for chunk in images.split(512):
        posterior = vae.encode(chunk.to(device)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


def tokenize(tokenizer: CLIPTokenizer, captions: Iterable[str]) -> torch.Tensor:
    """Token ids padded to the context length exactly as StableDiffusionPipeline.encode_prompt does."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction: they keep easy low-noise steps from dominating,
    which makes small diffusion models converge noticeably faster (Hang et al., 2023)."""
    snr = compute_snr(scheduler, timesteps)  # diffusers' helper, as the LoRA trainer uses
    return torch.clamp(snr, max=gamma) / snr


def weight_average(parameters: list[torch.nn.Parameter], decay: float) -> EMAModel:
    """Exponential moving average of weights: a cheap, reliable quality gain for diffusion models.

    The decay at update k (from 0) is min(decay, (1 + k) / (10 + k)): early weights are forgotten
    quickly. That is EMAModel's warm-up 1 - (1 + s / 9)^-1 = s / (9 + s) at s = k + 1, hence
    `update_after_step=-1` (EMAModel counts s = k otherwise, and s = 0 would copy the weights outright).
    """
    return EMAModel(
        parameters,
        decay=decay,
        use_ema_warmup=True,
        inv_gamma=9.0,
        power=1.0,
        update_after_step=-1,
        foreach=True,
    )


def train_unet(
    latents: tuple[torch.Tensor, torch.Tensor],
    token_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    tokenizer: CLIPTokenizer,
    config: BuildConfig,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[CLIPTextModel, UNet2DConditionModel, dict]:
    """Train text encoder and U-Net together on SD's epsilon objective; returns the EMA weights.

    ``latents`` are already scaled (posterior mean, std) pairs; a fresh posterior sample per batch keeps the
    decoder's view of latents slightly blurred, which makes generated latents decode more robustly.
    Captions are replaced by "" 10% of the time so classifier-free guidance works at inference.
    """
    text_encoder = make_text_encoder(tokenizer, config).to(device).train()
    unet = make_unet(config).to(device).train()
    modules: list[torch.nn.Module] = [text_encoder, unet]
    parameters = [p for module in modules for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.unet_lr, weight_decay=0.01)
    ema = weight_average(parameters, config.ema_decay)
    scheduler = DDPMScheduler(**NOISE_SCHEDULE)
    latent_mean, latent_std = latents
    schedule = Schedule("unet", config.unet_steps, config.unet_minutes, config.warmup_steps, config.log_every)
    for step, index in schedule.steps(batches(len(token_ids), config.unet_batch, generator)):
        lr = config.unet_lr * schedule.lr_scale(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        clean = latent_mean[index] + latent_std[index] * torch.randn(
            latent_mean[index].shape, generator=generator
        )
        drop = torch.rand(len(index), generator=generator) < config.caption_dropout
        ids = torch.where(drop[:, None], empty_ids, token_ids[index])
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        text = text_encoder(ids.to(device))[0]
        prediction = unet(noisy.to(device), timesteps.to(device), text).sample
        per_sample = F.mse_loss(prediction, noise.to(device), reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(scheduler, timesteps, config.min_snr_gamma).to(device)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        ema.step(parameters)
        schedule.log(step, per_sample.mean().item(), lr)
    ema.copy_to(parameters)
    return text_encoder.eval(), unet.eval(), schedule.summary()


def inference_scheduler() -> DDIMScheduler:
    """DDIM with SD 1.x's settings: deterministic, good at 25-50 steps."""
    return DDIMScheduler(**NOISE_SCHEDULE, set_alpha_to_one=False, steps_offset=1)


def save_fp16(out_dir: Path) -> None:
    """Halve every safetensors file in place: fp16 weights keep the shipped folder small.

    Configs are left alone (no ``torch_dtype`` pinned), so loaders give full-precision models by default and
    CPU inference just works; the fp16 values are upcast on load.
    """
    for path in out_dir.rglob("*.safetensors"):
        tensors = safetensors.torch.load_file(path)
        halved = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        safetensors.torch.save_file(halved, path, metadata={"format": "pt"})
        path.chmod(0o644)  # save_file creates owner-only files; the package data must be world-readable


def save_pipeline(
    out_dir: Path,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
) -> None:
    """Write a standard StableDiffusionPipeline folder (no safety checker: the images are shapes)."""
    pipeline = StableDiffusionPipeline(
        vae=vae.cpu(),
        text_encoder=text_encoder.cpu(),
        tokenizer=tokenizer,
        unet=unet.cpu(),
        scheduler=inference_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    # Also ship the classic vocab.json/merges.txt so older transformers' slow CLIPTokenizer loads it too.
    write_tokenizer_files(out_dir / "tokenizer")
    save_fp16(out_dir)


def sample_grid(model_dir: Path, prompts: Iterable[str], seed: int) -> Image.Image:
    """Reload the saved folder the way users will and draw one image per prompt: proves the folder works."""
    pipeline = StableDiffusionPipeline.from_pretrained(model_dir)  # fp16 files load as float32
    pipeline.set_progress_bar_config(disable=True)
    images = []
    for offset, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed + offset)
        images += pipeline(prompt, num_inference_steps=25, guidance_scale=4.0, generator=generator).images
    grid = Image.new("RGB", (NATIVE_RESOLUTION * len(images), NATIVE_RESOLUTION), "white")
    for position, image in enumerate(images):
        grid.paste(image, (position * NATIVE_RESOLUTION, 0))
    return grid.resize((grid.width * 4, grid.height * 4), Image.Resampling.NEAREST)


def write_model_card(model_dir: Path) -> None:
    """README.md for the model folder, filled in from its ``build_info.json``."""
    info = json.loads((model_dir / "build_info.json").read_text())
    vae, text, unet = info["vae"], info["text_encoder"], info["unet"]
    card = f"""# sdlora demo model: coloured shapes, 32 px

A tiny Stable Diffusion 1.x-style model trained from scratch by `python -m sdlora.demo.build` on procedural
images of filled circles, squares, triangles, diamonds and crosses in red, orange, yellow, green, blue,
purple and black on plain backgrounds (`sdlora/demo/shapes.py`), dark ones (navy, dark gray) only when the
caption names them. Stars, rings and the outlined style were left out of its data, for LoRA
training examples (`training_data/`); the VAE saw them, so a LoRA that teaches them can draw them.

    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained("sdlora/demo/model")  # fp16 files load as float32
    image = pipe("a red circle on a white background", num_inference_steps=25, guidance_scale=4).images[0]

Prompts follow the training captions: "a/an [small|large] <colour> <shape name, or just shape> [on a <background> background]"
with backgrounds white, light gray, light yellow, light blue, navy, dark gray. Native size 32x32 (8x8x4 latents).

| part | parameters | training |
|---|---|---|
| AutoencoderKL (32, 64, 64) | {vae["parameters"]:,} | {vae["steps"]} steps, held-out MSE {vae["reconstruction_mse"]:.4f} |
| CLIPTextModel ({info["config"]["text_layers"]} layers, {info["config"]["text_hidden"]} wide) \
| {text["parameters"]:,} | jointly with the U-Net |
| UNet2DConditionModel {tuple(info["config"]["unet_channels"])} | {unet["parameters"]:,} \
| {unet["steps"]} steps, final epsilon MSE {unet["final_loss"]:.4f}, EMA weights |

Latent scaling factor {vae["scaling_factor"]:.4f}; vocabulary {text["vocab_size"]} tokens (`sdlora/demo/tokenizer.py`);
DDIM scheduler with SD 1.x's betas; weights stored as float16. Built in {info["total_minutes"]:.1f} minutes on
{info["threads"]} CPU threads with seed {info["seed"]}; every figure is in `build_info.json`. `samples.png` shows
the prompts listed there, one image each.
"""
    (model_dir / "README.md").write_text(card)


def folder_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def check_output(out_dir: Path) -> None:
    """Refuse, before any training, to overwrite a folder that is not a pipeline folder (a mistyped --out)."""
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "model_index.json").exists():
        raise FileExistsError(f"{out_dir} is not empty and holds no model_index.json; not overwriting it")


def build_demo_model(
    out_dir: str | Path = DEMO_MODEL_DIR,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    config: BuildConfig = BuildConfig(),
    threads: int | None = 2,
    log: Callable[[str], None] = print,
) -> Path:
    """Render the dataset, train VAE then text encoder + U-Net from scratch, and save the pipeline folder.

    Returns the folder path. ``build_info.json``, ``README.md`` and ``samples.png`` in it record how it was made.
    """
    started = time.monotonic()
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    out_dir = Path(out_dir)
    check_output(out_dir)

    images_u8, captions = make_dataset(config.dataset_size, seed=seed)
    images = to_model_space(images_u8)
    log(f"dataset: {len(captions)} images, e.g. {captions[:3]}")

    share = config.vae_variety_share
    variety = to_model_space(vae_variety(round(len(images) * share / (1 - share)), seed=seed + 2))
    vae, vae_info = train_vae(images, variety, config, generator, device)
    del variety
    mean, std = encode_latents(vae, images, device)
    vae_info["decoder_refinement"] = refine_decoder(vae, images, config, seed, device)
    scaling_factor = float(1 / (mean + std * torch.randn(mean.shape, generator=generator)).std())
    vae.register_to_config(scaling_factor=scaling_factor)
    log(f"latent scaling factor {scaling_factor:.4f}")

    tokenizer = build_tokenizer()
    token_ids = tokenize(tokenizer, captions)
    empty_ids = tokenize(tokenizer, [""])
    scaled = (mean * scaling_factor, std * scaling_factor)
    text_encoder, unet, unet_info = train_unet(
        scaled, token_ids, empty_ids, tokenizer, config, generator, device
    )

    # Everything is written into a staging folder that replaces the old model only once complete:
    # a build that fails at the end leaves the previous model as it was, with no stale files mixed in.
    check_output(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.building")
    shutil.rmtree(staging, ignore_errors=True)
    save_pipeline(staging, vae, text_encoder, tokenizer, unet)
    sample_grid(staging, SAMPLE_PROMPTS, seed).save(staging / "samples.png")

    info = {
        "seed": seed,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "config": asdict(config),
        "vae": {**vae_info, "parameters": parameter_count(vae), "scaling_factor": scaling_factor},
        "text_encoder": {"parameters": parameter_count(text_encoder), "vocab_size": len(tokenizer)},
        "unet": {**unet_info, "parameters": parameter_count(unet)},
        "total_minutes": round((time.monotonic() - started) / 60, 2),
        "weights_dtype": "float16",
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "sample_prompts": list(SAMPLE_PROMPTS),
    }
    (staging / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    write_model_card(staging)
    atomic_replace_dir(staging, out_dir)
    log(f"saved {out_dir} ({folder_bytes(out_dir) / 1e6:.1f} MB) in {info['total_minutes']:.1f} min")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEMO_MODEL_DIR, help="output folder (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device; default cuda if available, else cpu")
    parser.add_argument("--quick", action="store_true", help="tiny fast build for testing this script")
    parser.add_argument("--unet-steps", type=int, default=None, help="override the U-Net training steps")
    parser.add_argument(
        "--refine-decoder-only",
        action="store_true",
        help="only run the decoder refinement stage on the model in --out (U-Net and latents untouched)",
    )
    args = parser.parse_args(argv)
    config = QUICK_CONFIG if args.quick else BuildConfig()
    if args.refine_decoder_only:
        print(json.dumps(refine_shipped_decoder(args.out, seed=args.seed, config=config), indent=2))
        return
    if args.unet_steps:
        config = replace(config, unet_steps=args.unet_steps)
    build_demo_model(args.out, seed=args.seed, device=args.device, config=config)


if __name__ == "__main__":
    main()
