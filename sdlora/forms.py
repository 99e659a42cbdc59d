"""A training form (what a person fills in to start a job) turned into a checked `TrainConfig`.

Every TrainConfig option the app offers comes from `option_fields`, read from the config's field metadata:
the same names, help and choices as `sdlora train --help`, so an option added to TrainConfig appears in
the form by itself. Values arrive as form controls give them (floats, None for an emptied box) and
mistakes are explained in the form's words ("Steps is empty"), never as a Python message.
"""

from __future__ import annotations

import dataclasses
import random
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdlora.adapters.library import unique_name
from sdlora.config import ConfigError, TrainConfig
from sdlora.data.uploads import caption_rows
from sdlora.outputs import Outputs

# Options the form sets in its own words (folder, name, prompts) or that the app manages (where files go,
# resuming from the Runs tab): not offered as option fields.
APP_MANAGED = frozenset({"data_dir", "prompt", "base", "name", "out", "class_prompt", "resume", "outputs"})
# Shown at the top of the form; the rest go in the Advanced section.
MAIN_OPTIONS = (
    "steps",
    "rank",
    "alpha",
    "lr",
    "batch_size",
    "seed",
    "num_class_images",
    "sample_every",
    "save_every",
)
RANDOM_SEED = -1  # as in AUTOMATIC1111: draw one, and record the one drawn
_LABELS = {
    "lr": "Learning rate",
    "lr_scheduler": "Learning-rate schedule",
    "text_encoder_lr": "Text-encoder learning rate",
    "snr_gamma": "Min-SNR gamma",
    "num_class_images": "Class images",
    "sample_every": "Sample every N steps",
    "save_every": "Checkpoint every N steps",
    "grad_accum": "Gradient accumulation steps",
    "tf32": "TF32",
    "text_encoder": "Text-encoder LoRA",
    "max_grad_norm": "Max gradient norm",
    "sample_prompt": "Sample prompts",
}


@dataclass(frozen=True)
class OptionField:
    """One TrainConfig option as a form shows it. `kind` is int, float, bool, choice, text or lines (a
    list, one item per line); `optional` options may be left empty for their default."""

    name: str
    label: str
    help: str
    kind: str
    default: Any
    optional: bool
    choices: tuple = ()


def option_fields(cls: type = TrainConfig) -> list[OptionField]:
    """The form fields of every option a person sets, in the config's order."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        if f.name in APP_MANAGED:
            continue
        kind, optional = _kind(hints[f.name])
        choices = tuple(f.metadata.get("choices") or ())
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        found.append(
            OptionField(
                name=f.name,
                label=_LABELS.get(f.name, f.name.replace("_", " ").capitalize()),
                help=f.metadata.get("help", ""),
                kind="choice" if choices else kind,
                default=default,
                optional=optional,
                choices=choices,
            )
        )
    return found


def _kind(hint: Any) -> tuple[str, bool]:
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        return "lines", optional
    return {bool: "bool", int: "int", float: "float"}.get(hint, "text"), optional


def parse_option(option: OptionField, raw: Any) -> Any:
    """A control's value as the option's type; an empty box (or 0) is its default when the option may be
    empty, else a ConfigError naming the field."""
    if option.kind == "bool":
        return bool(raw)
    if option.kind == "lines":
        lines = raw.splitlines() if isinstance(raw, str) else list(raw or [])
        return [" ".join(str(line).split()) for line in lines if str(line).strip()]
    if option.optional and option.kind in ("int", "float") and raw == 0:
        raw = None  # a browser's number box may send 0 for an empty one: 0 means the default here
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        if option.optional:
            return None
        if option.kind in ("int", "float"):
            raise ConfigError(f"{option.label} is empty: enter a number (the default is {option.default}).")
        raise ConfigError(f"{option.label} is empty: choose a value.")
    if option.kind in ("int", "float"):
        try:
            number = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{option.label} must be a number, not {raw!r}.") from None
        if option.kind == "int":
            if number != int(number):
                raise ConfigError(f"{option.label} must be a whole number, not {raw}.")
            return int(number)
        return number
    return str(raw).strip()


OPTION_FIELDS = option_fields()


@dataclass
class TrainForm:
    """The Train tab's fields: the training folder, name, prompts, prior preservation, and the value of
    each `OPTION_FIELDS` control by option name."""

    folder: str | None
    name: str
    prompt: str
    class_prompt: str
    prior: bool
    options: dict[str, Any] = field(default_factory=dict)


FORM_FIELDS = ("folder", "name", "prompt", "class_prompt", "prior")


def make_config(
    form: TrainForm, base: str | None, outputs: Outputs, taken: Iterable[str] = ()
) -> TrainConfig:
    """The TrainConfig for a form; ConfigError says in the form's words what is missing or wrong.

    The adapter name is made free of existing adapters and of `taken` (names queued jobs will write).
    Seed -1 becomes a drawn seed, which the config (and so the run's config.json) records."""
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
    options = {f.name: parse_option(f, form.options[f.name]) for f in OPTION_FIELDS if f.name in form.options}
    if options.get("seed") == RANDOM_SEED:
        options["seed"] = random.SystemRandom().randrange(2**31)
    if options.get("sample_every") and not options.get("sample_prompt"):
        options["sample_prompt"] = [prompt or rows[0][1]]
    if not form.prior:
        options.pop("class_dir", None)
        options.pop("prior_weight", None)
    config = TrainConfig(
        data_dir=str(form.folder),
        prompt=prompt or None,
        base=base,
        name=unique_name(outputs, form.name or Path(str(form.folder)).name, taken),
        class_prompt=class_prompt if form.prior else None,
        outputs=str(outputs.root),
        **options,
    )
    try:
        config.validate()
    except ConfigError as error:
        raise ConfigError(in_form_words(str(error))) from None
    return config


def in_form_words(message: str) -> str:
    """A config message with its CLI flags ('--rank') named as the form labels them ('Rank')."""
    labels = {f"--{f.name.replace('_', '-')}": f.label for f in OPTION_FIELDS}
    return re.sub(r"--[a-z0-9-]+", lambda m: labels.get(m.group(0), m.group(0)), message)
