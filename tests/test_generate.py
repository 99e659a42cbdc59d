"""Generation: stacked adapters, comparisons and sweeps with one seed, parameters in the PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.adapters import AdapterError
from sdlora.config import ConfigError
from sdlora.generate import GenerationParams, Generator, image_grid, save_png
from tests.conftest import diffusers_mix

PARAMS = GenerationParams("a photo of sks blob", seed=7, steps=4, guidance=3.0)


@pytest.fixture(scope="module")
def generator(tiny_base, two_adapters) -> Generator:
    generator = Generator(tiny_base)
    for path in two_adapters:
        generator.load_adapter(path)
    return generator


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_adapters_get_descriptive_names(generator, two_adapters, tmp_path):
    assert sorted(generator.adapters) == ["lora_green", "lora_purple"]
    dotted = tmp_path / "style v1.5.safetensors"
    dotted.write_bytes(Path(two_adapters[0]).read_bytes())
    assert generator.load_adapter(dotted) == "lora_style_v1_5"
    before = generator.generate(PARAMS, {"lora_style_v1_5": 1.0})
    assert generator.load_adapter(dotted) == "lora_style_v1_5"  # unchanged file: kept as loaded
    dotted.write_bytes(Path(two_adapters[1]).read_bytes())  # retrained under the same name
    assert generator.load_adapter(dotted) == "lora_style_v1_5"
    after = generator.generate(PARAMS, {"lora_style_v1_5": 1.0})
    assert np.abs(pixels(before) - pixels(after)).mean() > 0.5  # the new weights, not the cached ones
    generator.unload_adapter("lora_style_v1_5")


def test_an_adapter_changes_the_image_and_the_base_comes_back(generator):
    base = generator.generate(PARAMS)
    adapted = generator.generate(PARAMS, {"lora_purple": 1.0})
    assert np.abs(pixels(base) - pixels(adapted)).mean() > 1.0
    assert np.array_equal(pixels(base), pixels(generator.generate(PARAMS)))  # disabling restores the base


def test_weights_one_and_zero_equal_the_first_alone(generator):
    alone = generator.generate(PARAMS, {"lora_purple": 1.0})
    stacked = generator.generate(PARAMS, {"lora_purple": 1.0, "lora_green": 0.0})
    assert np.abs(pixels(alone) - pixels(stacked)).max() <= 1


def test_compare_and_sweep(generator):
    weights = {"lora_purple": 0.8, "lora_green": 0.6}
    compared = generator.compare(PARAMS, weights)
    assert [label for label, _ in compared] == ["base", "purple 0.8", "green 0.6", "mix"]
    assert np.array_equal(pixels(compared[1][1]), pixels(generator.generate(PARAMS, {"lora_purple": 0.8})))
    swept = generator.sweep(PARAMS, "lora_purple", [0.0, 1.0])
    assert [label for label, _ in swept] == ["purple 0", "purple 1"]
    assert np.array_equal(pixels(swept[0][1]), pixels(compared[0][1]))  # weight 0 is the base
    grid = image_grid(compared)
    assert grid.width == 4 * max(128, compared[0][1].width)


def test_png_carries_its_parameters(generator, tmp_path):
    image = generator.generate(
        GenerationParams("a blob", negative_prompt="blurry", seed=3, steps=2, scheduler="euler-a"),
        {"lora_green": 0.5},
    )
    path = save_png(image, tmp_path / "x.png")
    text = Image.open(path).info["parameters"]
    assert text.startswith("a blob\nNegative prompt: blurry\n")
    assert (
        "Steps: 2" in text and "Sampler: Euler a" in text and "Seed: 3" in text and "Lora: green:0.5" in text
    )


@pytest.mark.parametrize("scheduler", ["dpm++", "euler-a", "ddim"])
def test_schedulers_are_seeded(generator, scheduler):
    params = GenerationParams("a blob", seed=5, steps=3, scheduler=scheduler)
    assert np.array_equal(pixels(generator.generate(params)), pixels(generator.generate(params)))


def test_only_safetensors_adapters_load(generator, tmp_path):
    pickle = tmp_path / "evil.ckpt"
    pickle.write_bytes(b"not loaded")
    with pytest.raises(AdapterError, match="only .safetensors"):
        generator.load_adapter(pickle)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\xff" * 64)
    with pytest.raises(AdapterError, match="broken.safetensors"):
        generator.load_adapter(broken)


def test_stacks_draw_what_diffusers_own_loader_draws(tiny_base, two_adapters):
    """The Generator writes the mix into the weights; diffusers applies the same files on the fly
    (its own loader and set_adapters): the images agree, and sliders move both alike."""
    ours = Generator(tiny_base)
    names = [ours.load_adapter(path) for path in two_adapters]
    for mix in ((0.8, 0.5), (0.2, 1.2), (0.0, 0.0)):
        weights = list(zip(two_adapters, mix, strict=True))
        reference = Generator(diffusers_mix(tiny_base, weights))
        a = ours.generate(PARAMS, dict(zip(names, mix, strict=True)))
        b = reference.generate(PARAMS)
        assert np.abs(pixels(a) - pixels(b)).max() <= 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_two_hundred_mixes_leave_the_base_bit_identical(tiny_base, two_adapters, dtype):
    """Mixes are computed from pristine weights, never by subtracting what was added: after any history
    (extreme weights included), the base with no adapter is exactly a fresh load."""
    fresh = {k: v.clone() for k, v in Generator(tiny_base, dtype=dtype).pipe.unet.state_dict().items()}
    generator = Generator(tiny_base, dtype=dtype)
    names = [generator.load_adapter(path) for path in two_adapters]
    rng = np.random.default_rng(0)
    for step in range(200):
        mix = {name: float(w) for name, w in zip(names, rng.uniform(-4, 4, size=2), strict=True)}
        generator.activate(mix if step % 7 else {names[0]: 4.0})
    generator.activate({})
    for key, value in generator.pipe.unet.state_dict().items():
        assert torch.equal(value, fresh[key]), key


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), 10000.0, -4.5, "x"])
def test_weights_outside_the_range_are_refused_and_change_nothing(generator, weight):
    before = {k: v.clone() for k, v in generator.pipe.unet.state_dict().items()}
    with pytest.raises(ConfigError, match="lora_purple|purple"):
        generator.activate({"lora_purple": weight})
    for key, value in generator.pipe.unet.state_dict().items():
        assert torch.equal(value, before[key]), key
