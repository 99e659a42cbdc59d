"""Loading base models: hub ids, local diffusers folders, single-file checkpoints, the bundled demo model."""

from sdlora.models.loading import (
    BaseModelError,
    ModelFamily,
    base_label,
    bucket_step,
    load_base,
    model_family,
    native_resolution,
    resolve_base,
)

__all__ = [
    "BaseModelError",
    "ModelFamily",
    "base_label",
    "bucket_step",
    "load_base",
    "model_family",
    "native_resolution",
    "resolve_base",
]
