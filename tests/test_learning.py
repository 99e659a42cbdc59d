"""Proof that the app's presets learn the shipped examples, on the bundled demo model (CPU, a few minutes).

Every adapter here is trained with the values `sdlora.presets` gives the app's and the CLI's preset
menus for the demo model, so what passes here is what a user gets by pressing Start:

- the Subject preset on `training_data/sks_star` makes "a purple sks shape" draw the star, where the base
  does not, with prior preservation as well as without; with it, the class prompt alone drifts less
  toward the star;
- the Style preset on `style_outlined` makes every shape hollow, on `style_dark` puts them on a dark
  background and draws them as well as the base does on navy (the base's own faded square corners
  there keep it below its shapes on white: an expected failure, with its figures), and the two stacked
  at (1 - t, t) go from one to the other.

`python -m tests.test_learning` prints the figures and writes the grids in docs/ that the README shows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlora.config import TrainConfig
from sdlora.demo import demo_model_available
from sdlora.demo.metrics import background_colour, compactness, coverage, read_image
from sdlora.generate import GenerationParams, Generator, image_grid, save_png
from sdlora.presets import preset_values
from sdlora.train import train

DATA = Path(__file__).resolve().parents[1] / "training_data"
SEEDS = range(6)
SUBJECT_PROMPT = "a purple sks shape on a white background"
CLASS_PROMPT = "a purple shape on a white background"
STYLE_PROMPTS = ["a red circle", "a blue square", "a green triangle"]
STYLE_WEIGHTS = [0.0, 0.25, 0.5, 0.75, 1.0]
GENERATION = {"steps": 25, "guidance": 4.0}

pytestmark = pytest.mark.skipif(not demo_model_available(), reason="the demo model has not been built")


# ------------------------------------------------------------------------------------------- measures


def images_of(folder: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]


def hollowness(image: Image.Image) -> float:
    """Share of background inside each row's ink span: ~0.1 for the star's notches, 0 for convex shapes."""
    alpha = coverage(image)
    inside = background = 0
    for row in alpha:
        ink = np.flatnonzero(row > 0.5)
        if len(ink) >= 2:
            span = row[ink[0] : ink[-1] + 1]
            inside += len(span)
            background += int((span < 0.5).sum())
    return background / inside if inside else 0.0


def shape_features(image: Image.Image) -> np.ndarray:
    return np.array([compactness(coverage(image)), hollowness(image)])


def star_distance(images: list[Image.Image], reference: list[Image.Image]) -> float:
    """Mean distance of the images' (compactness, hollowness) to the training stars' mean."""
    target = np.mean([shape_features(i) for i in reference], axis=0)
    return float(np.mean([np.linalg.norm(shape_features(i) - target) for i in images]))


def darkness(image: Image.Image) -> float:
    """1 - the background's luminance (0 on white, ~0.85 on the dark style's navy)."""
    return float(1 - background_colour(image).mean() / 255)


def interior_ink(image: Image.Image) -> float:
    """Mean ink coverage in the middle half of the shape's box: ~0 for an outline, more for a fill."""
    alpha = coverage(image)
    ys, xs = np.nonzero(alpha > 0.5)
    if len(ys) == 0:
        return 0.0
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = bottom - top, right - left
    return float(alpha[top + h // 4 : bottom - h // 4, left + w // 4 : right - w // 4].mean())


# -------------------------------------------------------------------------------------------- training


def preset_config(preset: str, out: Path, **fields) -> TrainConfig:
    """A job as the app starts it: the preset's demo values, then the user's data, prompts and name."""
    return TrainConfig(
        **{**preset_values(preset, "demo"), "sample_every": 0, "seed": 0, "outputs": str(out), **fields}
    )


def train_adapters(out: Path) -> dict[str, Path]:
    """The four adapters the claims need, each trained with its preset."""
    subject = {"data_dir": str(DATA / "sks_star"), "prompt": "a purple sks shape"}
    prior = {"class_prompt": "a purple shape", "class_dir": str(out / "class")}
    configs = {
        "star": preset_config("Subject", out, **subject, name="star"),
        "star_prior": preset_config("Subject", out, **subject, **prior, name="star_prior"),
        "outlined": preset_config("Style", out, data_dir=str(DATA / "style_outlined"), name="outlined"),
        "dark": preset_config("Style", out, data_dir=str(DATA / "style_dark"), name="dark"),
    }
    return {name: train(config).adapter for name, config in configs.items()}


def make_generator(adapters: dict[str, Path]) -> Generator:
    generator = Generator()
    for name, path in adapters.items():
        generator.load_adapter(path, name=name)
    return generator


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> Generator:
    return make_generator(train_adapters(tmp_path_factory.mktemp("learning")))


def render(generator: Generator, prompt: str, weights: dict[str, float], seeds=SEEDS) -> list[Image.Image]:
    return [generator.generate(GenerationParams(prompt, seed=s, **GENERATION), weights) for s in seeds]


# -------------------------------------------------------------------------------------------- claims


def measure_subject(generator: Generator) -> dict[str, float]:
    stars = images_of(DATA / "sks_star")
    return {
        "base": star_distance(render(generator, SUBJECT_PROMPT, {}), stars),
        "lora": star_distance(render(generator, SUBJECT_PROMPT, {"lora_star": 1.0}), stars),
        "lora_with_prior": star_distance(render(generator, SUBJECT_PROMPT, {"lora_star_prior": 1.0}), stars),
        "training_images": star_distance(stars, stars),
    }


def measure_prior(generator: Generator) -> dict[str, float]:
    stars = images_of(DATA / "sks_star")
    base = star_distance(render(generator, CLASS_PROMPT, {}), stars)
    without = star_distance(render(generator, CLASS_PROMPT, {"lora_star": 1.0}), stars)
    with_prior = star_distance(render(generator, CLASS_PROMPT, {"lora_star_prior": 1.0}), stars)
    return {"base": base, "drift_without_prior": base - without, "drift_with_prior": base - with_prior}


STYLE_SEEDS = range(3)


# What the base draws when the prompt names the dark style's background: the most a style LoRA on the
# same base can be expected to reach.
NAMED_DARK = " on a navy background"


def style_images(generator: Generator, weights: dict[str, float], suffix: str = "") -> list[Image.Image]:
    return [i for p in STYLE_PROMPTS for i in render(generator, p + suffix, weights, seeds=STYLE_SEEDS)]


def drawn_shape(image: Image.Image) -> str:
    """The shape a filled drawing reads as (by its fill ratio): circle, square or triangle."""
    return read_image(image).shape


def style_pictures(generator: Generator) -> dict[str, list[Image.Image]]:
    """The nine style pictures of the base (also with the navy background named in the prompt), each
    style and the cross-fade (outlined 1 - t, dark t), rendered once for the figures and the grid."""
    mixes = {"base": ({}, ""), "base_named_dark": ({}, NAMED_DARK)}
    mixes |= {"outlined": ({"lora_outlined": 1.0}, ""), "dark": ({"lora_dark": 1.0}, "")}
    mixes |= {f"t={t:g}": ({"lora_outlined": 1 - t, "lora_dark": t}, "") for t in STYLE_WEIGHTS}
    return {label: style_images(generator, weights, suffix) for label, (weights, suffix) in mixes.items()}


def measure_styles(pictures: dict[str, list[Image.Image]]) -> dict[str, dict[str, float]]:
    """Interior ink (outlines are hollow; the mean and the fullest of the nine pictures), background
    darkness, and the share of pictures that still read as the prompt's shape, for each mix."""
    asked = [p.split()[-1] for p in STYLE_PROMPTS for _ in STYLE_SEEDS]
    figures = {}
    for label, images in pictures.items():
        figures[label] = {
            "interior_ink": float(np.mean([interior_ink(i) for i in images])),
            "fullest_interior": float(max(interior_ink(i) for i in images)),
            "darkness": float(np.mean([darkness(i) for i in images])),
            "right_shape": float(np.mean([drawn_shape(i) == a for i, a in zip(images, asked, strict=True)])),
        }
    return figures


def test_subject_preset_draws_the_subject(generator):
    """Without prior preservation: the star is drawn (measured: see docs/learning.json)."""
    figures = measure_subject(generator)
    assert figures["lora"] < 0.75 * figures["base"], figures


def test_subject_preset_with_prior_preservation_still_draws_the_subject(generator):
    """With prior preservation (what the Subject preset is for) the star is drawn too, closer to the
    adapter without prior than to the base (measured 0.134 against 0.076 and 0.252: the class images
    cost some fidelity). Before the preset dropped captions, the adapter's unconditional prediction
    drifted and guidance turned the pictures into red fragments (0.279, farther than the base's 0.211)."""
    figures = measure_subject(generator)
    assert figures["lora_with_prior"] < 0.75 * figures["base"], figures
    assert figures["lora_with_prior"] < (figures["lora"] + figures["base"]) / 2, figures


def test_prior_preservation_limits_drift(generator):
    """Without prior preservation "a purple shape on a white background" turns into stars; with it, less."""
    figures = measure_prior(generator)
    assert figures["drift_without_prior"] > 0, figures
    assert figures["drift_with_prior"] < figures["drift_without_prior"], figures


@pytest.fixture(scope="module")
def style_figures(generator) -> dict[str, dict[str, float]]:
    return measure_styles(style_pictures(generator))


def test_style_presets_show_their_styles(style_figures):
    """Filled shapes measure 0.9-1.0 interior ink, the training outlines 0.0-0.56 (a thin triangle's
    outline reaches into the middle of its box)."""
    figures = style_figures
    base, outlined, dark = figures["base"], figures["outlined"], figures["dark"]
    assert outlined["interior_ink"] < base["interior_ink"] - 0.5, figures  # hollow shapes
    assert outlined["fullest_interior"] < 0.85, figures  # every one of the nine pictures
    assert dark["darkness"] > base["darkness"] + 0.4, figures  # dark backgrounds
    assert outlined["darkness"] < base["darkness"] + 0.1, figures  # each style keeps to itself


def test_dark_style_draws_shapes_as_the_base_does_on_navy(style_figures):
    """The Dark style keeps the shapes as well as the base asked for "... on a navy background" (both
    0.67 read right: every circle and triangle; the squares' corners fade into the navy, so their fill
    reads as a circle's)."""
    figures = style_figures
    assert figures["dark"]["right_shape"] >= figures["base_named_dark"]["right_shape"] - 0.1, figures


@pytest.mark.xfail(
    strict=True,
    reason="on a dark background the demo model fades the squares' corners into the navy, with or without "
    "the Dark style, so they read as circles (docs/learning.json: styles.dark.right_shape and "
    "base_named_dark 0.67, base 1.0)",
)
def test_dark_style_keeps_the_shapes_form(style_figures):
    figures = style_figures
    assert figures["dark"]["right_shape"] >= figures["base"]["right_shape"] - 0.2, figures


def test_style_cross_fade_moves_monotonically(style_figures):
    """Darkness never steps back by more than a light background's jitter (measured: light up to
    t = 0.5, then dark)."""
    figures = style_figures
    values = [figures[f"t={t:g}"]["darkness"] for t in STYLE_WEIGHTS]
    assert all(b >= a - 0.05 for a, b in zip(values, values[1:], strict=False)), values
    assert values[-1] - values[0] > 0.4, values


# ------------------------------------------------------------------------------------ figures for the README


def main(docs: Path) -> None:
    """Train, measure and write docs/learning.json and the grids docs/learning_*.png."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        generator = make_generator(train_adapters(Path(tmp)))
        pictures = style_pictures(generator)
        figures = {
            "subject_star_distance": measure_subject(generator),
            "class_prompt_drift_toward_star": measure_prior(generator),
            "styles": measure_styles(pictures),
        }
        rows = []
        for prompt in (SUBJECT_PROMPT, CLASS_PROMPT):
            for label, weights in (
                ("base", {}),
                ("sks LoRA", {"lora_star": 1.0}),
                ("sks LoRA + prior", {"lora_star_prior": 1.0}),
            ):
                rows.append((f"{label}", render(generator, prompt, weights, seeds=[1])[0]))
        for t in STYLE_WEIGHTS:
            rows.append(
                (
                    f"outl {1 - t:g} / dark {t:g}",
                    render(generator, STYLE_PROMPTS[0], {"lora_outlined": 1 - t, "lora_dark": t}, [1])[0],
                )
            )
        every_seed = [
            (f"{label} {prompt.split()[-1]} {seed}", image)
            for label, mix in (
                ("base", "base"),
                ("outl", "outlined"),
                ("dark", "dark"),
                ("base+navy", "base_named_dark"),
            )
            for prompt, seed, image in zip(
                [p for p in STYLE_PROMPTS for _ in STYLE_SEEDS],
                [s for _ in STYLE_PROMPTS for s in STYLE_SEEDS],
                pictures[mix],
                strict=True,
            )
        ]
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "learning.json").write_text(json.dumps(figures, indent=2) + "\n")
    save_png(image_grid(rows[:6], columns=3), docs / "learning_subject.png")
    save_png(image_grid(rows[6:], columns=len(STYLE_WEIGHTS)), docs / "learning_styles.png")
    save_png(
        image_grid(every_seed, columns=len(STYLE_PROMPTS) * len(STYLE_SEEDS)),
        docs / "learning_style_seeds.png",
    )
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs"))
