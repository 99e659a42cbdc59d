"""The app's shared generator: form values to parameters, library adapters by name, PNGs under images/."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from sdlora.adapters import AdapterError
from sdlora.config import ConfigError, parse_weights
from sdlora.demo import DEMO_MODEL_DIR, base_spec
from sdlora.generate.generator import GenerationStopped
from sdlora.generate.grids import parse_axis
from sdlora.generate.images import labeled_parameters, parameters_text
from sdlora.generate.studio import Recalled, Studio, make_params, recall
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


A1111_TEXT = (
    "a blue square <lora:style_dark:0.6>\nNegative prompt: blurry\n"
    "Steps: 9, Sampler: Euler a, CFG scale: 5.5, Seed: 1234, Size: 48x48, Model: demo, "
    'Lora: style_outlined:0.7, style_dark:0.6, other:0.5/1, Lora hashes: "x: 1", Version: v1.10.1'
)


def test_recall_gives_the_form_back_from_a1111_text():
    recalled = recall(A1111_TEXT)
    assert (recalled.prompt, recalled.negative) == ("a blue square <lora:style_dark:0.6>", "blurry")
    assert (recalled.seed, recalled.steps, recalled.guidance) == (1234, 9, 5.5)
    assert (recalled.size, recalled.scheduler) == ("48x48", "euler-a")
    # style_dark is selected by its tag already; a (text encoder/U-Net) pair gives the U-Net's weight
    assert recalled.adapters == [("style_outlined", 0.7), ("other", 1.0)]


def test_recall_of_a_grid_gives_its_first_image_and_of_nothing_an_empty_form():
    grid = labeled_parameters(
        [(f"seed {seed}", _with_text(f"a star\nSteps: 3, Seed: {seed}, Size: 32x32")) for seed in (5, 6)]
    )
    recalled = recall(grid)
    assert (recalled.prompt, recalled.seed, recalled.steps) == ("a star", 5, 3)
    assert recall("") == Recalled("", "")


def _with_text(text: str):
    image = Image.new("RGB", (8, 8))
    image.info["parameters"] = text
    return image


def test_parameters_text_of_a_file_that_is_no_image_is_empty(tmp_path):
    (tmp_path / "notes.png").write_bytes(b"not a png")
    assert parameters_text(tmp_path / "notes.png") == ""


def test_stop_ends_only_its_owners_generation(tiny_base, tmp_path):
    studio = Studio(Outputs(tmp_path))
    long = make_params("a sks blob", "", 1, 150, 3.0, "native", "ddim")
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(studio.generate(tiny_base, long, [], owner="page-1"))
        except GenerationStopped as stopped:
            outcome.append(stopped)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 60
    while studio._owner != "page-1":  # the call holds the generator
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not studio.stop("page-2")  # another page's Stop leaves it running
    assert studio.stop("page-1")
    worker.join(60)
    assert isinstance(outcome[0], GenerationStopped)
    assert not list((tmp_path / "images").glob("*.png"))  # nothing half-made was saved
    assert not studio.stop("page-1")  # nothing running: a late Stop is a no-op ...
    assert studio.generate(tiny_base, PARAMS, [], owner="page-1").images  # ... and stops nothing later


def test_an_xy_plot_is_saved_as_one_png_naming_library_adapters(tiny_base, blob_folder, tmp_path):
    train(train_config(blob_folder, tiny_base, tmp_path, steps=1, name="blob"))
    train(train_config(blob_folder, tiny_base, tmp_path, steps=1, name="dot", seed=1))
    result = Studio(Outputs(tmp_path)).xy(
        tiny_base, PARAMS, [], parse_axis("crossfade:blob:dot", "0, 1"), parse_axis("seed", "1, 2")
    )
    ((path, _),) = result.images
    text = parameters_text(path)
    assert text.count("Seed: ") == 4 and "[seed 2 | blob 0 / dot 1]" in text
    assert "Lora: blob:0, dot:1" in text


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("seed", "1, 2.5", "whole numbers"),
        ("steps", "0, 10", "between 1 and"),
        ("guidance", ", ".join(["1"] * 17), "at most 16"),
        ("guidance", "", "at least one value"),
        ("weight:a", "heavy", "numbers separated by commas"),
        ("colour", "1", "Unknown X/Y axis"),
    ],
)
def test_parse_axis_names_mistakes(kind, text, message):
    with pytest.raises(ConfigError, match=message):
        parse_axis(kind, text)


def test_an_xy_plot_of_a_runs_checkpoints(tiny_base, blob_folder, tmp_path):
    result = train(train_config(blob_folder, tiny_base, tmp_path, steps=2, save_every=1, name="blob"))
    studio = Studio(Outputs(tmp_path))
    assert studio.checkpoint_runs() == {result.run.name: [1, 2]}
    grid = studio.xy(tiny_base, PARAMS, [], parse_axis(f"checkpoint:{result.run.name}", "1, 2"))
    text = parameters_text(grid.images[0][0])
    assert "[step 2]" in text and f"Lora: {result.run.name}_step1:1" in text
    with pytest.raises(ConfigError, match="has no checkpoint at step 3; it has 1, 2"):
        studio.xy(tiny_base, PARAMS, [], parse_axis(f"checkpoint:{result.run.name}", "3"))
    with pytest.raises(ConfigError, match="No run called"):
        studio.xy(tiny_base, PARAMS, [], parse_axis("checkpoint:../elsewhere", "1"))
