"""Help texts and choices of the page's controls, read from the library's config dataclasses.

The CLI's flags are made from the same field metadata, so the page and `sdlora --help` never disagree.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def option_help(cls: type, name: str) -> str:
    return _field(cls, name).metadata["help"]


def option_choices(cls: type, name: str) -> list[Any]:
    return list(_field(cls, name).metadata["choices"] or ())


def option_default(cls: type, name: str) -> Any:
    return _field(cls, name).default
