"""Full-size Stable Diffusion 1.5 and SDXL with random weights, built from their published configs.

A timing needs the real shapes, not the real weights: a random SD 1.5 U-Net costs what the trained one
costs per step. Building from the configs below needs no download, so the benchmark runs anywhere,
and `lora_step_tflops` counts the work of one LoRA training step on meta tensors (no memory, no time).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdlora.files import atomic_replace_dir
from sdlora.models import resolve_base
from sdlora.train.networks import unet_target_modules

# The U-Net, VAE and text-encoder configs of runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-xl-base-1.0 (fields left at diffusers' defaults are omitted).
SD15_UNET = {
    "block_out_channels": (320, 640, 1280, 1280),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "sample_size": 64,
}
SDXL_UNET = {
    "block_out_channels": (320, 640, 1280),
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
}
VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "latent_channels": 4,
    "layers_per_block": 2,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
}
CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
OPEN_CLIP_BIGG = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
TEXT_TOKENS = 77

ARCHITECTURES = {"sd15": (SD15_UNET, 512), "sdxl": (SDXL_UNET, 1024)}

# The same block layouts in miniature, for the reduced (CPU, CI) run of the GPU check: every code path
# of the family (SDXL's two encoders, pooled embedding and size ids) in seconds, not the real cost.
TINY_UNET = {"layers_per_block": 1, "norm_num_groups": 8, "sample_size": 8}
TINY = {
    "sd15": {
        "unet": {**SD15_UNET, **TINY_UNET, "block_out_channels": (32, 32, 64, 64), "cross_attention_dim": 32},
        "vae": {**VAE, "block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 8},
        "text": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
        },
    },
    "sdxl": {
        "unet": {
            **SDXL_UNET,
            **TINY_UNET,
            "block_out_channels": (32, 64, 64),
            "attention_head_dim": (2, 4, 4),
            "transformer_layers_per_block": (1, 1, 2),
            "cross_attention_dim": 64,  # the two encoders' widths side by side
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,  # size ids + the pooled embedding
        },
        "vae": {**VAE, "block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 8},
        "text": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
        },
    },
}


def build_random_base(arch: str, folder: Path, seed: int = 0, tiny: bool = False) -> Path:
    """Write a diffusers folder of `arch` with random weights (fp16 files), or reuse one already there.

    The tokenizer is the demo model's, stretched to CLIP's 77 tokens: token ids only have to be valid,
    and the real CLIP vocabulary would need a download. `tiny`: the same layout in miniature (TINY).
    """
    if (folder / "model_index.json").exists():
        return folder
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}.")
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(
        Path(resolve_base(None)) / "tokenizer", model_max_length=TEXT_TOKENS
    )
    text = {"vocab_size": 49408, "max_position_embeddings": TEXT_TOKENS}
    small = TINY[arch] if tiny else {}
    unet = small.get("unet", SD15_UNET if arch == "sd15" else SDXL_UNET)
    vae = small.get("vae", VAE)
    clip_l, open_clip = ({**clip, **small.get("text", {})} for clip in (CLIP_L, OPEN_CLIP_BIGG))
    for clip in (clip_l, open_clip):
        clip["projection_dim"] = clip["hidden_size"]  # as in both published configs
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init: seconds on a GPU
        pipe = _random_pipeline(arch, unet, vae, clip_l, open_clip, text, tokenizer)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        pipe.to(torch.float16).save_pretrained(Path(tmp) / "model")
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the trainers timed next run in other processes: leave them the GPU
        return atomic_replace_dir(Path(tmp) / "model", folder)


def _random_pipeline(
    arch: str, unet: dict, vae: dict, clip_l: dict, open_clip: dict, text: dict, tokenizer: CLIPTokenizer
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    if arch == "sd15":
        return StableDiffusionPipeline(
            vae=AutoencoderKL(**vae, sample_size=512, scaling_factor=0.18215),
            text_encoder=CLIPTextModel(CLIPTextConfig(**clip_l, **text)),
            tokenizer=tokenizer,
            unet=UNet2DConditionModel(**unet),
            scheduler=PNDMScheduler(**SCHEDULER, skip_prk_steps=True, set_alpha_to_one=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**vae, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        text_encoder=CLIPTextModel(CLIPTextConfig(**clip_l, **text)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**open_clip, **text)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=UNet2DConditionModel(**unet),
        scheduler=EulerDiscreteScheduler(**SCHEDULER, timestep_spacing="leading"),
    )


def lora_step_tflops(
    unet_config: dict,
    resolution: int,
    batch: int = 1,
    rank: int = 8,
    targets: str = "all",
    text_tokens: int = TEXT_TOKENS,
) -> float:
    """TFLOP of one LoRA training step of the U-Net (forward and backward) on `batch` square images.

    Counted by PyTorch's FlopCounterMode on meta tensors, as the trainer runs it: frozen base weights,
    LoRA layers on the attention projections, gradients for the LoRA weights only.
    """
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=unet_target_modules(unet, targets)))
    latent = resolution // 8
    with torch.device("meta"):
        noisy = torch.randn(batch, unet.config.in_channels, latent, latent)
        timesteps = torch.randint(0, 1000, (batch,))
        context = torch.randn(batch, text_tokens, unet.config.cross_attention_dim)
        extra = {}
        if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text and size/crop ids
            pooled = (
                unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            )
            extra["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, pooled),
                "time_ids": torch.randn(batch, 6),
            }
    counter = FlopCounterMode(display=False)
    with counter:
        unet(noisy, timesteps, context, **extra).sample.float().pow(2).mean().backward()
    return counter.get_total_flops() / 1e12


def main() -> None:
    """Print what one LoRA step costs on each architecture at its native size: `python -m benchmarks.architectures`."""
    for arch, (config, resolution) in ARCHITECTURES.items():
        with torch.device("meta"):
            parameters = sum(p.numel() for p in UNet2DConditionModel(**config).parameters())
        print(
            f"{arch}: U-Net {parameters / 1e6:.1f} M parameters; one rank-8 LoRA step at {resolution} px: "
            f"{lora_step_tflops(config, resolution):.3f} TFLOP per image"
        )


if __name__ == "__main__":
    main()
