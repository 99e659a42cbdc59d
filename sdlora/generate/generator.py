"""A Generator holds one base pipeline and named adapters, and renders prompts with any mix of them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
from sdlora.adapters.formats import diffusers_state_dict
from sdlora.files import safe_name
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


class Generator:
    """Loads the base once; adapters are loaded by file under descriptive names and mixed per call."""

    def __init__(
        self,
        base: DiffusionPipeline | str | None = None,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        fuse: bool = True,
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
        self.adapters: dict[str, Path] = {}
        self._stamps: dict[str, tuple] = {}  # (mtime, size) of each loaded file, to notice a rewrite
        self.fuse = fuse
        self._fused: dict[str, float] | None = None  # the mix currently folded into the base weights

    @property
    def native_size(self) -> int:
        return native_resolution(self.pipe)

    def load_adapter(self, path: str | Path, name: str | None = None) -> str:
        """Load a LoRA in any layout (diffusers, kohya, peft folder); returns the name to use in weights.

        Every module is checked against the base first, so a LoRA for another model family is refused
        with an explanation instead of half-loading. Names are prefixed ('lora_...') because short names
        like 'b' collide with module names in diffusers' key checks.
        """
        path = Path(path)
        name = "lora_" + safe_name(name or path.stem).replace(".", "_")  # peft module names can't hold dots
        stamp = _file_stamp(path)
        if name in self.adapters:
            if self.adapters[name] == path.resolve():
                if self._stamps[name] == stamp:
                    return name
                self.unload_adapter(name)  # the file changed since (retrained under the same name): reload
            else:
                suffix = 2
                while f"{name}_{suffix}" in self.adapters:
                    suffix += 1
                name = f"{name}_{suffix}"
        lora = read_lora(path, self.pipe.unet.config)
        self.check_fit(lora, str(path))
        self.activate({})  # new LoRA layers go onto unfused weights
        self.pipe.load_lora_weights(diffusers_state_dict(lora), adapter_name=name)
        self.adapters[name] = path.resolve()
        self._stamps[name] = stamp
        return name

    def check_fit(self, lora: LoraFile, shown: str) -> Compatibility:
        """Every module of `lora` checked against this base; AdapterError naming `shown` if it doesn't fit."""
        report = check_compatibility(lora, self.pipe)
        if not report.ok:
            raise AdapterError(report.explain(shown, base_label(self.base_name)))
        return report

    def unload_adapter(self, name: str) -> None:
        self.activate({})
        self.pipe.delete_adapters([name])
        del self.adapters[name], self._stamps[name]

    def activate(self, weights: Mapping[str, float]) -> None:
        """Make exactly these adapters active at these weights.

        With `fuse` on, the mix is folded into the base weights, so each denoising step costs what
        the base alone costs; it is unfolded only when the mix changes (a slider moved).
        """
        unknown = [name for name in weights if name not in self.adapters]
        if unknown:
            raise KeyError(f"Unknown adapter(s) {unknown}; loaded: {sorted(self.adapters)}")
        weights = {name: float(w) for name, w in weights.items()}
        if weights == self._fused:
            return
        if self._fused is not None:
            self.pipe.unfuse_lora()  # each pipeline class knows its LoRA components
            self._fused = None
        if not weights:
            if self.adapters:
                self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        self.pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
        if self.fuse:
            self.pipe.fuse_lora(adapter_names=list(weights))
            self._fused = weights

    def _set_scheduler(self, name: str) -> None:
        if name not in SCHEDULERS:
            raise ValueError(f"Unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}.")
        cls, extra, _ = SCHEDULERS[name]
        if not isinstance(self.pipe.scheduler, cls):
            self.pipe.scheduler = cls.from_config(self._scheduler_configs, **extra)

    @torch.inference_mode()
    def generate(self, params: GenerationParams, adapters: Mapping[str, float] | None = None) -> Image.Image:
        """One image; its `info['parameters']` says how it was made."""
        adapters = dict(adapters or {})
        self.activate(adapters)
        self._set_scheduler(params.scheduler)
        width = params.width or self.native_size
        height = params.height or self.native_size
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        image = self.pipe(
            params.prompt,
            negative_prompt=params.negative_prompt or None,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance,
            width=width,
            height=height,
            generator=generator,
        ).images[0]
        image.info["parameters"] = self.describe(params, adapters, width, height)
        return image

    def describe(
        self, params: GenerationParams, adapters: Mapping[str, float], width: int, height: int
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
                "Lora: "
                + ", ".join(f"{self.adapters[name].stem}:{weight:g}" for name, weight in adapters.items())
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
        results = [("base", self.generate(params))]
        for name, weight in adapters.items():
            results.append((f"{self._label(name)} {weight:g}", self.generate(params, {name: weight})))
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
        others = {k: v for k, v in (others or {}).items() if k != name}
        return [(f"{self._label(name)} {w:g}", self.generate(params, {**others, name: w})) for w in weights]

    def _label(self, name: str) -> str:
        return self.adapters[name].stem if name in self.adapters else name


def _file_stamp(path: Path) -> tuple:
    """When and how big: changes whenever an adapter file (or a peft folder's files) is rewritten."""
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    try:
        return tuple((st.st_mtime_ns, st.st_size) for st in (f.stat() for f in files if f.is_file()))
    except OSError:
        return ()
