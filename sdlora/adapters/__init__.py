"""LoRA adapter files: saving in diffusers' format with training facts, reading, inspecting."""

from sdlora.adapters.files import (
    AdapterError,
    AdapterFacts,
    lora_config_metadata,
    read_adapter,
    read_metadata,
    save_adapter,
    summarize,
    trigger_words,
)

__all__ = [
    "AdapterError",
    "AdapterFacts",
    "lora_config_metadata",
    "read_adapter",
    "read_metadata",
    "save_adapter",
    "summarize",
    "trigger_words",
]
