"""The Train form becomes a checked TrainConfig; its mistakes are named in the form's words."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sdlora.config import ConfigError, TrainConfig
from sdlora.forms import FORM_FIELDS, OPTION_FIELDS, TrainForm, make_config, option_fields, parse_option
from sdlora.outputs import Outputs
from sdlora.presets import PRESETS, preset_values

OPTIONS = {option.name: option for option in OPTION_FIELDS}


def form(data_dir: Path | None, **changes) -> TrainForm:
    """A form as the page sends it: every option control with its default, numbers as floats."""
    options = {
        o.name: float(o.default) if o.kind in ("int", "float") and o.default is not None else o.default
        for o in OPTION_FIELDS
    }
    options.update(
        num_class_images=4.0, rank=4.0, alpha=None, steps=10.0, lr=1e-3, seed=3.0, sample_every=5.0
    )
    values = dict(folder=str(data_dir), name="stars", prompt="a sks blob", class_prompt="a blob", prior=True)
    for key, value in changes.items():
        (values if key in FORM_FIELDS else options)[key] = value
    return TrainForm(**values, options=options)


def test_the_form_becomes_a_train_config(blob_folder, tmp_path):
    config = make_config(form(blob_folder), "/models/x", Outputs(tmp_path), taken={"stars"})
    assert (config.name, config.class_prompt, config.alpha, config.resolution) == (
        "stars_2",
        "a blob",
        None,
        None,
    )
    assert (config.sample_every, config.sample_prompt, config.outputs) == (5, ["a sks blob"], str(tmp_path))


def test_prior_preservation_off_drops_the_class_prompt(blob_folder, tmp_path):
    assert make_config(form(blob_folder, prior=False), None, Outputs(tmp_path)).class_prompt is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(folder=None), "No training images yet"),
        (dict(prompt=""), "have no caption"),
        (dict(class_prompt=" "), "needs a class prompt"),
        (dict(rank=0), "Rank must be between 1 and 256"),
        (dict(steps=None), "Steps is empty"),
        (dict(lr=None), "Learning rate is empty"),
        (dict(seed=None), "Seed is empty"),
        (dict(steps=2.5), "Steps must be a whole number"),
        (dict(seed=-2), "Seed must not be negative"),
    ],
)
def test_form_mistakes_are_named(changes, message, blob_folder, tmp_path):
    with pytest.raises(ConfigError, match=message):
        make_config(form(blob_folder, **changes), None, Outputs(tmp_path))


def test_every_cli_option_but_the_app_managed_ones_is_a_form_field_with_its_help():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    managed = {"data_dir", "prompt", "base", "name", "out", "class_prompt", "resume", "outputs"}
    assert set(OPTIONS) == names - managed
    assert OPTIONS["snr_gamma"].help == TrainConfig.__dataclass_fields__["snr_gamma"].metadata["help"]
    assert (OPTIONS["lr_scheduler"].kind, OPTIONS["lr_scheduler"].choices) == (
        "choice",
        ("constant", "cosine", "linear"),
    )
    assert (OPTIONS["alpha"].kind, OPTIONS["alpha"].optional) == ("float", True)
    assert OPTIONS["sample_prompt"].kind == "lines"
    assert OPTIONS["quantize_base"].choices == ("none", "nf4", "int8")
    assert OPTIONS["log_with"].choices == ("none", "tensorboard")


def test_a_new_option_appears_by_itself():
    from sdlora.config import option

    @dataclasses.dataclass
    class Wider(TrainConfig):
        ema_decay: float | None = option(None, "EMA of the adapter weights.")

    (new,) = [o for o in option_fields(Wider) if o.name == "ema_decay"]
    assert (new.label, new.help, new.kind, new.optional) == (
        "Ema decay",
        "EMA of the adapter weights.",
        "float",
        True,
    )


def test_empty_optional_fields_mean_the_default_and_lines_become_lists():
    assert parse_option(OPTIONS["alpha"], None) is None and parse_option(OPTIONS["resolution"], "") is None
    assert parse_option(OPTIONS["text_encoder_lr"], 0.0) is None  # what a browser's empty number box may send
    assert parse_option(OPTIONS["sample_prompt"], "a star\n\n  a  circle ") == ["a star", "a circle"]
    assert parse_option(OPTIONS["steps"], 40.0) == 40 and isinstance(
        parse_option(OPTIONS["steps"], 40.0), int
    )


def test_seed_minus_one_draws_a_seed_and_the_config_records_it(blob_folder, tmp_path):
    seeds = {make_config(form(blob_folder, seed=-1.0), None, Outputs(tmp_path)).seed for _ in range(5)}
    assert all(seed >= 0 for seed in seeds) and len(seeds) > 1


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_value_is_a_form_field_and_the_form_trains_exactly_it(preset, blob_folder, tmp_path):
    values = preset_values(preset, "demo")
    assert set(values) <= set(OPTIONS)
    config = make_config(form(blob_folder, **values), None, Outputs(tmp_path))
    assert {key: getattr(config, key) for key in values} == values
