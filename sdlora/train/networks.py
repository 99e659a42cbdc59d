"""The trained network: which modules get adapter layers (the family table names them), and the peft
config of each network type.

One entry in `NETWORKS` per type; a new one (LoCon, LoHa, LoKr, DoRA) is a function from the run's
options and target names to its peft config, added there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator
from peft import LoraConfig, PeftConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from sdlora.config import TrainConfig
from sdlora.models import family_of
from sdlora.train.result import TrainingError

NetworkConfig = Callable[[TrainConfig, list[str]], PeftConfig]


def lora_config(config: TrainConfig, targets: list[str]) -> LoraConfig:
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
    )


NETWORKS: dict[str, NetworkConfig] = {"lora": lora_config}


def unet_target_modules(unet: torch.nn.Module, targets: str) -> list[str]:
    """Module names for adapters: every attention projection of the family's table, or only the
    cross-attention (`attn2`) ones."""
    projections = family_of(unet).unet_targets
    if targets == "all":
        return list(projections)
    return sorted(
        name
        for name, _ in unet.named_modules()
        if name.rpartition("attn2.")[2] in projections and ".attn2." in name
    )


def add_adapters(
    config: TrainConfig,
    unet: torch.nn.Module,
    text_encoders: dict[str, torch.nn.Module],
    network: str = "lora",
) -> dict[str, torch.nn.Module]:
    """Adapter layers on the U-Net's attention (and the text encoders' when they train).

    Returns the parts being trained by component name ('unet', 'text_encoder', ...).
    """
    make_config = NETWORKS[network]
    unet.add_adapter(make_config(config, unet_target_modules(unet, config.targets)))
    parts = {"unet": unet}
    if config.text_encoder:
        for part, encoder in text_encoders.items():
            encoder.add_adapter(make_config(config, list(family_of(unet).text_encoder_targets)))
            parts[part] = encoder
    return parts


def adapter_state(accelerator: Accelerator, parts: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The adapter weights of every trained part, keyed 'unet.…' / 'text_encoder.…' (peft names)."""
    state = {}
    for prefix, model in parts.items():
        for key, value in get_peft_model_state_dict(accelerator.unwrap_model(model)).items():
            state[f"{prefix}.{key}"] = value
    return state


def restore_adapter_state(
    accelerator: Accelerator, parts: dict[str, torch.nn.Module], state: dict[str, torch.Tensor]
) -> None:
    """Load what `adapter_state` saved into the same parts; a mismatch (another rank or targets) fails."""
    for prefix, model in parts.items():
        part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        result = set_peft_model_state_dict(accelerator.unwrap_model(model), part)
        if getattr(result, "unexpected_keys", None):
            raise TrainingError(f"Checkpoint does not match the {prefix} LoRA: {result.unexpected_keys[:3]}")
