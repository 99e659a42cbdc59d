"""A Generator holds one base pipeline and named adapters, and renders prompts with any mix of them."""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
)
from PIL import Image

import sdlora
from sdlora.adapters import AdapterError, Compatibility, LoraFile, check_compatibility, read_lora
from sdlora.adapters.inspect import find_layer
from sdlora.adapters.modules import NetworkModule
from sdlora.config import MAX_IMAGES, ConfigError
from sdlora.errors import SdloraError
from sdlora.files import safe_name
from sdlora.generate.prompts import PromptError, lora_weights
from sdlora.models import base_label, load_base, native_resolution

# name -> (scheduler class, extra config, the name other tools print for it)
SCHEDULERS = {
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"),
    "euler-a": (EulerAncestralDiscreteScheduler, {}, "Euler a"),
    "ddim": (DDIMScheduler, {}, "DDIM"),
}


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 30
    guidance: float = 7.0
    width: int | None = None
    height: int | None = None
    scheduler: str = "dpm++"


MAX_WEIGHT = 4.0  # adapter weights outside [-4, 4] are refused: no shared LoRA is meant for more
MENU_SIDE_FACTOR = 2  # sizes offered in menus: up to 2x the base's native size per side
MAX_SIDE_FACTOR = 4  # sizes accepted at all (typed): up to 4x; beyond, a base draws tiled repeats, slowly


@dataclass
class LoadedAdapter:
    """An adapter as the Generator holds it: its file, and each module paired with the layer it changes."""

    path: Path
    stamp: tuple
    layers: dict[str, tuple[torch.nn.Module, NetworkModule]]  # "component.module" -> (layer, module)
    skipped: list[tuple[str, str]]  # (module, reason) for modules the base does not have


class Generator:
    """Loads the base once; adapters are loaded by file under descriptive names and mixed per call.

    A mix is written straight into the base's weights, W = W0 + sum_i(w_i * dW_i), computed from a
    pristine copy of every layer an adapter touches (as AUTOMATIC1111 and ComfyUI apply LoRAs). So
    each denoising step costs what the base alone costs, every network type (LoRA, LoCon, LoHa, LoKr,
    DoRA, full) mixes the same way, and no history of mixes can drift the base: with no adapter on,
    the weights are the pristine ones, bit for bit, in any dtype.
    """

    def __init__(
        self,
        base: DiffusionPipeline | str | None = None,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        adapter_dir: str | Path | None = None,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        if isinstance(base, DiffusionPipeline):
            self.pipe, self.base_name = base, base.name_or_path or "pipeline"
        else:
            self.pipe = load_base(base, dtype=dtype)
            self.base_name = self.pipe.name_or_path
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self._scheduler_configs = dict(self.pipe.scheduler.config)
        self.loaded: dict[str, LoadedAdapter] = {}
        self._pristine: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # layer -> (W0, b0)
        self._active: dict[str, tuple[float, float]] = {}
        self.stop = threading.Event()  # set by a Stop button (or a page that went away): ends the image
        self.adapter_dir = Path(adapter_dir) if adapter_dir else None  # where <lora:NAME> tags find files

    @property
    def adapters(self) -> dict[str, Path]:
        """Loaded adapters: name -> file."""
        return {name: adapter.path for name, adapter in self.loaded.items()}

    @property
    def native_size(self) -> int:
        return native_resolution(self.pipe)

    def load_adapter(self, path: str | Path, name: str | None = None) -> str:
        """Load an adapter in any layout and network type; returns the name to use in weights.

        Every module is checked against the base first: a file for another model family is refused
        with an explanation; modules the base lacks (a few, in a file of the right family) are
        skipped and listed in `skipped(name)`.
        """
        path = Path(path)
        name = "lora_" + safe_name(name or path.stem).replace(".", "_")
        stamp = _file_stamp(path)
        if name in self.loaded:
            if self.loaded[name].path == path.resolve():
                if self.loaded[name].stamp == stamp:
                    return name
                self.unload_adapter(name)  # the file changed since (retrained under the same name): reload
            else:
                suffix = 2
                while f"{name}_{suffix}" in self.loaded:
                    suffix += 1
                name = f"{name}_{suffix}"
        lora = read_lora(path, self.pipe.unet.config)
        report = self.check_fit(lora, str(path))
        skipped = {module for module, _ in report.unmapped}
        layers = {}
        for key, module in lora.modules.items():
            if key not in skipped:
                layer = find_layer(self.pipe, key)
                layers[key] = (layer, module.to(layer.weight.device))
                if key not in self._pristine:
                    bias = getattr(layer, "bias", None)
                    self._pristine[key] = (
                        layer.weight.detach().clone(),
                        None if bias is None else bias.detach().clone(),
                    )
        self.loaded[name] = LoadedAdapter(path.resolve(), stamp, layers, list(report.unmapped))
        return name

    def skipped(self, name: str) -> list[tuple[str, str]]:
        """The modules of adapter `name` that the base lacks, with the reason: they were not loaded."""
        return self.loaded[name].skipped

    def check_fit(self, lora: LoraFile, shown: str) -> Compatibility:
        """Every module of `lora` checked against this base; AdapterError naming `shown` if it doesn't fit."""
        report = check_compatibility(lora, self.pipe)
        if not report.ok:
            raise AdapterError(report.explain(shown, base_label(self.base_name)))
        return report

    def unload_adapter(self, name: str) -> None:
        self.activate({k: v for k, v in self._active.items() if k != name})
        del self.loaded[name]
        in_use = {key for adapter in self.loaded.values() for key in adapter.layers}
        for key in set(self._pristine) - in_use:
            del self._pristine[key]  # its layer already holds the pristine weight again

    def activate(self, weights: Mapping[str, Weight]) -> None:
        """Make exactly these adapters active at these weights: a finite number in [-4, 4] each, or a
        (text encoder, U-Net) pair as A1111's `<lora:name:te:unet>` gives."""
        unknown = [name for name in weights if name not in self.loaded]
        if unknown:
            raise KeyError(f"Unknown adapter(s) {unknown}; loaded: {sorted(self.loaded)}")
        weights = {name: _pair(w, self._label(name)) for name, w in weights.items()}
        if weights == self._active:
            return
        touched = {key for name in {*weights, *self._active} for key in self.loaded[name].layers}
        with torch.no_grad():
            for key in touched:
                self._write_layer(key, weights)
        self._active = weights

    def _write_layer(self, key: str, weights: Mapping[str, tuple[float, float]]) -> None:
        """W = W0 + sum of the active adapters' changes for one layer, computed in fp32 from W0."""
        weight0, bias0 = self._pristine[key]
        part = 1 if key.startswith("unet.") else 0  # which of the (text encoder, U-Net) weights applies
        parts = [
            (self.loaded[name].layers[key][1], w[part])
            for name, w in weights.items()
            if key in self.loaded[name].layers and w[part] != 0
        ]
        layer = next(a.layers[key][0] for a in self.loaded.values() if key in a.layers)
        if not parts:
            layer.weight.copy_(weight0)
            if bias0 is not None:
                layer.bias.copy_(bias0)
            return
        weight = weight0.float()
        delta = sum(module.apply_to(weight, w).to(weight.device) for module, w in parts)
        layer.weight.copy_((weight + delta).to(weight0.dtype))
        bias_changes = [(m.bias_delta(), w) for m, w in parts if m.bias_delta() is not None]
        if bias0 is not None and bias_changes:
            bias = bias0.float() + sum(w * d.to(bias0.device) for d, w in bias_changes)
            layer.bias.copy_(bias.to(bias0.dtype))

    def _set_scheduler(self, name: str) -> None:
        if name not in SCHEDULERS:
            raise ValueError(f"Unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}.")
        cls, extra, _ = SCHEDULERS[name]
        if not isinstance(self.pipe.scheduler, cls):
            self.pipe.scheduler = cls.from_config(self._scheduler_configs, **extra)

    @torch.inference_mode()
    def generate(self, params: GenerationParams, adapters: Mapping[str, Weight] | None = None) -> Image.Image:
        """One image; its `info['parameters']` says how it was made (the seed actually used included).

        `<lora:name:weight>` tags in the prompts add adapters by name (loaded from `adapter_dir` when
        not loaded yet) and are removed from the text the encoder sees.
        """
        params = replace(params, seed=resolve_seed(params.seed))
        text, negative, tags = lora_weights(params.prompt, params.negative_prompt)
        adapters = {**(adapters or {}), **{self.adapter_for_tag(name): w for name, w in tags.items()}}
        self.activate(adapters)
        self._set_scheduler(params.scheduler)
        width = params.width or self.native_size
        height = params.height or self.native_size
        check_size(width, height, self.native_size)
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        image = self.pipe(
            text,
            negative_prompt=negative or None,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance,
            width=width,
            height=height,
            generator=generator,
            callback_on_step_end=_stop_when(self.stop),
        ).images[0]
        if self.stop.is_set():
            self.stop.clear()
            raise GenerationStopped("Stopped: the image was not finished.")
        image.info["parameters"] = self.describe(params, adapters, width, height)
        return image

    def adapter_for_tag(self, name: str) -> str:
        """The loaded adapter a `<lora:NAME:...>` tag means: by file name, else loaded from `adapter_dir`."""
        for loaded, adapter in self.loaded.items():
            if name in (adapter.path.stem, loaded, loaded.removeprefix("lora_")):
                return loaded
        candidate = self.adapter_dir / f"{name}.safetensors" if self.adapter_dir else None
        if candidate is not None and safe_name(name) == name and candidate.is_file():
            return self.load_adapter(candidate)
        known = sorted({a.path.stem for a in self.loaded.values()})
        if self.adapter_dir and self.adapter_dir.is_dir():
            known = sorted({*known, *(p.stem for p in self.adapter_dir.glob("*.safetensors"))})
        raise PromptError(
            f"<lora:{name}:...>: no adapter called {name!r}; known: {', '.join(known) or 'none'}."
        )

    def describe(
        self, params: GenerationParams, adapters: Mapping[str, Weight], width: int, height: int
    ) -> str:
        """Parameters in the text form AUTOMATIC1111 and other tools write into PNGs."""
        fields = [
            f"Steps: {params.steps}",
            f"Sampler: {SCHEDULERS[params.scheduler][2]}",
            f"CFG scale: {params.guidance:g}",
            f"Seed: {params.seed}",
            f"Size: {width}x{height}",
            f"Model: {base_label(self.base_name)}",
        ]
        if adapters:
            fields.append(
                "Lora: " + ", ".join(f"{self._label(name)}:{weight:g}" for name, weight in adapters.items())
            )
        fields.append(f"Version: sdlora {sdlora.__version__}")
        lines = [params.prompt]
        if params.negative_prompt:
            lines.append(f"Negative prompt: {params.negative_prompt}")
        lines.append(", ".join(fields))
        return "\n".join(lines)

    def compare(
        self, params: GenerationParams, adapters: Mapping[str, float]
    ) -> list[tuple[str, Image.Image]]:
        """Same seed throughout: the base alone, each adapter alone at its weight, then the mix."""
        params = replace(params, seed=resolve_seed(params.seed))
        results = [("base", self.generate(params))]
        for name, weight in adapters.items():
            results.append((f"{self._label(name)} {_text(weight)}", self.generate(params, {name: weight})))
        if len(adapters) > 1:
            results.append(("mix", self.generate(params, adapters)))
        return results

    def sweep(
        self,
        params: GenerationParams,
        name: str,
        weights: list[float],
        others: Mapping[str, float] | None = None,
    ) -> list[tuple[str, Image.Image]]:
        """One adapter at a row of weights (others held fixed), same seed."""
        params = replace(params, seed=resolve_seed(params.seed))
        check_count(len(weights))
        others = {k: v for k, v in (others or {}).items() if k != name}
        return [(f"{self._label(name)} {w:g}", self.generate(params, {**others, name: w})) for w in weights]

    def _label(self, name: str) -> str:
        return self.loaded[name].path.stem if name in self.loaded else name


Weight = float | tuple[float, float]


def _pair(weight: Weight, label: str) -> tuple[float, float]:
    if isinstance(weight, tuple):
        return check_weight(weight[0], label), check_weight(weight[1], label)
    value = check_weight(weight, label)
    return value, value


def _text(weight: Weight) -> str:
    return f"{weight[0]:g}/{weight[1]:g}" if isinstance(weight, tuple) else f"{weight:g}"


def check_weight(weight: float, label: str) -> float:
    """An adapter weight as a float, refused (ConfigError naming the adapter) unless finite and in range."""
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise ConfigError(f"The weight of {label} must be a number, not {weight!r}.") from None
    if not math.isfinite(value) or abs(value) > MAX_WEIGHT:
        raise ConfigError(
            f"The weight of {label} must be between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}, not {weight}."
        )
    return value


class GenerationStopped(SdloraError):
    """Generation was stopped on request between two denoising steps."""


def _stop_when(stop: threading.Event):
    """A diffusers step-end callback that interrupts the pipeline once `stop` is set."""

    def callback(pipe, step: int, timestep, tensors: dict) -> dict:
        if stop.is_set():
            pipe._interrupt = True  # diffusers' own flag: the loop skips the remaining steps
        return tensors

    return callback


def size_choices(native: int) -> list[str]:
    """Sizes worth offering for a base: its native size first, then larger and wider ones up to 2x per
    side (the demo model's 32 px never gets a 512 px choice that would take minutes and draw noise)."""
    step = max(8, native // 8)
    sides = sorted({native, native * 3 // 4 // step * step, native * 3 // 2 // step * step, native * 2})
    sides = [s for s in sides if 8 <= s <= native * MENU_SIDE_FACTOR]
    choices = [f"{native}x{native}"] + [f"{s}x{s}" for s in sides if s != native]
    wide = native * 3 // 2 // step * step
    choices += [f"{wide}x{native}", f"{native}x{wide}"]
    return list(dict.fromkeys(choices))


def check_size(width: int, height: int, native: int) -> None:
    """Refuse sizes beyond 4x the base's native size per side, naming the limit."""
    limit = native * MAX_SIDE_FACTOR
    if width > limit or height > limit:
        raise ConfigError(
            f"{width}x{height} is too large for this base (native {native}x{native}); at most {limit} px per side."
        )


def resolve_seed(seed: int) -> int:
    """-1 means a random seed, as in AUTOMATIC1111; the one drawn is the one recorded."""
    return random.randrange(2**32) if seed == -1 else seed


def check_count(count: int) -> None:
    """One click makes at most MAX_IMAGES images, so no request holds the generator for long."""
    if count > MAX_IMAGES:
        raise ConfigError(f"That is {count} images; one click makes at most {MAX_IMAGES}.")


def _file_stamp(path: Path) -> tuple:
    """When and how big: changes whenever an adapter file (or a peft folder's files) is rewritten."""
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    try:
        return tuple((st.st_mtime_ns, st.st_size) for st in (f.stat() for f in files if f.is_file()))
    except OSError:
        return ()
