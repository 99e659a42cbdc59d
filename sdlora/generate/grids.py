"""X/Y plots as AUTOMATIC1111 users know them: one image per (x, y) pair, axes labelled, one seed.

An axis is a kind and its values: an adapter's weight, seed, steps or guidance. The cross-fade of two
adapters, (1 - t, t), is a preset of it: one axis moving both weights at once. A checkpoint axis puts
one adapter per value (a run's checkpoints, by step) at weight 1, in place of the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw, ImageFont

from sdlora.config import MAX_GENERATE_STEPS, MAX_IMAGES, ConfigError
from sdlora.generate.generator import GenerationParams, Generator, Weight, check_count, resolve_seed
from sdlora.generate.images import MIN_SHOWN_SIDE, labeled_parameters

Setting = tuple[GenerationParams, dict[str, Weight]]


@dataclass(frozen=True)
class Axis:
    """`kind`: 'weight:<adapter>', 'seed', 'steps', 'guidance', 'crossfade:<a>:<b>' or
    'checkpoint:<adapter>:<adapter>...' (one adapter per value); `values` its points."""

    kind: str
    values: tuple[float, ...]

    def label(self, value: float) -> str:
        name = self.kind.split(":", 1)[-1]
        if self.kind.startswith("crossfade:"):
            first, second = name.split(":")
            return f"{first.removeprefix('lora_')} {1 - value:g} / {second.removeprefix('lora_')} {value:g}"
        if self.kind.startswith("weight:"):
            return f"{name.removeprefix('lora_')} {value:g}"
        if self.kind.startswith("checkpoint:"):
            return f"step {value:g}"
        return f"{self.kind} {value:g}"

    def apply(self, value: float, setting: Setting) -> Setting:
        """The generation setting with this axis at `value`."""
        params, weights = setting
        if self.kind.startswith("weight:"):
            return params, {**weights, self.kind.split(":", 1)[1]: value}
        if self.kind.startswith("crossfade:"):
            _, first, second = self.kind.split(":")
            return params, {**weights, first: 1 - value, second: value}
        if self.kind.startswith("checkpoint:"):
            names = self.kind.split(":")[1:]
            return params, {**weights, names[self.values.index(value) % len(names)]: 1.0}
        if self.kind == "seed":
            return replace(params, seed=int(value)), weights
        if self.kind == "steps":
            return replace(params, steps=int(value)), weights
        if self.kind == "guidance":
            return replace(params, guidance=float(value)), weights
        raise ConfigError(
            f"Unknown X/Y axis {self.kind!r}: use weight:NAME, crossfade:A:B, checkpoint:RUN, seed, "
            "steps, guidance."
        )


def parse_axis(kind: str, text: str) -> Axis:
    """An axis from a form: its kind and its values as typed, e.g. '0, 0.5, 1' (commas or semicolons);
    seeds and steps must be whole numbers. ConfigError naming the axis for anything else."""
    parts = [part.strip() for part in (text or "").replace(";", ",").split(",") if part.strip()]
    shown = kind.split(":", 1)[0]
    if not parts:
        raise ConfigError(f"Give the {shown} axis at least one value, e.g. 0, 0.5, 1.")
    if len(parts) > MAX_IMAGES:
        raise ConfigError(
            f"The {shown} axis has {len(parts)} values; a grid makes at most {MAX_IMAGES} images."
        )
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        raise ConfigError(f"The {shown} axis needs numbers separated by commas, not {text!r}.") from None
    if (kind in ("seed", "steps") or kind.startswith("checkpoint:")) and any(v != int(v) for v in values):
        raise ConfigError(f"The {shown} axis needs whole numbers, not {text!r}.")
    if kind == "steps" and not all(1 <= v <= MAX_GENERATE_STEPS for v in values):
        raise ConfigError(f"Steps must be between 1 and {MAX_GENERATE_STEPS}, not {text!r}.")
    axis = Axis(kind, values)
    axis.apply(values[0], (GenerationParams(""), {}))  # an unknown kind is refused before any image
    return axis


def crossfade(first: str, second: str, points: int = 5) -> Axis:
    """Two adapters at (1 - t, t) for t from 0 to 1: one style sliding into another."""
    return Axis(f"crossfade:{first}:{second}", tuple(i / (points - 1) for i in range(points)))


def xy_plot(
    generator: Generator,
    params: GenerationParams,
    x: Axis,
    y: Axis | None = None,
    weights: dict[str, Weight] | None = None,
    on_image: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """The grid image (rows: y values, columns: x values) with its axes labelled and every image's
    parameters in its PNG text; at most 16 images, all with one seed unless an axis varies it."""
    rows: Sequence[float | None] = y.values if y else (None,)
    check_count(len(x.values) * len(rows))
    base: Setting = (replace(params, seed=resolve_seed(params.seed)), dict(weights or {}))
    cells, total = [], len(x.values) * len(rows)
    for row in rows:
        setting = y.apply(row, base) if y and row is not None else base
        for column in x.values:
            cell_params, cell_weights = x.apply(column, setting)
            cells.append(generator.generate(cell_params, cell_weights))
            if on_image:
                on_image(len(cells), total)
    labels = [
        [" | ".join([y.label(row), x.label(col)] if y else [x.label(col)]) for col in x.values]
        for row in rows
    ]
    grid = _draw(
        cells, [x.label(v) for v in x.values], [y.label(v) for v in y.values] if y else [""], len(x.values)
    )
    grid.info["parameters"] = labeled_parameters(
        list(zip([label for row in labels for label in row], cells, strict=True))
    )
    return grid


LABEL_SIZE = 14  # px: readable when the grid is shown scaled down in a gallery


def _draw(
    cells: list[Image.Image], column_labels: list[str], row_labels: list[str], columns: int
) -> Image.Image:
    """Cells enlarged (nearest) to a visible size, column labels on top (wrapped to the cell's width)
    and row labels on the left."""
    first = cells[0]
    scale = max(1, MIN_SHOWN_SIDE // min(first.size))
    cell_w, cell_h = first.width * scale, first.height * scale
    font = ImageFont.load_default(size=LABEL_SIZE)
    line_h = LABEL_SIZE + 3
    wrapped = [_wrap(label, font, cell_w - 6) for label in column_labels]
    top = max(len(lines) for lines in wrapped) * line_h + 6
    left = max((int(font.getlength(t)) for t in row_labels), default=0) + 10 if any(row_labels) else 0
    rows = len(cells) // columns
    grid = Image.new("RGB", (left + columns * cell_w, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for index, lines in enumerate(wrapped):
        for number, line in enumerate(lines):
            draw.text((left + index * cell_w + 3, 3 + number * line_h), line, fill="black", font=font)
    for index, label in enumerate(row_labels):
        draw.text((4, top + index * cell_h + (cell_h - LABEL_SIZE) // 2), label, fill="black", font=font)
    for index, cell in enumerate(cells):
        x, y = left + (index % columns) * cell_w, top + (index // columns) * cell_h
        grid.paste(cell.resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y))
    return grid


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """`text` in lines no wider than `width` where its words allow."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]
