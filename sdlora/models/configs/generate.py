"""Write the diffusers configuration folders that load each family's single-file checkpoints offline.

`python -m sdlora.models.configs.generate` rewrites `sdlora/models/configs/<folder>/`. The sizes are the
published architectures of the reference checkpoints (the original repositories' `v1-inference.yaml`,
`v2-inference.yaml`, `v2-inference-v.yaml` and `sd_xl_base.yaml`, which the diffusers repositories
`stable-diffusion-v1-5`, `stable-diffusion-2-base`, `stable-diffusion-2-1` and
`stable-diffusion-xl-base-1.0` restate); the classes fill in every other field with diffusers' and
transformers' own defaults. Models are built on the meta device, so no weights are made.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import diffusers
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig

CONFIGS_DIR = Path(__file__).parent
CLIP_VOCAB_SIZE = 49408

_SCALED_LINEAR = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}
_SD_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
}
_SD_UNET = {
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2,
}
_CLIP_L = {  # OpenAI CLIP ViT-L/14's text tower
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
_OPEN_CLIP_H = {  # OpenCLIP ViT-H/14 without its last layer: SD 2.x reads the penultimate one
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "projection_dim": 512,
    "hidden_act": "gelu",
}
_OPEN_CLIP_BIG_G = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}


def _sd(
    size: int, unet: dict[str, Any], text_encoder: dict[str, Any], scheduler: tuple[str, dict[str, Any]]
) -> dict[str, Any]:
    return {
        "pipeline": "StableDiffusionPipeline",
        "unet": {**_SD_UNET, "sample_size": size // 8, **unet},
        "vae": {**_SD_VAE, "sample_size": size},
        "text_encoders": {"text_encoder": ("CLIPTextModel", text_encoder)},
        "scheduler": scheduler,
        "extra": {
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
        },
        "options": {"requires_safety_checker": False},
    }


FOLDERS: dict[str, dict[str, Any]] = {
    "sd1": _sd(
        512,
        {"cross_attention_dim": 768, "attention_head_dim": 8},
        _CLIP_L,
        ("PNDMScheduler", {**_SCALED_LINEAR, "skip_prk_steps": True, "set_alpha_to_one": False}),
    ),
    "sd2-512": _sd(
        512,
        {"cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True},
        _OPEN_CLIP_H,
        ("DDIMScheduler", {**_SCALED_LINEAR, "clip_sample": False, "set_alpha_to_one": False}),
    ),
    "sd2-768-v": _sd(
        768,
        {  # 2.1 needs attention computed in fp32 (diffusers sets it for 2.1's checkpoints too)
            "cross_attention_dim": 1024,
            "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True,
            "upcast_attention": True,
        },
        _OPEN_CLIP_H,
        (
            "DDIMScheduler",
            {
                **_SCALED_LINEAR,
                "clip_sample": False,
                "set_alpha_to_one": False,
                "prediction_type": "v_prediction",
            },
        ),
    ),
    "sdxl": {
        "pipeline": "StableDiffusionXLPipeline",
        "unet": {
            "sample_size": 128,
            "block_out_channels": (320, 640, 1280),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "layers_per_block": 2,
            "transformer_layers_per_block": (1, 2, 10),
            "attention_head_dim": (5, 10, 20),
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        "vae": {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoders": {
            "text_encoder": ("CLIPTextModel", _CLIP_L),
            "text_encoder_2": ("CLIPTextModelWithProjection", _OPEN_CLIP_BIG_G),
        },
        "scheduler": (
            "EulerDiscreteScheduler",
            {**_SCALED_LINEAR, "interpolation_type": "linear", "timestep_spacing": "leading"},
        ),
        "extra": {"image_encoder": [None, None], "feature_extractor": [None, None]},
        "options": {"force_zeros_for_empty_prompt": True},
    },
}


def write_folder(folder: Path, spec: dict[str, Any]) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    with init_empty_weights():
        UNet2DConditionModel(**spec["unet"]).save_config(folder / "unet")
        AutoencoderKL(**spec["vae"]).save_config(folder / "vae")
    scheduler_name, scheduler_options = spec["scheduler"]
    getattr(diffusers, scheduler_name)(**scheduler_options).save_config(folder / "scheduler")
    index: dict[str, Any] = {
        "_class_name": spec["pipeline"],
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", scheduler_name],
        **spec["extra"],
        **spec["options"],
    }
    for component, (class_name, sizes) in spec["text_encoders"].items():
        config = CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            max_position_embeddings=77,
            bos_token_id=0,  # the values of the reference repositories: transformers' legacy
            eos_token_id=2,  # end-of-text lookup (the highest token id) that they rely on
            pad_token_id=1,
            **sizes,
        )
        config.architectures = [class_name]
        (folder / component).mkdir(parents=True)
        (folder / component / "config.json").write_text(config.to_json_string())
        index[component] = ["transformers", class_name]
        index[component.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def main() -> None:
    for name, spec in FOLDERS.items():
        write_folder(CONFIGS_DIR / name, spec)
        print(f"wrote {CONFIGS_DIR / name}")


if __name__ == "__main__":
    main()
