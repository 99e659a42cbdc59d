"""Generation: one base pipeline, named adapters stacked at weights, comparisons and sweeps, fusing."""

from sdlora.generate.fuse import fuse_into_base
from sdlora.generate.generator import SCHEDULERS, GenerationParams, Generator
from sdlora.generate.grids import Axis, crossfade, xy_plot
from sdlora.generate.images import image_grid, image_history, labeled_parameters, read_parameters, save_png

__all__ = [
    "Axis",
    "crossfade",
    "fuse_into_base",
    "GenerationParams",
    "Generator",
    "image_grid",
    "image_history",
    "labeled_parameters",
    "read_parameters",
    "save_png",
    "SCHEDULERS",
    "xy_plot",
]
