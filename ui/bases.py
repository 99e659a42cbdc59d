"""The page's base-model field: what its text means, and how the page says which model is in use."""

from __future__ import annotations

from pathlib import Path

from sdlora.demo import DEMO_MODEL_DIR, demo_model_available
from sdlora.models import base_label

DEMO_KEYWORD = "demo"

__all__ = ["DEMO_KEYWORD", "base_label", "base_notice", "base_spec", "is_demo"]


def base_spec(text: str | None) -> str | None:
    """The page's base-model field as the library takes it: empty or 'demo' mean the bundled demo model."""
    text = (text or "").strip()
    return None if text.lower() in ("", DEMO_KEYWORD) else text


def is_demo(text: str | None) -> bool:
    spec = base_spec(text)
    return spec is None or Path(spec).resolve() == DEMO_MODEL_DIR


def base_notice(text: str | None) -> str:
    """The page's plain statement of which base model is in use, and how to use a real one."""
    how = (
        "To use a real model, enter a Hugging Face hub id (e.g. `stable-diffusion-v1-5/stable-diffusion-v1-5`), "
        "a local diffusers folder or a single `.safetensors` checkpoint above and press **Load**."
    )
    if not is_demo(text):
        return f"Base model: `{base_spec(text)}`. Leave the field empty (or type `demo`) for the bundled demo model."
    if not demo_model_available():
        return (
            f"**The bundled demo model is missing** from `{DEMO_MODEL_DIR}`: build it with "
            f"`sdlora demo-model build`. {how}"
        )
    return (
        "**Using the bundled demo model**: a tiny model that only draws simple coloured shapes at 32×32 px, "
        f"so training and generating run in seconds on a CPU. {how}"
    )
