"""Turning a user's base-model spec into a Stable Diffusion pipeline."""

from __future__ import annotations

import json
import logging
from enum import StrEnum
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from sdlora.demo import DEMO_MODEL_DIR
from sdlora.errors import SdloraError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class BaseModelError(SdloraError, ValueError):
    """The base model can't be loaded; the message says what was tried and what to do."""


class ModelFamily(StrEnum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"


def resolve_base(spec: str | None) -> str:
    """The base to use: the spec as given, or the bundled demo model when none is given."""
    if spec:
        return spec
    if not (DEMO_MODEL_DIR / "model_index.json").is_file():
        raise BaseModelError(
            f"No --base given and the bundled demo model is missing from {DEMO_MODEL_DIR}. "
            "Build it with `sdlora demo-model build`, or pass --base (a hub id, a diffusers folder "
            "or a .safetensors checkpoint)."
        )
    return str(DEMO_MODEL_DIR)


def load_base(spec: str | None = None, *, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """Load a Stable Diffusion pipeline from a hub id, a local diffusers folder or a single .safetensors file.

    Only safetensors weights are read from local files; pickled checkpoints are refused.
    """
    spec = resolve_base(spec)
    path = Path(spec).expanduser()
    common = {"dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BaseModelError(f"{path} is a folder but not a diffusers pipeline (no model_index.json).")
        if "safety_checker" not in json.loads((path / "model_index.json").read_text()):
            common = {"dtype": dtype}  # SDXL and others have no safety checker to switch off
        try:
            pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True, **common)
        except (OSError, ValueError) as error:
            raise BaseModelError(f"Could not load the diffusers folder {path}: {error}") from error
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        raise BaseModelError(
            f"{path}: pickled checkpoints ({', '.join(PICKLE_SUFFIXES)}) can run code when loaded and are refused. "
            "Convert it to .safetensors or use a diffusers folder."
        )
    elif path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise BaseModelError(f"Checkpoint file {path} does not exist.")
        pipe = _load_single_file(path, common)
    else:
        pipe = _load_from_hub(spec, common)
    pipe.set_progress_bar_config(disable=True)
    if model_family(pipe) is ModelFamily.SDXL:
        log.info("SDXL base detected")
    return pipe


def _load_single_file(path: Path, common: dict) -> DiffusionPipeline:
    try:
        return StableDiffusionPipeline.from_single_file(str(path), **common)
    except Exception as first_error:  # noqa: BLE001 - diffusers raises many kinds here
        try:
            from diffusers import StableDiffusionXLPipeline

            return StableDiffusionXLPipeline.from_single_file(str(path), dtype=common["dtype"])
        except Exception:  # noqa: BLE001
            raise BaseModelError(
                f"Could not load the single-file checkpoint {path} as Stable Diffusion 1.x/2.x or SDXL: {first_error}"
            ) from first_error


def _load_from_hub(spec: str, common: dict) -> DiffusionPipeline:
    try:
        return DiffusionPipeline.from_pretrained(spec, use_safetensors=True, **common)
    except Exception as error:  # noqa: BLE001 - network, auth and missing-repo errors all end here
        raise BaseModelError(
            f"Could not load base model {spec!r}. Tried: a local folder (none at {Path(spec).resolve()}), "
            f"a .safetensors file (not a file path), and the Hugging Face hub ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no answer'}). "
            "If you have no network, download the model elsewhere and pass --base /path/to/diffusers-folder "
            "or --base /path/to/model.safetensors; leave --base out to use the bundled demo model."
        ) from error


def base_label(spec: str) -> str:
    """A short name for a base in tables and image parameters: 'demo' for the bundled model, else the
    last part of its path or hub id."""
    return "demo" if Path(spec).resolve() == DEMO_MODEL_DIR else Path(spec).name


def model_family(pipe: DiffusionPipeline) -> ModelFamily:
    """SD 1.x, SD 2.x or SDXL, judged from the pipeline's parts."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return ModelFamily.SDXL
    cross_dim = pipe.unet.config.cross_attention_dim
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if cross_dim == 1024 or prediction == "v_prediction":
        return ModelFamily.SD2
    return ModelFamily.SD1


def native_resolution(pipe: DiffusionPipeline) -> int:
    """The pixel size the base was trained at (512 for SD 1.5, 32 for the demo model)."""
    return int(pipe.unet.config.sample_size) * pipe.vae_scale_factor


def bucket_step(pipe: DiffusionPipeline) -> int:
    """Image sides must be multiples of this so every U-Net down-sampling divides evenly."""
    downsamples = len(pipe.unet.config.block_out_channels) - 1
    return pipe.vae_scale_factor * 2**downsamples
