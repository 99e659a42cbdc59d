"""The shipped demo model: it loads as a plain diffusers pipeline and draws the shapes and colours asked for.

Generations are judged by :mod:`sdlora.demo.metrics`. The same checks are run on a randomly initialised
model of the same architecture, which must fail them: that shows the thresholds measure training, not luck.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from sdlora.demo import DEMO_MODEL_DIR, demo_model_available
from sdlora.demo.metrics import FILL_RATIOS, read_image
from sdlora.demo.shapes import BASE_SHAPES, COLOURS, ShapeSpec, render
from sdlora.demo.tokenizer import build_tokenizer, demo_words

PROMPTS: dict[str, tuple[str, str]] = {
    "a red circle on a white background": ("red", "circle"),
    "a blue square on a white background": ("blue", "square"),
    "a green triangle on a white background": ("green", "triangle"),
    "a yellow circle on a white background": ("yellow", "circle"),
}
SEEDS = (0, 1)
STEPS = 25
GUIDANCE = 4.0

# Pass marks. Reference fill ratios: circle 0.785, square 1.0, triangle 0.5 (0.54 measured at 32 px).
MIN_COLOUR_ACCURACY = 0.8
MIN_SHAPE_ACCURACY = 0.75
FILL_BANDS: dict[str, tuple[float, float]] = {
    "circle": (0.68, 0.88),
    "square": (0.86, 1.0),
    "triangle": (0.4, 0.65),
}
MIN_WHITE_BACKGROUNDS = 0.8

needs_model = pytest.mark.skipif(not demo_model_available(), reason=f"no demo model in {DEMO_MODEL_DIR}")


@dataclass(frozen=True)
class Scores:
    """How a set of generations measured up to their prompts."""

    colour_accuracy: float
    shape_accuracy: float
    white_backgrounds: float
    mean_fill: dict[str, float]

    def failures(self) -> list[str]:
        """Every pass mark missed, as readable sentences (empty: the model draws what it is asked)."""
        problems = []
        if self.colour_accuracy < MIN_COLOUR_ACCURACY:
            problems.append(f"colour right in {self.colour_accuracy:.0%} < {MIN_COLOUR_ACCURACY:.0%}")
        if self.shape_accuracy < MIN_SHAPE_ACCURACY:
            problems.append(f"shape right in {self.shape_accuracy:.0%} < {MIN_SHAPE_ACCURACY:.0%}")
        if self.white_backgrounds < MIN_WHITE_BACKGROUNDS:
            problems.append(f"white background in {self.white_backgrounds:.0%} < {MIN_WHITE_BACKGROUNDS:.0%}")
        for shape, (low, high) in FILL_BANDS.items():
            if not low <= self.mean_fill[shape] <= high:
                problems.append(f"{shape} mean fill {self.mean_fill[shape]:.2f} outside [{low}, {high}]")
        return problems


def load_pipeline(randomise: bool = False):
    """The shipped pipeline, or (``randomise``) the same architecture with freshly initialised weights."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(DEMO_MODEL_DIR)
    if randomise:
        torch.manual_seed(0)
        pipeline.vae = type(pipeline.vae).from_config(pipeline.vae.config)
        pipeline.unet = type(pipeline.unet).from_config(pipeline.unet.config)
        pipeline.text_encoder = type(pipeline.text_encoder)(pipeline.text_encoder.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def is_white(rgb: tuple[int, int, int]) -> bool:
    """White up to the faint tint the small VAE leaves (one channel down to ~230); the light gray, yellow
    and blue backgrounds of the training data all have a channel at 215 or below."""
    return min(rgb) >= 225


def score(pipeline) -> Scores:
    """Generate every prompt at every seed in one batch and compare the readings with the prompts."""
    prompts = [prompt for prompt in PROMPTS for _ in SEEDS]
    generators = [torch.Generator().manual_seed(seed) for _ in PROMPTS for seed in SEEDS]
    images = pipeline(
        prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generators
    ).images
    assert all(image.size == (32, 32) for image in images)
    readings = [read_image(image) for image in images]
    expected = [PROMPTS[prompt] for prompt in prompts]
    fills: dict[str, list[float]] = {shape: [] for shape in FILL_BANDS}
    for (_, shape), reading in zip(expected, readings, strict=True):
        fills[shape].append(reading.fill_ratio)
    return Scores(
        colour_accuracy=float(np.mean([r.colour == c for (c, _), r in zip(expected, readings, strict=True)])),
        shape_accuracy=float(np.mean([r.shape == s for (_, s), r in zip(expected, readings, strict=True)])),
        white_backgrounds=float(np.mean([is_white(r.background) for r in readings])),
        mean_fill={shape: float(np.mean(values)) if values else 0.0 for shape, values in fills.items()},
    )


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One torch thread: the demo model is too small to gain from two, and OpenMP's busy-waiting made these
    tests up to 80x slower when another process shared the CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def trained_pipeline():
    return load_pipeline()


@pytest.fixture(scope="module")
def trained_scores(trained_pipeline) -> Scores:
    scores = score(trained_pipeline)
    print(f"\ntrained model: {scores}")
    return scores


@pytest.fixture(scope="module")
def random_scores() -> Scores:
    scores = score(load_pipeline(randomise=True))
    print(f"\nrandom model: {scores}")
    return scores


# The yardsticks themselves: metrics must read the training renderings correctly.


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
@pytest.mark.parametrize("colour", list(COLOURS))
def test_metrics_read_rendered_shapes(shape: str, colour: str) -> None:
    reading = read_image(render(ShapeSpec(shape, colour, size=0.55, centre=(0.45, 0.55))))
    assert reading.colour == colour
    assert reading.shape == shape
    assert abs(reading.fill_ratio - FILL_RATIOS[shape]) < 0.06
    assert is_white(reading.background)


def test_tokenizer_keeps_words_whole_and_survives_unknown_text() -> None:
    tokenizer = build_tokenizer()
    assert all(len(tokenizer.tokenize(word)) == 1 for word in demo_words())
    ids = tokenizer("a zebra-like Ñandú 🦄, outlined style").input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        reloaded = CLIPTokenizer.from_pretrained(folder)
    assert reloaded("a sks star").input_ids == tokenizer("a sks star").input_ids


# The shipped model.


@needs_model
def test_folder_is_a_small_standard_pipeline() -> None:
    index = json.loads((DEMO_MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    size = sum(path.stat().st_size for path in Path(DEMO_MODEL_DIR).rglob("*") if path.is_file())
    assert size <= 20 * 2**20


@needs_model
def test_trained_model_draws_requested_shapes_and_colours(trained_scores: Scores) -> None:
    assert trained_scores.failures() == []


@needs_model
def test_random_model_of_same_architecture_fails(random_scores: Scores) -> None:
    """Guards the thresholds: an untrained model must miss most of them."""
    assert len(random_scores.failures()) >= 3
    assert random_scores.colour_accuracy < MIN_COLOUR_ACCURACY


@needs_model
def test_trained_model_draws_every_base_shape_in_colour(trained_pipeline) -> None:
    """Beyond the four headline prompts: each base shape comes out in the colour asked for."""
    prompts = [f"a purple {shape} on a white background" for shape in BASE_SHAPES]
    generator = torch.Generator().manual_seed(0)
    images = trained_pipeline(
        prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generator
    ).images
    readings = [read_image(image) for image in images]
    assert sum(reading.colour == "purple" for reading in readings) >= len(prompts) - 1


@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_weight_average_is_the_warm_up_average_build_used_before_emamodel(decay):
    """diffusers' EMAModel, as configured, averages as build.py's own EMA did: per update k (from 0),
    shadow <- lerp(shadow, weights, 1 - min(decay, (1 + k) / (10 + k)))."""
    from sdlora.demo.build import weight_average

    g = torch.Generator().manual_seed(0)
    parameters = [
        torch.nn.Parameter(torch.randn(16, 8, generator=g)),
        torch.nn.Parameter(torch.randn(8, generator=g)),
    ]
    ema = weight_average(parameters, decay)
    shadow = [p.detach().clone() for p in parameters]
    for k in range(300):
        with torch.no_grad():
            for p in parameters:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        ema.step(parameters)
        assert ema.cur_decay_value == pytest.approx(min(decay, (1 + k) / (10 + k)), rel=1e-12)
        torch._foreach_lerp_(shadow, [p.detach() for p in parameters], 1 - min(decay, (1 + k) / (10 + k)))
    averaged = [torch.empty_like(p) for p in parameters]
    ema.copy_to(averaged)
    torch.testing.assert_close(averaged, shadow, rtol=0, atol=1e-6)
