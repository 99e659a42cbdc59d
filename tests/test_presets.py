"""Presets: one table of TrainConfig settings per kind of adapter, scaled down for the demo model."""

from __future__ import annotations

import dataclasses

import pytest

from sdlora.config import ConfigError, TrainConfig
from sdlora.presets import FAMILIES, PRESETS, preset_family, preset_name, preset_values


def test_every_preset_setting_is_a_train_config_option():
    options = {f.name for f in dataclasses.fields(TrainConfig)}
    for preset in PRESETS.values():
        for family in FAMILIES:
            assert set(preset.per_family[family]) <= options, (preset, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_preset_is_complete_for_every_family(family):
    """Batch size, min-SNR, rank, alpha, lr, steps, class images and a checkpoint every 10%."""
    for name in PRESETS:
        values = preset_values(name, family)
        assert {"batch_size", "snr_gamma", "rank", "alpha", "lr", "steps", "num_class_images"} <= set(values)
        assert values["save_every"] == max(1, values["steps"] // 10)
        TrainConfig(data_dir=".", **values).validate()


def test_the_demo_presets_are_the_recipe_the_learning_tests_prove():
    demo = preset_values("Subject", "demo")
    assert (demo["rank"], demo["batch_size"], demo["snr_gamma"], demo["steps"], demo["lr"]) == (
        4,
        4,
        5.0,
        600,
        1e-3,
    )
    assert PRESETS["Subject"].prior and not PRESETS["Style"].prior


def test_real_bases_get_their_own_values():
    assert (
        preset_values("Subject", "sd1")["lr"] == 1e-4 and preset_values("Subject", "sdxl")["batch_size"] == 1
    )
    assert preset_values("Style", "sd1")["rank"] == 32


def test_the_family_is_read_from_the_base_without_loading_it(tiny_base):
    assert preset_family(None) == preset_family("demo") == "demo"
    assert preset_family("stabilityai/stable-diffusion-xl-base-1.0") == "sdxl"
    assert preset_family("/nowhere/model.safetensors") == "sd1"
    assert preset_family(tiny_base) == "sd1"  # a 32-wide U-Net is no known family: SD 1.x values


def test_an_unknown_preset_is_refused_by_name():
    with pytest.raises(ConfigError, match="No preset called 'Portrait'.*Subject, Style, Quick test"):
        preset_values("Portrait", "sd1")


@pytest.mark.parametrize(("text", "name"), [("quick-test", "Quick test"), ("STYLE", "Style"), ("x", "x")])
def test_preset_names_are_matched_loosely(text, name):
    assert preset_name(text) == name


@pytest.mark.parametrize("family", FAMILIES)
def test_switching_presets_resets_everything_a_preset_sets(family):
    """The app leaves fields a preset doesn't name as they are, so every preset of a family names the
    same fields: picking Subject after Style gives LoRA again, not Style's LoCon."""
    fields = {name: frozenset(preset_values(name, family)) for name in PRESETS}
    assert len(set(fields.values())) == 1, fields
    assert preset_values("Subject", family)["network"] == "lora"
