"""The app's shared generator: form values to parameters, library adapters by name, PNGs under images/."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdlora.adapters import AdapterError
from sdlora.config import ConfigError, parse_weights
from sdlora.demo import DEMO_MODEL_DIR, base_spec
from sdlora.generate.studio import Studio, make_params
from sdlora.models import base_label
from sdlora.outputs import Outputs
from sdlora.train import train
from tests.conftest import train_config


def test_base_spec_reads_empty_and_demo_as_the_demo_model():
    assert base_spec(" demo ") is None and base_spec("") is None and base_spec("org/model") == "org/model"


def test_base_label_names_the_demo_model_demo():
    assert (base_label(str(DEMO_MODEL_DIR)), base_label("org/model")) == ("demo", "model")


def test_parse_weights():
    assert parse_weights("0, .5;1") == [0.0, 0.5, 1.0]
    with pytest.raises(ConfigError, match="numbers"):
        parse_weights("0, heavy")


def test_make_params_reads_the_form():
    params = make_params(" a star ", "", 3.0, 4.0, 2, "64x32", "ddim")
    assert (params.prompt, params.seed, params.width, params.height) == ("a star", 3, 64, 32)
    assert make_params("x", "", 0, 1, 1, "native", "dpm++").width is None


def test_make_params_names_mistakes():
    with pytest.raises(ConfigError, match="multiples of 8"):
        make_params("x", "", 0, 1, 1, "30x30", "dpm++")
    with pytest.raises(ConfigError, match="Write a prompt"):
        make_params(" ", "", 0, 1, 1, "native", "dpm++")


PARAMS = make_params("a sks blob", "", 1, 2, 3.0, "native", "ddim")


def test_the_studio_saves_compared_pngs_with_their_parameters(tiny_base, blob_folder, tmp_path):
    train(train_config(blob_folder, tiny_base, tmp_path, steps=1, name="blob"))
    result = Studio(Outputs(tmp_path)).compare(tiny_base, PARAMS, [("blob", 0.7)])
    assert [label for _, label in result.images] == ["base", "blob 0.7"]
    assert all(Path(path).parent == tmp_path / "images" for path, _ in result.images)
    assert "[blob 0.7]" in result.parameters and "Lora: blob:0.7" in result.parameters


def test_the_studio_reloads_an_adapter_retrained_under_its_name(tiny_base, blob_folder, tmp_path):
    first = train(train_config(blob_folder, tiny_base, tmp_path, steps=1, name="blob"))
    studio = Studio(Outputs(tmp_path))
    before = studio.generate(tiny_base, PARAMS, [("blob", 1.0)])
    train(
        train_config(blob_folder, tiny_base, tmp_path, steps=1, lr=0.5, name="blob", out=str(first.adapter))
    )
    after = studio.generate(tiny_base, PARAMS, [("blob", 1.0)])
    assert Path(before.images[0][0]).read_bytes() != Path(after.images[0][0]).read_bytes()


def test_the_studio_refuses_adapters_not_in_the_library(tiny_base, tmp_path):
    with pytest.raises(AdapterError, match="No adapter called 'gone'"):
        Studio(Outputs(tmp_path)).generate(tiny_base, PARAMS, [("gone", 1.0)])
