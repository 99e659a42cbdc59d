"""A tiny, genuinely trained Stable Diffusion model of coloured shapes, shipped with the package.

It lets the LoRA workflow (training, mixing, generating) run offline on a CPU in seconds. The model lives in
:data:`DEMO_MODEL_DIR` as an ordinary diffusers ``StableDiffusionPipeline`` folder; rebuild it with
``python -m sdlora.demo.build``.
"""

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "model"
DEMO_KEYWORD = "demo"


def demo_model_available() -> bool:
    """True when the demo model folder holds a loadable pipeline (it is missing from bare source checkouts)."""
    return (DEMO_MODEL_DIR / "model_index.json").is_file()


def base_spec(text: str | None) -> str | None:
    """A typed base-model choice as the library takes it: empty or 'demo' mean the bundled demo model (None)."""
    text = (text or "").strip()
    return None if text.lower() in ("", DEMO_KEYWORD) else text


def is_demo(text: str | None) -> bool:
    """Whether a typed base-model choice names the bundled demo model (presets are scaled down for it)."""
    spec = base_spec(text)
    return spec is None or Path(spec).resolve() == DEMO_MODEL_DIR


__all__ = ["DEMO_KEYWORD", "DEMO_MODEL_DIR", "base_spec", "demo_model_available", "is_demo"]
