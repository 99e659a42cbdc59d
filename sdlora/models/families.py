"""The Stable Diffusion families sdlora supports, in one table.

Everything that differs between SD 1.x, SD 2.x and SDXL is a field of `Family`, and each family is one
row of `FAMILIES` (like peft's per-model table of target modules). Other modules look a family up with
`family_of(pipe_or_unet)` or `get_family(name)` and read its fields; they never compare family names.

The rule: adding a family touches this file, and `sdlora.train.conditioning` only if its U-Net is
conditioned in a way no existing `addition_embed_type` describes. Nothing else.

Sizes that vary between checkpoints of one family (the bundled demo model is SD 1.x-shaped at 32 px)
are read from the pipeline itself: `native_resolution(pipe)`, `bucket_step(pipe)`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import MappingProxyType

import torch
from diffusers import DiffusionPipeline

from sdlora.errors import SdloraError

KOHYA_UNET_PREFIX = "lora_unet_"
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' Attention projections in the U-Net
CLIP_ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # transformers' CLIP attention


class UnknownFamilyError(SdloraError, ValueError):
    """The model is none of the families in `FAMILIES`."""


@dataclass(frozen=True)
class TextEncoder:
    component: str  # pipeline attribute
    tokenizer: str  # pipeline attribute of its tokenizer
    kohya_prefix: str  # how kohya/A1111 files name its modules
    width: int  # hidden size
    checkpoint_prefix: str  # its keys' prefix in the original (LDM/SGM) single-file checkpoints
    open_clip: bool = False  # stored there in OpenCLIP's layout (fused qkv) rather than transformers'
    pad_token: str = "<|endoftext|>"  # OpenCLIP's tokenizers pad with "!"


@dataclass(frozen=True)
class Family:
    name: str  # stored in adapter facts ("sd1")
    label: str  # for people
    pipeline_class: str  # diffusers class that loads its single-file checkpoints
    text_encoders: tuple[TextEncoder, ...]
    cross_attention_dim: int  # width of what cross-attention reads: the text encoders' widths side by side
    addition_embed_type: str | None  # the U-Net's extra conditioning (diffusers' config value)
    prediction_type: str  # what the family's reference checkpoints predict; a hint, the scheduler decides
    native_size: int  # nominal training size in pixels; the pipeline's own config decides
    kohya_base_version: str  # kohya's `ss_base_model_version`
    modelspec_architecture: str  # SAI model-spec `modelspec.architecture`, without the `/lora` suffix
    # prediction type -> folder under sdlora/models/configs with the diffusers configs that load its
    # single-file checkpoints offline; the first is the default when a file does not say
    single_file_configs: tuple[tuple[str, str], ...] = ()
    layers_per_block: int = 2  # U-Net layers per down block: kohya's SGM-named blocks are numbered by it
    unet_targets: tuple[str, ...] = ATTENTION_TARGETS
    text_encoder_targets: tuple[str, ...] = CLIP_ATTENTION_TARGETS

    @property
    def components(self) -> tuple[str, ...]:
        """The pipeline parts a LoRA can adapt."""
        return ("unet", *(encoder.component for encoder in self.text_encoders))

    @property
    def kohya_prefixes(self) -> dict[str, str]:
        """component -> kohya key prefix, for writing."""
        return {"unet": KOHYA_UNET_PREFIX, **{e.component: e.kohya_prefix for e in self.text_encoders}}

    @property
    def kohya_v2(self) -> bool:
        """kohya's `ss_v2` flag: an SD 2.x base."""
        return self.kohya_base_version.startswith("sd_v2")

    @property
    def modelspec_prediction_type(self) -> str:
        return "v" if self.prediction_type == "v_prediction" else "epsilon"


_CLIP_L = TextEncoder("text_encoder", "tokenizer", "lora_te_", 768, "cond_stage_model.transformer.")

FAMILIES: MappingProxyType[str, Family] = MappingProxyType(
    {
        family.name: family
        for family in (
            Family(
                name="sd1",
                label="Stable Diffusion 1.x",
                pipeline_class="StableDiffusionPipeline",
                text_encoders=(_CLIP_L,),
                cross_attention_dim=768,
                addition_embed_type=None,
                prediction_type="epsilon",
                native_size=512,
                kohya_base_version="sd_v1",
                modelspec_architecture="stable-diffusion-v1",
                single_file_configs=(("epsilon", "sd1"),),
            ),
            Family(
                name="sd2",
                label="Stable Diffusion 2.x",
                pipeline_class="StableDiffusionPipeline",
                text_encoders=(  # OpenCLIP ViT-H
                    TextEncoder(
                        "text_encoder", "tokenizer", "lora_te_", 1024, "cond_stage_model.model.", True, "!"
                    ),
                ),
                cross_attention_dim=1024,
                addition_embed_type=None,
                prediction_type="v_prediction",  # 2.x-768; the 512 "base" checkpoints predict epsilon
                native_size=768,
                kohya_base_version="sd_v2",
                modelspec_architecture="stable-diffusion-v2-768-v",
                single_file_configs=(("v_prediction", "sd2-768-v"), ("epsilon", "sd2-512")),
            ),
            Family(
                name="sdxl",
                label="Stable Diffusion XL",
                pipeline_class="StableDiffusionXLPipeline",
                text_encoders=(
                    TextEncoder(
                        "text_encoder", "tokenizer", "lora_te1_", 768, "conditioner.embedders.0.transformer."
                    ),
                    TextEncoder(  # OpenCLIP ViT-bigG
                        "text_encoder_2",
                        "tokenizer_2",
                        "lora_te2_",
                        1280,
                        "conditioner.embedders.1.model.",
                        True,
                        "!",
                    ),
                ),
                cross_attention_dim=2048,
                addition_embed_type="text_time",  # pooled text embedding plus size and crop "time ids"
                prediction_type="epsilon",
                native_size=1024,
                kohya_base_version="sdxl_base_v1-0",
                modelspec_architecture="stable-diffusion-xl-v1-base",
                single_file_configs=(("epsilon", "sdxl"),),
            ),
        )
    }
)


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise UnknownFamilyError(f"Unknown model family {name!r}; known: {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def family_of(model: DiffusionPipeline | torch.nn.Module) -> Family:
    """The family of a pipeline or of its U-Net alone, judged from the U-Net's config.

    The extra conditioning (`addition_embed_type`) sets the structure apart; within a structure the
    cross-attention width decides, then the scheduler's prediction type (a pipeline only), then table
    order, so SD 1.x-shaped models of any width (the demo model, tests' tiny ones) are SD 1.x.
    """
    unet = getattr(model, "unet", model)
    config = unet.config
    candidates = [f for f in FAMILIES.values() if f.addition_embed_type == config.get("addition_embed_type")]
    if not candidates:
        raise UnknownFamilyError(
            f"{type(model).__name__} is none of {', '.join(f.label for f in FAMILIES.values())} "
            f"(its U-Net's addition_embed_type is {config.get('addition_embed_type')!r})."
        )
    scheduler = getattr(model, "scheduler", None)
    prediction = scheduler.config.get("prediction_type", "epsilon") if scheduler is not None else None
    for matches in (
        lambda f: f.cross_attention_dim == config.cross_attention_dim,
        lambda f: f.prediction_type == prediction,
    ):
        if found := [f for f in candidates if matches(f)]:
            return found[0]
    return candidates[0]


def family_with_components(components: Iterable[str]) -> Family | None:
    """The first family (in table order) that has all these pipeline parts."""
    wanted = set(components)
    return next((f for f in FAMILIES.values() if wanted <= set(f.components)), None)


def kohya_components() -> dict[str, str]:
    """Every kohya key prefix of every family -> the component it names, for reading."""
    prefixes = {KOHYA_UNET_PREFIX: "unet"}
    for family in FAMILIES.values():
        prefixes.update({e.kohya_prefix: e.component for e in family.text_encoders})
    return prefixes


def native_resolution(pipe: DiffusionPipeline) -> int:
    """The pixel size the base was trained at (512 for SD 1.5, 32 for the demo model)."""
    return int(pipe.unet.config.sample_size) * pipe.vae_scale_factor


def bucket_step(pipe: DiffusionPipeline) -> int:
    """Image sides must be multiples of this so every U-Net down-sampling divides evenly."""
    downsamples = len(pipe.unet.config.block_out_channels) - 1
    return pipe.vae_scale_factor * 2**downsamples
