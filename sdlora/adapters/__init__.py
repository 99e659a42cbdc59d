"""LoRA adapter files: every layout in and out, training facts, inspection, compatibility, merging."""

from sdlora.adapters.files import (
    AdapterError,
    AdapterFacts,
    read_adapter,
    read_metadata,
    trigger_words,
)
from sdlora.adapters.formats import (
    FORMATS,
    LoraFile,
    LoraModule,
    lora_from_peft,
    read_lora,
    write_lora,
)
from sdlora.adapters.inspect import Compatibility, check_compatibility, guess_family, summarize

__all__ = [
    "FORMATS",
    "AdapterError",
    "AdapterFacts",
    "Compatibility",
    "LoraFile",
    "LoraModule",
    "check_compatibility",
    "guess_family",
    "lora_from_peft",
    "read_adapter",
    "read_lora",
    "read_metadata",
    "summarize",
    "trigger_words",
    "write_lora",
]
