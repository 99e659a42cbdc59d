"""Named starting points for training, per base family: every setting one kind of adapter needs.

The app's preset menu, `sdlora train --preset` and the learning tests read this one table, so the
settings a user starts from are the ones proven to learn the shipped examples on the demo model.
Prompts, names and data stay the user's own, and anything set explicitly overrides a preset.

The values for real bases follow what kohya_ss, OneTrainer and the diffusers DreamBooth scripts
start from (rank 16-32 with alpha half the rank, AdamW at 1e-4, min-SNR 5, a checkpoint every
10% of the steps); the demo model's are the recipe `tests/test_learning.py` proves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdlora.config import ConfigError
from sdlora.demo import base_spec, is_demo

FAMILIES = ("demo", "sd1", "sd2", "sdxl")


@dataclass(frozen=True)
class Preset:
    """One kind of adapter: a line of help, whether it is meant with prior preservation (a class
    prompt), and its TrainConfig settings per base family."""

    help: str
    prior: bool
    per_family: dict[str, dict[str, Any]]

    @property
    def settings(self) -> dict[str, Any]:
        """The settings of the first family (the demo model), for the names of the fields a preset sets."""
        return next(iter(self.per_family.values()))


def _every_tenth(settings: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint and samples every 10% of the steps: a killed run loses at most a tenth."""
    tenth = max(1, settings["steps"] // 10)
    return {**settings, "save_every": tenth, "sample_every": max(tenth, settings["steps"] // 4)}


# Every preset sets the network type and caption dropout too, so switching presets resets them.
_COMMON = dict(network="lora", caption_dropout=0.0, snr_gamma=5.0, text_encoder=False)
_DEMO = dict(_COMMON, rank=4, alpha=4, lr=1e-3, batch_size=4)
_SD = dict(_COMMON, rank=16, alpha=8, lr=1e-4, batch_size=2)
_SDXL = dict(_COMMON, rank=16, alpha=8, lr=1e-4, batch_size=1, grad_accum=2)


def _per_family(demo: dict, sd: dict, sdxl: dict) -> dict[str, dict[str, Any]]:
    return {
        "demo": _every_tenth({**_DEMO, **demo}),
        "sd1": _every_tenth({**_SD, **sd}),
        "sd2": _every_tenth({**_SD, **sd}),
        "sdxl": _every_tenth({**_SDXL, **sdxl}),
    }


PRESETS: dict[str, Preset] = {
    "Subject": Preset(
        "one person, pet or object, kept apart from its class",
        prior=True,
        per_family=_per_family(
            # Captions dropped on 10% of the steps train the empty prompt too: without that, the
            # prior loss let the adapter's unconditional prediction drift, and guidance then drew
            # red fragments instead of the star (star distance 0.279 -> 0.103, base 0.211, an earlier
            # model). 600 steps, not 400: with the class images sharing every batch, 400 left the
            # star in fragments on this model (0.285, base 0.321; 600: 0.145, 0.257, 0.167 on seeds 0-2).
            demo=dict(steps=600, num_class_images=16, caption_dropout=0.1),
            sd=dict(steps=1200, num_class_images=100),
            sdxl=dict(steps=1500, num_class_images=100),
        ),
    ),
    "Style": Preset(
        "a look or a medium, applied to anything",
        prior=False,
        per_family=_per_family(
            # LoCon (the resnets' convolutions too): with attention alone the outlines stayed
            # filled (interior ink 0.45); with it every circle and square is hollow. Captions dropped
            # on 10% of the steps, as for Subject: a style trained on plain captions moved only the
            # captioned prediction, guidance amplified the gap, and the dark style came out as blobs.
            demo=dict(steps=400, num_class_images=16, network="locon", caption_dropout=0.1),
            sd=dict(steps=2000, rank=32, alpha=16, num_class_images=100),
            sdxl=dict(steps=2500, rank=32, alpha=16, num_class_images=100),
        ),
    ),
    "Quick test": Preset(
        "a few fast steps to check the data and settings",
        prior=False,
        per_family=_per_family(
            demo=dict(steps=20, num_class_images=4),
            sd=dict(steps=50, rank=4, alpha=4, num_class_images=4),
            sdxl=dict(steps=50, rank=4, alpha=4, num_class_images=4),
        ),
    ),
}


def preset_name(text: str) -> str:
    """The preset `text` names, ignoring case and with '-' or '_' for spaces ('quick-test' -> 'Quick test');
    unknown names come back unchanged for the caller to refuse."""
    wanted = text.strip().lower().replace("-", " ").replace("_", " ")
    return next((name for name in PRESETS if name.lower() == wanted), text)


def preset_values(name: str, family: str) -> dict[str, Any]:
    """A preset's TrainConfig settings for a base of `family` ('demo', 'sd1', 'sd2' or 'sdxl')."""
    if name not in PRESETS:
        raise ConfigError(f"No preset called {name!r}; the presets are {', '.join(PRESETS)}.")
    per_family = PRESETS[name].per_family
    return dict(per_family.get(family, per_family["sd1"]))


def preset_family(base: str | None) -> str:
    """Which family's preset values suit a typed base, without loading it: the demo model; a diffusers
    folder by its U-Net's cross-attention width; else a name mentioning XL; else SD 1.x."""
    if is_demo(base):
        return "demo"
    spec = base_spec(base) or ""
    config = Path(spec) / "unet" / "config.json"
    if config.is_file():
        from sdlora.models.families import FAMILIES as MODEL_FAMILIES  # here: it imports diffusers

        width = json.loads(config.read_text()).get("cross_attention_dim")
        return next((f.name for f in MODEL_FAMILIES.values() if f.cross_attention_dim == width), "sd1")
    return "sdxl" if "xl" in spec.lower() else "sd1"
