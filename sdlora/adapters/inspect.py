"""What an adapter is for, and whether it fits a base: judged from key names and tensor shapes.

A LoRA loaded onto the wrong base is the classic silent failure ("keys not loaded"); sdlora checks
every module against the base first and refuses with an explanation instead.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
            width = int(module.down.shape[1])
            found = [f for f in candidates if f.cross_attention_dim == width]
            return found[0].name if found else f"other ({width}-wide text)"
    if "text_encoder" in components:
        width = int(next(iter(components["text_encoder"].values())).down.shape[1])
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
    def ok(self) -> bool:
        return not self.unmapped and sum(self.mapped.values()) > 0

    def explain(self, what: str, base: str) -> str:
        total = sum(self.mapped.values()) + len(self.unmapped)
        examples = "; ".join(f"{name} ({reason})" for name, reason in self.unmapped[:3])
        return (
            f"{what} is a LoRA for {self.lora_family} but the base {base} is {self.base_family}: "
            f"{len(self.unmapped)} of {total} modules do not fit, e.g. {examples}. "
            "Use a base of the family the LoRA was trained on."
        )


def check_compatibility(lora: LoraFile, pipe: DiffusionPipeline) -> Compatibility:
    """Match every LoRA module to the base module of the same name and shape."""
    report = Compatibility(guess_family(lora), base_family(pipe))
    for component, modules in lora.components().items():
        model = getattr(pipe, component, None)
        if model is None:
            report.unmapped.extend(
                (f"{component}.{name}", f"the base has no {component}") for name in modules
            )
            continue
        targets = {strip_text_model(name): m for name, m in model.named_modules()}
        mapped = 0
        for name, module in modules.items():
            target = targets.get(name)
            weight = getattr(getattr(target, "base_layer", target), "weight", None)
            expected = (int(module.up.shape[0]), int(module.down.shape[1]))
            if weight is None:
                report.unmapped.append((f"{component}.{name}", "no such layer in the base"))
            elif tuple(weight.shape[:2]) != expected:
                report.unmapped.append(
                    (
                        f"{component}.{name}",
                        f"LoRA {expected[1]}->{expected[0]}, base {weight.shape[1]}->{weight.shape[0]}",
                    )
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
            "ranks": dict(Counter(str(m.rank) for m in modules.values())),
            "alphas": dict(Counter(f"{m.alpha:g}" for m in modules.values())),
            "per_module": {name: {"rank": m.rank, "alpha": m.alpha} for name, m in modules.items()},
        }
    summary: dict[str, Any] = {
        "file": str(path),
        "format": lora.format,
        "family": guess_family(lora),
        "size_bytes": _size(Path(path)),
        "modules": len(lora.modules),
        "parameters": sum(m.down.numel() + m.up.numel() for m in lora.modules.values()),
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
            "mapped": report.mapped,
            "unmapped": [f"{name}: {reason}" for name, reason in report.unmapped],
        }
    return summary


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
