"""Base models: loading them (hub ids, local folders, single files, the demo model) and the family table."""

from sdlora.models.families import (
    FAMILIES,
    Family,
    TextEncoder,
    UnknownFamilyError,
    bucket_step,
    family_of,
    get_family,
    native_resolution,
)
from sdlora.models.loading import BaseModelError, base_label, load_base, resolve_base

__all__ = [
    "FAMILIES",
    "BaseModelError",
    "Family",
    "TextEncoder",
    "UnknownFamilyError",
    "base_label",
    "bucket_step",
    "family_of",
    "get_family",
    "load_base",
    "native_resolution",
    "resolve_base",
]
