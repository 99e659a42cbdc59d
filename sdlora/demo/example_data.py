"""Write the small example LoRA training sets in ``training_data/`` (PNG images plus same-name .txt captions).

Three sets, each something the demo base model has never been trained on:

* ``sks_star``: a new *subject* (a purple five-pointed star) for DreamBooth-style training. The base model
  knows the class word "shape" (one base caption in ten says "shape" instead of the shape's name), so the
  instance prompt is "a purple sks shape" and the class prompt for prior preservation "a purple shape".
* ``style_outlined`` and ``style_dark``: two *styles* applied to the same ordinary shapes, so two style
  LoRAs can be trained and mixed.

Usage: ``python -m sdlora.demo.example_data [--out training_data]``
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from sdlora.demo.shapes import BASE_SHAPES, COLOURS, ShapeSpec, random_spec, render

IMAGES_PER_SET = 8


@dataclass(frozen=True)
class ExampleSet:
    """One training folder: how its images are chosen and captioned, and the README line describing it."""

    name: str
    description: str
    specs: Callable[[random.Random], list[ShapeSpec]]
    caption: Callable[[ShapeSpec], str]


def star_specs(rng: random.Random) -> list[ShapeSpec]:
    """The subject: one purple star in varied sizes, positions and (mostly white) backgrounds."""
    return [
        replace(
            random_spec(rng, shapes=("star",), colours=("purple",), size_range=(0.5, 0.8)), tint=(0, 0, 0)
        )
        for _ in range(IMAGES_PER_SET)
    ]


def styled_specs(style: str, background: str = "white") -> Callable[[random.Random], list[ShapeSpec]]:
    """Ordinary base shapes, one per colour, large enough that the style reads clearly at 32 px.

    Every style set uses the same seed, so they show the same shapes and differ only in style.
    """

    def specs(rng: random.Random) -> list[ShapeSpec]:
        shapes = [BASE_SHAPES[index % len(BASE_SHAPES)] for index in range(IMAGES_PER_SET)]
        colours = [c for c in COLOURS if c != "black"] * 2
        colours = [colours[index % len(colours)] for index in range(IMAGES_PER_SET)]
        rng.shuffle(colours)
        return [
            random_spec(
                rng,
                shapes=(shape,),
                colours=(colour,),
                size_range=(0.6, 0.8),
                style=style,
                backgrounds={background: 1.0},
            )  # fmt: skip
            for shape, colour in zip(shapes, colours, strict=True)
        ]

    return specs


def plain_caption(spec: ShapeSpec) -> str:
    """A style set's caption: the shape alone ("a red circle"), so no style or background word reaches
    the prompt and the LoRA applies its style to any prompt."""
    return replace(spec, style="filled").caption(short=True)


EXAMPLE_SETS: tuple[ExampleSet, ...] = (
    ExampleSet(
        name="sks_star",
        description=(
            "new subject: a purple five-pointed star (never in the base data) at varied sizes and positions; "
            'captions "a purple sks shape on a <colour> background"; instance prompt "a purple sks shape", '
            'class prompt "a purple shape" (the base knows "shape" as a generic word for its shapes).'
        ),
        specs=star_specs,
        caption=lambda spec: spec.caption(generic=True).replace(" shape ", " sks shape ", 1),
    ),
    ExampleSet(
        name="style_outlined",
        description=(
            "style: ordinary shapes drawn as thick outlines (hollow) on white; plain captions without a style "
            'word (e.g. "a red circle"), so the LoRA applies the style to any prompt.'
        ),
        specs=styled_specs("outlined"),
        caption=plain_caption,
    ),
    ExampleSet(
        name="style_dark",
        description=(
            "style: the same shapes as style_outlined, filled, on a dark navy background (the base draws one "
            "only when the prompt names it); plain captions like style_outlined, so the two style LoRAs can be "
            "mixed on one prompt."
        ),
        specs=styled_specs("filled", background="navy"),
        caption=plain_caption,
    ),
)


def write_set(example: ExampleSet, out_dir: Path, seed: int) -> list[str]:
    """Render one set into ``out_dir / example.name`` (replacing its images) and return the captions."""
    folder = out_dir / example.name
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("*.png"), *folder.glob("*.txt")]:
        stale.unlink()
    captions = []
    for index, spec in enumerate(example.specs(random.Random(seed))):
        stem = f"{example.name}_{index:02d}"
        render(spec).save(folder / f"{stem}.png")
        caption = example.caption(spec)
        (folder / f"{stem}.txt").write_text(caption + "\n")
        captions.append(caption)
    return captions


def readme_text() -> str:
    lines = [
        "# Example LoRA training sets",
        "",
        "Made by `python -m sdlora.demo.example_data` from the procedural shapes in `sdlora/demo/shapes.py`",
        f"({IMAGES_PER_SET} images per set, 32 px, the demo model's native size; each `.png` has a same-name",
        "`.txt` caption). The demo base model (`sdlora/demo/model`) was trained only on filled circles, squares,",
        "triangles, diamonds and crosses, so each set teaches it something new:",
        "",
    ]
    lines += [f"- `{example.name}/`: {example.description}" for example in EXAMPLE_SETS]
    return "\n".join(lines) + "\n"


def write_example_sets(out_dir: str | Path = "training_data", *, seed: int = 0) -> Path:
    """Write every example set plus a README into ``out_dir``; deterministic for a given seed."""
    out_dir = Path(out_dir)
    for example in EXAMPLE_SETS:
        captions = write_set(example, out_dir, seed)
        print(f"{out_dir / example.name}: {len(captions)} images, e.g. {captions[0]!r}")
    (out_dir / "README.md").write_text(readme_text())
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("training_data"), help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_example_sets(args.out, seed=args.seed)


if __name__ == "__main__":
    main()
