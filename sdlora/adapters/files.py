"""Reading adapter files safely, and sdlora's training facts in their metadata.

Only .safetensors files are opened (pickled formats can run code). sdlora's facts live in the
safetensors header under `sdlora.*` keys, beside diffusers' `lora_adapter_metadata` (the peft
LoraConfig per component: without it diffusers assumes alpha = rank, and an adapter trained with
another alpha would silently give different images).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors import SafetensorError, safe_open

import sdlora
from sdlora.errors import SdloraError

FACTS_PREFIX = "sdlora."


class AdapterError(SdloraError, ValueError):
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
    network: str = "lora"  # --network: lora, locon, loha or lokr
    dora: bool = False
    rslora: bool = False  # scale alpha/sqrt(rank): `alpha` as given; the file's modules hold alpha*sqrt(rank)
    tag_frequency: str = "{}"  # JSON {tag: count} over the training captions, for kohya's ss_tag_frequency
    epochs: int = 0  # passes over the (repeated) training images
    dataset_dirs: str = "{}"  # JSON {folder: {"n_repeats": r, "img_count": n}}, kohya's ss_dataset_dirs
    version: str = sdlora.__version__
    created: str = dataclasses.field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        self.tag_frequency = bounded_tag_frequency(self.tag_frequency)

    def started_at(self) -> int:
        """`created` as Unix seconds (kohya's ss_training_started_at)."""
        try:
            return int(datetime.fromisoformat(self.created).timestamp())
        except ValueError:
            return 0

    def to_metadata(self) -> dict[str, str]:
        return {FACTS_PREFIX + key: _to_text(value) for key, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> AdapterFacts | None:
        """The facts in a file's header, or None for files sdlora did not write."""
        values = {k[len(FACTS_PREFIX) :]: v for k, v in metadata.items() if k.startswith(FACTS_PREFIX)}
        if "rank" not in values:
            return None
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                kwargs[f.name] = _from_text(values[f.name], f.type)
        return cls(**kwargs)


# The header of a safetensors file must stay under 100 MB to be read back; captions are user text of any
# length, so only the most frequent tags, each cut short, go into the metadata (a few tens of KiB at most).
MAX_TAGS = 200
MAX_TAG_CHARS = 100


def bounded_tag_frequency(text: str) -> str:
    """`{tag: count}` JSON cut to the MAX_TAGS most frequent tags, each at most MAX_TAG_CHARS long."""
    try:
        counts = json.loads(text or "{}")
    except json.JSONDecodeError:
        return "{}"
    if not isinstance(counts, dict):
        return "{}"
    if len(counts) <= MAX_TAGS and all(len(str(tag)) <= MAX_TAG_CHARS for tag in counts):
        return text or "{}"
    bounded: dict[str, int] = {}
    for tag, count in sorted(counts.items(), key=lambda item: -_count(item[1])):
        short = str(tag)[:MAX_TAG_CHARS]
        bounded[short] = bounded.get(short, 0) + _count(count)
        if len(bounded) >= MAX_TAGS:
            break
    return json.dumps(bounded)


def _count(value: Any) -> int:
    return value if isinstance(value, int) else 0


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
        raise AdapterError(
            f"{path}: only .safetensors adapter files are loaded (pickled formats can run code)."
        )
    if not path.is_file():
        raise AdapterError(f"{path}: no such file.")
    return path
