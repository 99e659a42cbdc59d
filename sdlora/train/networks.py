"""The trained network: which modules get adapter layers (the family table names them), and the peft
config of each network type.

One entry in `NETWORKS` per `--network` type: a function from the run's options and target names to
its peft config. DoRA and rsLoRA are options of the LoRA config; the file is written from the live
layers by `sdlora.adapters.from_peft`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from sdlora.config import TrainConfig
from sdlora.models import family_of
from sdlora.train.result import TrainingError

# (run options, linear target names, conv target names) -> the peft config of one part
NetworkConfig = Callable[[TrainConfig, list[str], list[str]], PeftConfig]


def lora_config(config: TrainConfig, targets: list[str], conv: list[str]) -> LoraConfig:
    """LoRA, and LoCon when `conv` names convolutions (with their own rank and alpha); DoRA and rsLoRA
    are peft's own options."""
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.dropout,
        init_lora_weights="gaussian",
        target_modules=targets + conv,
        **_conv_patterns(config, conv),
        use_dora=config.dora,
        use_rslora=config.rslora,
    )


def loha_config(config: TrainConfig, targets: list[str], conv: list[str]) -> LoHaConfig:
    """LoHa, on the convolutions too as LyCORIS does (plain 2-D factors, not Tucker, so the file is the
    layout every loader reads)."""
    return LoHaConfig(
        r=config.rank,
        alpha=config.lora_alpha,
        module_dropout=config.dropout,
        target_modules=targets + conv,
        **_conv_patterns(config, conv),
    )


def lokr_config(config: TrainConfig, targets: list[str], conv: list[str]) -> LoKrConfig:
    """LoKr, on the convolutions too as LyCORIS does."""
    return LoKrConfig(
        r=config.rank,
        alpha=config.lora_alpha,
        module_dropout=config.dropout,
        target_modules=targets + conv,
        **_conv_patterns(config, conv),
    )


def _conv_patterns(config: TrainConfig, conv: list[str]) -> dict[str, dict[str, float]]:
    """The convolutions' own rank and alpha (--conv-rank, --conv-alpha), as peft's per-module patterns."""
    return {
        "rank_pattern": {name: config.conv_lora_rank for name in conv},
        "alpha_pattern": {name: config.conv_lora_alpha for name in conv},
    }


NETWORKS: dict[str, NetworkConfig] = {
    "lora": lora_config,
    "locon": lora_config,
    "loha": loha_config,
    "lokr": lokr_config,
}
# Network types that also adapt the U-Net's convolutions (LyCORIS does for LoHa and LoKr; plain LoRA
# stays on attention, as kohya's "LoRA" does).
CONV_NETWORKS = frozenset({"locon", "loha", "lokr"})


def unet_conv_modules(unet: torch.nn.Module) -> list[str]:
    """The convolutions kohya's LoCon adapts: those of the resnets and of the down/up-samplers (3x3 and
    1x1 shortcuts), not the U-Net's first and last."""
    return sorted(
        name
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Conv2d) and (".resnets." in name or "samplers." in name)
    )


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


def narrowest_layer(model: torch.nn.Module, targets: list[str]) -> tuple[str, int]:
    """The adapted layer (a full name, or a suffix as peft matches it) whose weight has the lowest
    possible rank, and that rank: min(out, in) for a linear layer, min(out, in x kernel) for a conv."""
    widths = {
        name: min(module.out_features, module.in_features)
        if isinstance(module, torch.nn.Linear)
        else min(module.out_channels, module.weight[0].numel())
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
        and any(name == t or name.endswith("." + t) for t in targets)
    }
    return min(widths.items(), key=lambda item: item[1])


def check_ranks(
    config: TrainConfig, unet: torch.nn.Module, text_encoders: dict[str, torch.nn.Module]
) -> None:
    """Refuse a rank the base's adapted layers can't hold, before anything is generated or cached."""
    layers = [narrowest_layer(unet, unet_target_modules(unet, config.targets))]
    if config.text_encoder:
        targets = list(family_of(unet).text_encoder_targets)
        layers += [narrowest_layer(encoder, targets) for encoder in text_encoders.values()]
    conv = narrowest_layer(unet, unet_conv_modules(unet)) if config.network in CONV_NETWORKS else None
    config.check_rank_fits(min(layers, key=lambda layer: layer[1]), conv)


def add_adapters(
    config: TrainConfig,
    unet: torch.nn.Module,
    text_encoders: dict[str, torch.nn.Module],
) -> dict[str, torch.nn.Module]:
    """Adapter layers of the `--network` type on the U-Net's attention (and convolutions for LoCon, LoHa
    and LoKr), and
    on the text encoders' when they train.

    Returns the parts being trained by component name ('unet', 'text_encoder', ...).
    """
    make_config = NETWORKS[config.network]
    conv = unet_conv_modules(unet) if config.network in CONV_NETWORKS else []
    unet.add_adapter(make_config(config, unet_target_modules(unet, config.targets), conv))
    parts = {"unet": unet}
    if config.text_encoder:
        for part, encoder in text_encoders.items():
            encoder.add_adapter(make_config(config, list(family_of(unet).text_encoder_targets), []))
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
    load_adapter_state({prefix: accelerator.unwrap_model(model) for prefix, model in parts.items()}, state)


def load_adapter_state(parts: dict[str, torch.nn.Module], state: dict[str, torch.Tensor]) -> None:
    for prefix, model in parts.items():
        part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        result = set_peft_model_state_dict(model, part)
        if getattr(result, "unexpected_keys", None):
            raise TrainingError(f"Checkpoint does not match the {prefix} LoRA: {result.unexpected_keys[:3]}")


def checkpoint_parts(config: TrainConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.nn.Module]:
    """The run's base (unquantized) with its adapter layers holding a checkpoint's weights, by part:
    a checkpoint becomes an adapter through the same layers, and so the same writer, as a finished run."""
    from sdlora.models import load_base
    from sdlora.train.conditioning import TextConditioner

    pipe = load_base(config.base)
    parts = add_adapters(config, pipe.unet, TextConditioner(pipe).encoders)
    load_adapter_state(parts, state)
    return parts
