"""Named starting points for training: the settings that suit one kind of adapter.

The app's preset buttons and `sdlora train --preset` read this one table; prompts, names and data stay
the user's own, and anything set explicitly overrides a preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdlora.config import ConfigError


@dataclass(frozen=True)
class Preset:
    """TrainConfig settings for one kind of adapter; `prior`: meant with prior preservation (a class prompt)."""

    help: str
    prior: bool
    settings: dict[str, Any]


PRESETS: dict[str, Preset] = {
    "Subject": Preset(
        "one person, pet or object, kept apart from its class",
        prior=True,
        settings=dict(
            num_class_images=50, rank=8, alpha=8, steps=400, lr=1e-4, text_encoder=False, sample_every=100
        ),
    ),
    "Style": Preset(
        "a look or a medium, applied to anything",
        prior=False,
        settings=dict(
            num_class_images=50, rank=16, alpha=16, steps=1000, lr=1e-4, text_encoder=False, sample_every=200
        ),
    ),
    "Quick test": Preset(
        "a few fast steps to check the data and settings",
        prior=False,
        settings=dict(
            num_class_images=4, rank=4, alpha=4, steps=20, lr=1e-3, text_encoder=False, sample_every=10
        ),
    ),
}
# The bundled demo model is tiny (32 px): it learns in a few hundred steps at a higher rate, and its
# class images are quick to make, so fewer are needed.
DEMO_LIMITS = dict(steps=300, num_class_images=16)
DEMO_MIN_LR = 1e-3


def preset_name(text: str) -> str:
    """The preset `text` names, ignoring case and with '-' or '_' for spaces ('quick-test' -> 'Quick test');
    unknown names come back unchanged for the caller to refuse."""
    wanted = text.strip().lower().replace("-", " ").replace("_", " ")
    return next((name for name in PRESETS if name.lower() == wanted), text)


def preset_values(name: str, demo: bool) -> dict[str, Any]:
    """A preset's TrainConfig settings, scaled down for the demo model."""
    if name not in PRESETS:
        raise ConfigError(f"No preset called {name!r}; the presets are {', '.join(PRESETS)}.")
    values = dict(PRESETS[name].settings)
    if demo:
        for key, limit in DEMO_LIMITS.items():
            values[key] = min(values[key], limit)
        values["lr"] = max(values["lr"], DEMO_MIN_LR)
    return values
