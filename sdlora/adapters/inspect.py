"""What an adapter is for, and whether it fits a base: judged from key names and tensor shapes.

A LoRA loaded onto the wrong base is the classic silent failure ("keys not loaded"); sdlora checks
every module against the base first and refuses with an explanation instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

from sdlora.adapters.files import FACTS_PREFIX
from sdlora.adapters.formats import LoraFile, read_lora, strip_text_model
from sdlora.models.families import FAMILIES, family_of


def guess_family(lora: LoraFile) -> str:
    """A family name, or 'other (N-wide text)', from the LoRA's components and its layers' input widths.

    The components decide where only one family has them all (a second text encoder: SDXL); otherwise
    the width that cross-attention reads, or else the text encoder's width, picks the family.
    """
    components = lora.components()
    candidates = [f for f in FAMILIES.values() if set(components) <= set(f.components)]
    if len(candidates) == 1:
        return candidates[0].name
    for name, module in components.get("unet", {}).items():
        if ".attn2.to_k" in f".{name}" or ".attn2.to_v" in f".{name}":
            width = int(module.shape[1])
            found = [f for f in candidates if f.cross_attention_dim == width]
            return found[0].name if found else f"other ({width}-wide text)"
    if "text_encoder" in components:
        width = int(next(iter(components["text_encoder"].values())).shape[1])
        found = [f for f in candidates if f.text_encoders[0].width == width]
        return found[0].name if found else f"other ({width}-wide text encoder)"
    return "unknown"


def base_family(pipe: DiffusionPipeline) -> str:
    """The base's family name, or 'other (N-wide text)' when its cross-attention width is not the family's."""
    family = family_of(pipe)
    width = pipe.unet.config.cross_attention_dim
    return family.name if width == family.cross_attention_dim else f"other ({width}-wide text)"


@dataclass
class Compatibility:
    """How many of a LoRA's modules land on a base's modules, and why the others don't."""

    lora_family: str
    base_family: str
    mapped: dict[str, int] = field(default_factory=dict)
    unmapped: list[tuple[str, str]] = field(default_factory=list)  # (module, reason)

    @property
    def family_mismatch(self) -> bool:
        """Both families are determined and differ (a known family against another known one, or two
        'other' widths): refused even where some shapes fit. A known family against an 'other' base
        (a miniature of it, say) is judged module by module instead."""
        if "unknown" in (self.lora_family, self.base_family) or self.lora_family == self.base_family:
            return False
        others = [f.startswith("other") for f in (self.lora_family, self.base_family)]
        return all(others) or not any(others)

    @property
    def ok(self) -> bool:
        """The family matches and most modules fit: the rest are skipped (and listed) when loading."""
        fitting = sum(self.mapped.values())
        return not self.family_mismatch and fitting > 0 and fitting >= len(self.unmapped)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """Modules left out when a fitting adapter is loaded."""
        return self.unmapped if self.ok else []

    def explain(self, what: str, base: str) -> str:
        """Why `what` does not fit `base`, or which of its modules will be skipped; never both."""
        total = sum(self.mapped.values()) + len(self.unmapped)
        examples = "; ".join(f"{name} ({reason})" for name, reason in self.unmapped[:3])
        if self.family_mismatch:
            return (
                f"{what} is a LoRA for {self.lora_family} but the base {base} is {self.base_family}: "
                f"{len(self.unmapped)} of {total} modules do not fit, e.g. {examples}. "
                f"Use a base of the {self.lora_family} family."
            )
        if not self.ok:
            return (
                f"{what}{'' if self.lora_family == 'unknown' else f' (a LoRA for {self.lora_family})'} does not "
                f"fit the base {base} ({self.base_family}): {len(self.unmapped)} of {total} "
                f"modules do not fit, e.g. {examples}. It was made for a different model."
            )
        if self.unmapped:
            return (
                f"{what}: {len(self.unmapped)} of {total} modules are not in the base {base} and were "
                f"skipped: {examples}; the other {total - len(self.unmapped)} are loaded."
            )
        return f"{what}: all {total} modules fit the base {base}."


def layer_index(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """A model's layers by the names adapters use (text encoders without transformers' `text_model.`)."""
    return {strip_text_model(name): getattr(m, "base_layer", m) for name, m in model.named_modules()}


def find_layer(pipe: DiffusionPipeline, key: str) -> torch.nn.Module:
    """The layer of `pipe` that adapter module `component.module` changes."""
    component, name = key.split(".", 1)
    return layer_index(getattr(pipe, component))[name]


def check_compatibility(lora: LoraFile, pipe: DiffusionPipeline) -> Compatibility:
    """Match every adapter module to the base layer of the same name and shape."""
    report = Compatibility(guess_family(lora), base_family(pipe))
    for component, modules in lora.components().items():
        model = getattr(pipe, component, None)
        if model is None:
            report.unmapped.extend(
                (f"{component}.{name}", f"the base has no {component}") for name in modules
            )
            continue
        targets = layer_index(model)
        mapped = 0
        for name, module in modules.items():
            weight = getattr(targets.get(name), "weight", None)
            shape = module.shape
            if weight is None:
                report.unmapped.append((f"{component}.{name}", "no such layer in the base"))
            elif shape[0] != weight.shape[0] or math.prod(shape[1:]) != math.prod(weight.shape[1:]):
                report.unmapped.append(
                    (f"{component}.{name}", f"adapter {tuple(shape)}, base {tuple(weight.shape)}")
                )
            else:
                mapped += 1
        report.mapped[component] = mapped
    return report


def summarize(path: str | Path, pipe: DiffusionPipeline | None = None) -> dict[str, Any]:
    """What `sdlora inspect` prints: format, family, facts, rank and alpha per module, fit to a base."""
    lora = read_lora(path, pipe.unet.config if pipe is not None else None)
    metadata = lora.metadata
    facts = lora.facts
    components = {}
    for component, modules in lora.components().items():
        components[component] = {
            "modules": len(modules),
            "types": dict(Counter(m.label for m in modules.values())),
            "ranks": dict(Counter(str(m.rank) for m in modules.values())),
            "alphas": dict(Counter(_alpha_text(m) for m in modules.values())),
            "per_module": {
                name: {"type": m.label, "sizes": m.sizes(), "rank": m.rank, "alpha": m.alpha}
                for name, m in modules.items()
            },
        }
    summary: dict[str, Any] = {
        "file": str(path),
        "format": lora.format,
        "family": guess_family(lora),
        "size_bytes": _size(Path(path)),
        "modules": len(lora.modules),
        "types": lora.kinds,
        "all_understood": True,  # read_lora refuses any tensor kind it does not understand
        "parameters": sum(m.parameters for m in lora.modules.values()),
        "components": components,
        "facts": dataclasses.asdict(facts) if facts else None,
        "lora_config": json.loads(metadata[LORA_ADAPTER_METADATA_KEY])
        if LORA_ADAPTER_METADATA_KEY in metadata
        else {},
        "other_metadata": {
            k: v
            for k, v in metadata.items()
            if k != LORA_ADAPTER_METADATA_KEY and not k.startswith(FACTS_PREFIX)
        },
    }
    if pipe is not None:
        report = check_compatibility(lora, pipe)
        summary["compatibility"] = {
            "base_family": report.base_family,
            "ok": report.ok,
            "explanation": report.explain(str(path), "given"),
            "mapped": report.mapped,
            "unmapped": [f"{name}: {reason}" for name, reason in report.unmapped],
        }
    return summary


def _alpha_text(module) -> str:
    return "none (scale 1)" if module.alpha is None else f"{module.alpha:g}"


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
