"""The Train form becomes a checked TrainConfig; its mistakes are named in the form's words."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdlora.config import ConfigError
from sdlora.forms import TrainForm, make_config
from sdlora.outputs import Outputs


def form(data_dir: Path | None, **changes) -> TrainForm:
    values = dict(
        folder=str(data_dir),
        name="stars",
        prompt="a sks blob",
        class_prompt="a blob",
        prior=True,
        num_class_images=4,
        rank=4,
        alpha=0,
        steps=10,
        lr=1e-3,
        resolution=0,
        text_encoder=False,
        seed=3,
        sample_every=5,
    )
    values.update(changes)
    return TrainForm(**values)


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
        (dict(rank=0), "--rank"),
    ],
)
def test_form_mistakes_are_named(changes, message, blob_folder, tmp_path):
    with pytest.raises(ConfigError, match=message):
        make_config(form(blob_folder, **changes), None, Outputs(tmp_path))
