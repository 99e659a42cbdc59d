"""Turning a user's base-model spec into a Stable Diffusion pipeline."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from sdlora.demo import DEMO_MODEL_DIR
from sdlora.errors import SdloraError
from sdlora.models.families import UnknownFamilyError, family_of
from sdlora.models.quantization import QUANTIZED_COMPONENTS, pipeline_quantization
from sdlora.models.single_file import SingleFileError, load_single_file

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class BaseModelError(SdloraError, ValueError):
    """The base model can't be loaded; the message says what was tried and what to do."""


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


def load_base(
    spec: str | None = None,
    *,
    dtype: torch.dtype | dict[str, torch.dtype] = torch.float32,
    prediction_type: str | None = None,
    quantize: str = "none",
) -> DiffusionPipeline:
    """Load a Stable Diffusion pipeline from a hub id, a local diffusers folder or a single .safetensors file.

    Only safetensors weights are read from local files; pickled checkpoints are refused. Single files
    load without a network; `prediction_type` ("epsilon" or "v_prediction") overrides what such a file
    says it predicts (an SD 2.x file that says nothing is taken to be 768-v). `dtype` may be diffusers'
    per-component dict ({"vae": ..., "default": ...}). `quantize` ('nf4', 'int8') loads the U-Net and text
    encoders quantized, computing in their dtype (see `sdlora.models.quantization`).
    """
    spec = resolve_base(spec)
    path = Path(spec).expanduser()
    common = {"dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    components = QUANTIZED_COMPONENTS  # a hub pipeline's are known once loaded; absent ones are skipped
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BaseModelError(f"{path} is a folder but not a diffusers pipeline (no model_index.json).")
        index = json.loads((path / "model_index.json").read_text())
        components = tuple(index)
        if "safety_checker" not in index:
            common = {"dtype": dtype}  # SDXL and others have no safety checker to switch off
    if quantize != "none":
        if path.suffix.lower() == ".safetensors":
            raise BaseModelError(
                f"--quantize-base loads a diffusers folder or hub id, not a single file ({path.name}): "
                "save it as a diffusers folder first, or train without --quantize-base."
            )
        compute_dtype = dtype.get("default", torch.float32) if isinstance(dtype, dict) else dtype
        common["quantization_config"] = pipeline_quantization(quantize, compute_dtype, components)
    if path.is_dir():
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
        pipe = _load_single_file(path, common, prediction_type)
    else:
        pipe = _load_from_hub(spec, common)
    pipe.set_progress_bar_config(disable=True)
    try:
        log.info("%s base", family_of(pipe).label)
    except UnknownFamilyError as error:
        raise BaseModelError(f"{spec}: {error} sdlora trains and runs LoRAs for these only.") from error
    return pipe


def _load_single_file(path: Path, common: dict, prediction_type: str | None) -> DiffusionPipeline:
    """An original-layout checkpoint, offline: sdlora ships the configs and tokenizers it needs."""
    options = {k: v for k, v in common.items() if k != "dtype"}
    try:
        return load_single_file(path, dtype=common["dtype"], prediction_type=prediction_type, **options)
    except SingleFileError as error:
        raise BaseModelError(f"Could not load the single-file checkpoint {path}: {error}") from error


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
