"""Generation: one base pipeline, named adapters stacked at weights, comparisons and sweeps, fusing."""

from sdlora.generate.fuse import fuse_into_base
from sdlora.generate.generator import SCHEDULERS, GenerationParams, Generator
from sdlora.generate.images import image_grid, labeled_parameters, save_png

__all__ = [
    "SCHEDULERS",
    "GenerationParams",
    "Generator",
    "fuse_into_base",
    "image_grid",
    "labeled_parameters",
    "save_png",
]
