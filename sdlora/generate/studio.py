"""A long-lived generator for the app: one shared base model, library adapters by name, images saved.

A base model takes seconds to minutes to load and much memory, so all of the app's sessions share one
`Generator` (the newest base asked for) behind a lock; a Generator is not safe to use from two threads.
Each call names its owner (the page's session), so a Stop button, or a page that went away, stops only
its own generation.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sdlora.adapters import read_lora
from sdlora.adapters.library import adapter_path
from sdlora.config import ConfigError, check_generation, parse_size
from sdlora.demo import base_spec
from sdlora.files import DiskError
from sdlora.generate.generator import SCHEDULERS, GenerationParams, Generator, size_choices
from sdlora.generate.grids import Axis, xy_plot
from sdlora.generate.images import image_history, labeled_parameters, parse_parameters, save_png
from sdlora.generate.prompts import lora_weights
from sdlora.models import resolve_base
from sdlora.outputs import Outputs


def make_params(
    prompt: str, negative: str, seed: float, steps: float, guidance: float, size: str, scheduler: str
) -> GenerationParams:
    """GenerationParams from a form's values; 'native' (or empty) size means the base model's own size."""
    if not (prompt or "").strip():
        raise ConfigError("Write a prompt: say what to draw.")
    check_generation(prompt, negative, int(steps))
    width = height = None
    if size and size.strip().lower() != "native":
        width, height = parse_size(size.strip())
    return GenerationParams(
        prompt.strip(),
        (negative or "").strip(),
        int(seed),
        int(steps),
        float(guidance),
        width,
        height,
        scheduler,
    )


@dataclass
class Result:
    """Images saved as PNGs with their parameters: (path, label) pairs for a gallery, and the parameters text."""

    images: list[tuple[str, str]]
    parameters: str


@dataclass
class Recalled:
    """The Generate form's values a PNG's parameters give back; None where the text does not say."""

    prompt: str
    negative: str
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    size: str | None = None
    scheduler: str | None = None
    adapters: list[tuple[str, float]] = field(default_factory=list)


# sdlora's "Lora: a:0.8, b:1.5" field: entries are NAME:WEIGHT (no space after the colon), so the list
# ends where the next "Key: value" field starts.
_LORA_FIELD = re.compile(r"(?:^|, )Lora: (.+?)(?=, \w[\w \-/]*: |$)", re.M)


def recall(text: str) -> Recalled:
    """Form values from a PNG's parameters text (sdlora's or AUTOMATIC1111's; a grid's first image):
    adapters come from the `Lora:` field, except those the prompt's `<lora:...>` tags already select."""
    fields = parse_parameters(text)
    tagged = set(lora_weights(fields.get("Prompt", ""), fields.get("Negative prompt", ""))[2])
    listed = _LORA_FIELD.search(text)
    adapters = []
    for entry in filter(None, (part.strip() for part in (listed[1] if listed else "").split(","))):
        name, _, weight = entry.rpartition(":")
        number = _number(weight.split("/")[-1], float)  # "te/unet": the U-Net's weight
        if name and name not in tagged and number is not None:
            adapters.append((name, number))
    samplers = {shown: name for name, (_, _, shown) in SCHEDULERS.items()}
    return Recalled(
        fields.get("Prompt", ""),
        fields.get("Negative prompt", ""),
        _number(fields.get("Seed"), int),
        _number(fields.get("Steps"), int),
        _number(fields.get("CFG scale"), float),
        fields.get("Size") or None,
        samplers.get(fields.get("Sampler", "")),
        adapters,
    )


def _number(text: str | None, kind: type):
    try:
        return kind(text)
    except (TypeError, ValueError):
        return None


class Studio:
    """The shared base model and the adapters loaded onto it."""

    def __init__(self, outputs: Outputs):
        self.outputs = outputs
        self._lock = threading.Lock()
        self._generator: Generator | None = None
        self._spec: str | None = None
        self._owner: str | None = None  # whose call holds the generator now
        self._owner_lock = threading.Lock()
        self._checkpoints: Outputs | None = None  # run checkpoints made adapters, for X/Y plots

    def load(self, text: str | None) -> str:
        """Load the base `text` names ('demo' or empty: the demo model) unless it is loaded; returns its name."""
        with self._lock:
            return self._base(text).base_name

    def sizes(self, text: str | None) -> list[str]:
        """The sizes worth offering for base `text` (loaded if it is not): its native size first."""
        with self._lock:
            return size_choices(self._base(text).native_size)

    def stop(self, owner: str) -> bool:
        """Stop `owner`'s generation between two denoising steps; False if it has none running."""
        with self._owner_lock:
            if self._generator is None or owner is None or self._owner != owner:
                return False
            self._generator.stop.set()
            return True

    @contextmanager
    def _session(self, text: str | None, owner: str | None) -> Iterator[Generator]:
        """The generator for base `text`, held by `owner` until the block ends."""
        with self._lock:
            generator = self._base(text)
            with self._owner_lock:
                generator.stop.clear()  # a Stop that came after the previous call had finished
                self._owner = owner
            try:
                yield generator
            finally:
                with self._owner_lock:
                    self._owner = None

    def _base(self, text: str | None) -> Generator:
        spec = resolve_base(base_spec(text))
        if self._generator is None or spec != self._spec:
            self._generator, self._spec = None, None
            self._generator, self._spec = Generator(spec, adapter_dir=self.outputs.adapters), spec
        return self._generator

    def _weights(self, generator: Generator, adapters: Sequence[tuple[str, float]]) -> dict[str, float]:
        """Pipe names and weights for (library name, weight) pairs; the Generator reloads a file that was
        replaced since it was loaded (retrained under the same name)."""
        return {
            generator.load_adapter(adapter_path(self.outputs, name)): float(weight)
            for name, weight in adapters
        }

    def fit(self, path: Path) -> str:
        """Whether an adapter file fits the base in use (the demo model if none was loaded yet)."""
        with self._lock:
            report = self._base(self._spec).check_fit(read_lora(path), path.name)
        if report.skipped:
            return report.explain(path.name, "in use")
        return f"It fits the base in use ({sum(report.mapped.values())} modules, {report.lora_family})."

    def generate(
        self,
        text: str | None,
        params: GenerationParams,
        adapters: Sequence[tuple[str, float]],
        owner: str | None = None,
    ) -> Result:
        with self._session(text, owner) as generator:
            image = generator.generate(params, self._weights(generator, adapters))
            return self._save([("image", image)])

    def compare(
        self,
        text: str | None,
        params: GenerationParams,
        adapters: Sequence[tuple[str, float]],
        owner: str | None = None,
    ) -> Result:
        """Base alone, each adapter alone at its weight, then the mix, all with one seed."""
        with self._session(text, owner) as generator:
            return self._save(generator.compare(params, self._weights(generator, adapters)))

    def sweep(
        self,
        text: str | None,
        params: GenerationParams,
        adapters: Sequence[tuple[str, float]],
        weights: Sequence[float],
        owner: str | None = None,
    ) -> Result:
        """The first adapter at each weight, the others held at theirs."""
        if not adapters:
            raise ConfigError("A sweep needs an adapter: switch one on.")
        with self._session(text, owner) as generator:
            names = self._weights(generator, adapters)
            first = next(iter(names))
            return self._save(generator.sweep(params, first, list(weights), names))

    def xy(
        self,
        text: str | None,
        params: GenerationParams,
        adapters: Sequence[tuple[str, float]],
        x: Axis,
        y: Axis | None = None,
        owner: str | None = None,
        on_image: Callable[[int, int], None] | None = None,
    ) -> Result:
        """An X/Y plot saved as one labelled PNG; axes name library adapters ('weight:NAME',
        'crossfade:A:B') or a run folder ('checkpoint:RUN', values: steps), the mix `adapters` holds
        the others at their weights."""
        named = [name for axis in (x, y) if axis for name in _adapter_names(axis)]
        with self._session(text, owner) as generator:
            weights = self._weights(generator, adapters)
            pipe_names = {name: generator.load_adapter(adapter_path(self.outputs, name)) for name in named}
            x, y = (self._resolved(generator, axis, pipe_names) if axis else None for axis in (x, y))
            grid = xy_plot(generator, params, x, y, weights, on_image)
            return self._save([("X/Y plot", grid)])

    def _resolved(self, generator: Generator, axis: Axis, pipe_names: Mapping[str, str]) -> Axis:
        """The axis with adapters named as the generator knows them; a run's checkpoints become adapters."""
        kind, _, run = axis.kind.partition(":")
        if kind != "checkpoint":
            return _renamed(axis, pipe_names)
        checkpoints = self.checkpoint_runs().get(run)
        if checkpoints is None:
            raise ConfigError(f"No run called {run!r} with checkpoints under {self.outputs.runs}.")
        missing = [f"{v:g}" for v in axis.values if int(v) not in checkpoints]
        if missing:
            raise ConfigError(
                f"{run} has no checkpoint at step {', '.join(missing)}; "
                f"it has {', '.join(map(str, checkpoints)) or 'none'}."
            )
        names = [generator.load_adapter(self._checkpoint_file(run, int(v))) for v in axis.values]
        return Axis(":".join(["checkpoint", *names]), axis.values)

    def checkpoint_runs(self) -> dict[str, list[int]]:
        """Runs under outputs/runs that have checkpoints: folder name -> checkpoint steps, newest run first."""
        from sdlora.train.runs import list_runs  # the runs on disk, as the Runs tab lists them

        return {
            info.folder.path.name: [_step(path) for path in info.checkpoints]
            for info in list_runs(self.outputs)
            if info.checkpoints
        }

    def _checkpoint_file(self, run: str, step: int) -> Path:
        """A run's checkpoint as an adapter file, written once into a folder that lives as long as the app."""
        from sdlora.train.runs import RunFolder, checkpoint_adapter, run_info

        if self._checkpoints is None:
            folder = tempfile.mkdtemp(prefix="sdlora-checkpoints-")
            weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
            self._checkpoints = Outputs(Path(folder))
        path = self._checkpoints.adapter_file(f"{run}_step{step}")
        if not path.is_file():
            folder = RunFolder(self.outputs.runs / run)
            (checkpoint,) = [p for p in run_info(folder.path).checkpoints if _step(p) == step]
            checkpoint_adapter(folder, checkpoint, self._checkpoints, path.stem)
        return path

    def history(self) -> list[tuple[Path, dict[str, str]]]:
        """Images generated here (outputs/images), newest first, with their parameters."""
        return image_history(self.outputs.images)

    def _save(self, labeled: list[tuple[str, object]]) -> Result:
        """Save each image as a PNG; on a full or read-only disk, say which were kept."""
        now = datetime.now()
        images: list[tuple[str, str]] = []
        for index, (label, image) in enumerate(labeled):
            try:
                images.append((str(save_png(image, self.outputs.image_file(f"-{index}", now))), label))
            except DiskError as error:
                kept = f"{len(images)} of {len(labeled)} images were saved" + (
                    f" ({', '.join(Path(path).name for path, _ in images)})." if images else "."
                )
                raise DiskError(error.errno, f"{error.strerror} {kept}") from error
        parameters = labeled_parameters(labeled)
        return Result(images, parameters if len(labeled) > 1 else labeled[0][1].info.get("parameters", ""))


def _step(checkpoint: Path) -> int:
    """The training step of a checkpoint folder (`step-000020`)."""
    return int(checkpoint.name.rpartition("-")[2])


def _adapter_names(axis: Axis) -> list[str]:
    kind, _, names = axis.kind.partition(":")
    return names.split(":") if kind in ("weight", "crossfade") else []


def _renamed(axis: Axis, pipe_names: Mapping[str, str]) -> Axis:
    """The axis with library adapter names replaced by the names the generator knows them by."""
    kind, _, names = axis.kind.partition(":")
    if kind not in ("weight", "crossfade"):
        return axis
    return Axis(":".join([kind, *(pipe_names[name] for name in names.split(":"))]), axis.values)
