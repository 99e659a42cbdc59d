"""A tiny, genuinely trained Stable Diffusion model of coloured shapes, shipped with the package.

It lets the LoRA workflow (training, mixing, generating) run offline on a CPU in seconds. The model lives in
:data:`DEMO_MODEL_DIR` as an ordinary diffusers ``StableDiffusionPipeline`` folder; rebuild it with
``python -m sdlora.demo.build``.
"""

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "model"


def demo_model_available() -> bool:
    """True when the demo model folder holds a loadable pipeline (it is missing from bare source checkouts)."""
    return (DEMO_MODEL_DIR / "model_index.json").is_file()


__all__ = ["DEMO_MODEL_DIR", "demo_model_available"]
