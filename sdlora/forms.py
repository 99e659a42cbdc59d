"""A training form (what a person fills in to start a job) turned into a checked `TrainConfig`.

The app's Train tab passes its fields in `FORM_FIELDS` order; numbers arrive as floats, as form controls
give them. Mistakes are explained in the form's words (its images, captions and checkboxes), not as flags.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sdlora.adapters.library import unique_name
from sdlora.config import ConfigError, TrainConfig
from sdlora.data.uploads import caption_rows
from sdlora.outputs import Outputs


@dataclass
class TrainForm:
    """The Train tab's fields, in the order the page passes them (`FORM_FIELDS`)."""

    folder: str | None
    name: str
    prompt: str
    class_prompt: str
    prior: bool
    num_class_images: float
    rank: float
    alpha: float
    steps: float
    lr: float
    resolution: float
    text_encoder: bool
    seed: float
    sample_every: float


FORM_FIELDS = tuple(f.name for f in dataclasses.fields(TrainForm))


def make_config(
    form: TrainForm, base: str | None, outputs: Outputs, taken: Iterable[str] = ()
) -> TrainConfig:
    """The TrainConfig for a form; ConfigError says in the form's words what is missing or wrong.

    The adapter name is made free of existing adapters and of `taken` (names queued jobs will write)."""
    rows = caption_rows(form.folder)
    if not rows:
        raise ConfigError("No training images yet: drop a folder of images or a .zip first.")
    prompt = " ".join((form.prompt or "").split())
    uncaptioned = [name for name, caption in rows if not caption]
    if uncaptioned and not prompt:
        raise ConfigError(
            f"{len(uncaptioned)} image(s) have no caption (e.g. {uncaptioned[0]}): write captions "
            "in the table or fill in the instance prompt."
        )
    class_prompt = " ".join((form.class_prompt or "").split())
    if form.prior and not class_prompt:
        raise ConfigError(
            "Prior preservation needs a class prompt (e.g. 'a photo of a dog'), or turn it off."
        )
    sample_prompt = prompt or rows[0][1]
    config = TrainConfig(
        data_dir=str(form.folder),
        prompt=prompt or None,
        base=base,
        name=unique_name(outputs, form.name or Path(str(form.folder)).name, taken),
        class_prompt=class_prompt if form.prior else None,
        num_class_images=int(form.num_class_images),
        rank=int(form.rank),
        alpha=float(form.alpha) or None,
        steps=int(form.steps),
        lr=float(form.lr),
        resolution=int(form.resolution) or None,
        text_encoder=bool(form.text_encoder),
        seed=int(form.seed),
        sample_every=int(form.sample_every),
        sample_prompt=[sample_prompt] if form.sample_every else [],
        outputs=str(outputs.root),
    )
    config.validate()
    return config
