"""The adapter file: diffusers' LoRA layout, diffusers' `lora_adapter_metadata` header, sdlora's facts.

diffusers reads `lora_adapter_metadata` (the peft `LoraConfig` per component) when it loads a file;
without it, it assumes alpha = rank, and an adapter trained with another alpha would silently give
different images. sdlora's training facts go in the same safetensors header under `sdlora.*` keys.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

import sdlora
from sdlora.files import atomic_write_bytes

FACTS_PREFIX = "sdlora."


class AdapterError(ValueError):
    """An adapter file can't be read or used; the message names the file and the reason."""


@dataclass
class AdapterFacts:
    """What a user wants to know about an adapter later: how and on what it was trained."""

    name: str
    base_model: str
    family: str
    rank: int
    alpha: float
    targets: str
    instance_prompt: str = ""
    class_prompt: str = ""
    trigger_words: str = ""
    steps: int = 0
    resolution: int = 0
    learning_rate: float = 0.0
    image_count: int = 0
    text_encoder: bool = False
    seed: int = 0
    version: str = sdlora.__version__
    created: str = dataclasses.field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_metadata(self) -> dict[str, str]:
        return {FACTS_PREFIX + key: _to_text(value) for key, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> AdapterFacts | None:
        """The facts in a file's header, or None for files sdlora did not write."""
        values = {k[len(FACTS_PREFIX):]: v for k, v in metadata.items() if k.startswith(FACTS_PREFIX)}
        if "rank" not in values:
            return None
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                kwargs[f.name] = _from_text(values[f.name], f.type)
        return cls(**kwargs)


def _to_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _from_text(text: str, type_name: str) -> Any:
    if type_name == "int":
        return int(float(text))
    if type_name == "float":
        return float(text)
    if type_name == "bool":
        return text.lower() == "true"
    return text


def trigger_words(instance_prompt: str, class_prompt: str | None) -> str:
    """The words of the instance prompt that the class prompt lacks ('a photo of sks dog' -> 'sks')."""
    if not class_prompt:
        return instance_prompt
    known = {w.lower() for w in re.findall(r"[\w-]+", class_prompt)}
    extra = [w for w in re.findall(r"[\w-]+", instance_prompt) if w.lower() not in known]
    return " ".join(extra) or instance_prompt


def lora_config_metadata(config: LoraConfig) -> dict[str, Any]:
    """A peft LoraConfig as the JSON-able dict diffusers stores and reads back."""
    data = config.to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}


def save_adapter(
    path: str | Path,
    *,
    unet_lora: dict[str, torch.Tensor],
    unet_config: LoraConfig,
    facts: AdapterFacts,
    text_encoder_lora: dict[str, torch.Tensor] | None = None,
    text_encoder_config: LoraConfig | None = None,
) -> Path:
    """Write an adapter atomically in diffusers' format from peft state dicts (`get_peft_model_state_dict`)."""
    tensors = StableDiffusionPipeline.pack_weights(convert_state_dict_to_diffusers(unet_lora), "unet")
    config_meta = {f"unet.{k}": v for k, v in lora_config_metadata(unet_config).items()}
    if text_encoder_lora:
        if text_encoder_config is None:
            raise ValueError("text_encoder_config is needed with text_encoder_lora")
        tensors.update(
            StableDiffusionPipeline.pack_weights(convert_state_dict_to_diffusers(text_encoder_lora), "text_encoder")
        )
        config_meta.update({f"text_encoder.{k}": v for k, v in lora_config_metadata(text_encoder_config).items()})
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(config_meta, sort_keys=True)}
    metadata.update(facts.to_metadata())
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata=metadata))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header's metadata; a malformed header gives an AdapterError naming the file."""
    path = _check_path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"{path}: not a readable .safetensors file ({error}).") from error


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a .safetensors adapter."""
    path = _check_path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
            return tensors, dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"{path}: not a readable .safetensors file ({error}).") from error


def _check_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise AdapterError(f"{path}: only .safetensors adapter files are loaded (pickled formats can run code).")
    if not path.is_file():
        raise AdapterError(f"{path}: no such file.")
    return path


def summarize(path: str | Path) -> dict[str, Any]:
    """What `sdlora inspect` prints: facts, LoRA config, and per-component key and rank counts."""
    tensors, metadata = read_adapter(path)
    components: dict[str, dict[str, Any]] = defaultdict(lambda: {"keys": 0, "modules": set(), "ranks": set()})
    for key, tensor in tensors.items():
        component = key.split(".", 1)[0]
        info = components[component]
        info["keys"] += 1
        module = re.sub(r"\.(lora_[AB]|lora\.(up|down)|lora_(up|down))\.weight$|\.alpha$", "", key)
        info["modules"].add(module)
        if re.search(r"(lora_A|lora\.down|lora_down)\.weight$", key):
            info["ranks"].add(int(tensor.shape[0]))
    lora_config = json.loads(metadata[LORA_ADAPTER_METADATA_KEY]) if LORA_ADAPTER_METADATA_KEY in metadata else {}
    facts = AdapterFacts.from_metadata(metadata)
    return {
        "file": str(path),
        "size_bytes": Path(path).stat().st_size,
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "components": {
            name: {"keys": c["keys"], "modules": len(c["modules"]), "ranks": sorted(c["ranks"])}
            for name, c in sorted(components.items())
        },
        "lora_config": lora_config,
        "facts": dataclasses.asdict(facts) if facts else None,
        "other_metadata": {
            k: v for k, v in metadata.items() if k != LORA_ADAPTER_METADATA_KEY and not k.startswith(FACTS_PREFIX)
        },
    }
