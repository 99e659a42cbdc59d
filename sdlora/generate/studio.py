"""A long-lived generator for the app: one shared base model, library adapters by name, images saved.

A base model takes seconds to minutes to load and much memory, so all of the app's sessions share one
`Generator` (the newest base asked for) behind a lock; a Generator is not safe to use from two threads.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sdlora.adapters import read_lora
from sdlora.adapters.library import adapter_path
from sdlora.config import ConfigError, check_generation, parse_size
from sdlora.demo import base_spec
from sdlora.files import DiskError
from sdlora.generate.generator import GenerationParams, Generator
from sdlora.generate.images import labeled_parameters, save_png
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


class Studio:
    """The shared base model and the adapters loaded onto it."""

    def __init__(self, outputs: Outputs):
        self.outputs = outputs
        self._lock = threading.Lock()
        self._generator: Generator | None = None
        self._spec: str | None = None

    def load(self, text: str | None) -> str:
        """Load the base `text` names ('demo' or empty: the demo model) unless it is loaded; returns its name."""
        with self._lock:
            return self._base(text).base_name

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
        self, text: str | None, params: GenerationParams, adapters: Sequence[tuple[str, float]]
    ) -> Result:
        with self._lock:
            generator = self._base(text)
            image = generator.generate(params, self._weights(generator, adapters))
            return self._save([("image", image)])

    def compare(
        self, text: str | None, params: GenerationParams, adapters: Sequence[tuple[str, float]]
    ) -> Result:
        """Base alone, each adapter alone at its weight, then the mix, all with one seed."""
        with self._lock:
            generator = self._base(text)
            return self._save(generator.compare(params, self._weights(generator, adapters)))

    def sweep(
        self,
        text: str | None,
        params: GenerationParams,
        adapters: Sequence[tuple[str, float]],
        weights: Sequence[float],
    ) -> Result:
        """The first adapter at each weight, the others held at theirs."""
        if not adapters:
            raise ConfigError("A sweep needs an adapter: switch one on.")
        with self._lock:
            generator = self._base(text)
            names = self._weights(generator, adapters)
            first = next(iter(names))
            return self._save(generator.sweep(params, first, list(weights), names))

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
