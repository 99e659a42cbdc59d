"""X/Y plots, the cross-fade of two adapters, and PNG parameters read back as A1111 writes them."""

from __future__ import annotations

import numpy as np
import pytest

from sdlora.config import ConfigError
from sdlora.generate import (
    Axis,
    GenerationParams,
    Generator,
    crossfade,
    image_history,
    read_parameters,
    save_png,
    xy_plot,
)
from sdlora.generate.images import parse_parameters
from tests.test_generate import PARAMS, pixels


@pytest.fixture(scope="module")
def generator(tiny_base, two_adapters) -> Generator:
    generator = Generator(tiny_base)
    for path in two_adapters:
        generator.load_adapter(path)
    return generator


def test_xy_plot_cells_are_the_images_of_their_settings(generator):
    x = Axis("weight:lora_purple", (0.0, 1.0))
    y = Axis("seed", (1.0, 2.0))
    grid = xy_plot(generator, PARAMS, x, y)
    native = generator.native_size
    assert grid.height > 2 * native and grid.width > 2 * native  # labelled, enlarged cells
    assert "[seed 2 | purple 1]" in grid.info["parameters"]
    assert "Seed: 2" in grid.info["parameters"] and "Lora: purple:1" in grid.info["parameters"]


def test_crossfade_moves_both_weights(generator):
    axis = crossfade("lora_purple", "lora_green", points=3)
    assert axis.values == (0.0, 0.5, 1.0)
    params, weights = axis.apply(0.25, (PARAMS, {}))
    assert weights == {"lora_purple": 0.75, "lora_green": 0.25}
    assert axis.label(0.25) == "purple 0.75 / green 0.25"


def test_grids_are_bounded_and_axes_checked(generator):
    with pytest.raises(ConfigError, match="at most 16"):
        xy_plot(generator, PARAMS, Axis("seed", tuple(range(5))), Axis("steps", (1, 2, 3, 4)))
    with pytest.raises(ConfigError, match="Unknown X/Y axis"):
        xy_plot(generator, PARAMS, Axis("colour", (1.0,)))


def test_png_parameters_read_back_as_written(generator, tmp_path):
    params = GenerationParams("a sks blob\nsecond line", "blurry, ugly", seed=7, steps=3, guidance=2.5)
    image = generator.generate(params, {"lora_purple": 0.5})
    path = save_png(image, tmp_path / "x.png")
    fields = read_parameters(path)
    assert fields["Prompt"] == "a sks blob\nsecond line" and fields["Negative prompt"] == "blurry, ugly"
    assert (fields["Steps"], fields["Seed"], fields["CFG scale"], fields["Lora"]) == (
        "3",
        "7",
        "2.5",
        "purple:0.5",
    )
    again = generator.generate(
        GenerationParams(fields["Prompt"], fields["Negative prompt"], int(fields["Seed"]), int(fields["Steps"]),
                         float(fields["CFG scale"])), {"lora_purple": 0.5})  # fmt: skip
    assert np.array_equal(pixels(again), pixels(image))
    assert [p for p, _ in image_history(tmp_path)] == [path]


def test_a1111_text_with_quoted_values():
    text = 'a cat\nNegative prompt: dog\nSteps: 20, Sampler: DPM++ 2M, Lora hashes: "a: 1, b: 2", Seed: 3'
    fields = parse_parameters(text)
    assert fields["Lora hashes"] == "a: 1, b: 2" and fields["Seed"] == "3" and fields["Prompt"] == "a cat"
