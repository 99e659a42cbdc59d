"""Base models: loading them (hub ids, local folders, single files, the demo model), writing single files,
and the family table."""

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
from sdlora.models.single_file import SingleFileError, load_single_file, save_single_file

__all__ = [
    "FAMILIES",
    "BaseModelError",
    "Family",
    "SingleFileError",
    "TextEncoder",
    "UnknownFamilyError",
    "base_label",
    "bucket_step",
    "family_of",
    "get_family",
    "load_base",
    "load_single_file",
    "native_resolution",
    "resolve_base",
    "save_single_file",
]
