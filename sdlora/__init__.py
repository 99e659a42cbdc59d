"""sdlora: train Stable Diffusion LoRA adapters and generate with them."""

__version__ = "0.1.0"
