"""Presets: one table of TrainConfig settings per kind of adapter, scaled down for the demo model."""

from __future__ import annotations

import dataclasses

import pytest

from sdlora.config import ConfigError, TrainConfig
from sdlora.forms import FORM_FIELDS
from sdlora.presets import PRESETS, preset_name, preset_values


def test_every_preset_setting_is_a_train_config_option_and_a_form_field():
    options = {f.name for f in dataclasses.fields(TrainConfig)}
    for preset in PRESETS.values():
        assert set(preset.settings) <= options and set(preset.settings) <= set(FORM_FIELDS)


def test_presets_keep_their_values_for_a_real_base():
    real = preset_values("Subject", demo=False)
    assert (real["steps"], real["lr"], real["num_class_images"]) == (400, 1e-4, 50)
    assert PRESETS["Subject"].prior and not PRESETS["Style"].prior


def test_presets_shrink_for_the_demo_model():
    demo = preset_values("Subject", demo=True)
    assert (demo["steps"], demo["lr"], demo["num_class_images"]) == (300, 1e-3, 16)


def test_an_unknown_preset_is_refused_by_name():
    with pytest.raises(ConfigError, match="No preset called 'Portrait'.*Subject, Style, Quick test"):
        preset_values("Portrait", demo=False)


@pytest.mark.parametrize(("text", "name"), [("quick-test", "Quick test"), ("STYLE", "Style"), ("x", "x")])
def test_preset_names_are_matched_loosely(text, name):
    assert preset_name(text) == name
