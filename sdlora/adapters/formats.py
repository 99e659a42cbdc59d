"""LoRA files in the three layouts people exchange, through one format-neutral form.

- diffusers: `unet.<module>.lora_A.weight` / `lora_B` (older files: `lora.down`/`lora.up`,
  `lora_linear_layer.down`/`up`), the peft LoraConfig per component in `lora_adapter_metadata`.
- kohya (AUTOMATIC1111, ComfyUI): `lora_unet_<module_with_underscores>.lora_down.weight`,
  `.lora_up.weight` and a scalar `.alpha` per module; the text encoders' prefixes per family are in
  `sdlora.models.families`; kohya's `ss_*` and `modelspec.*` metadata. U-Net modules are named as in
  diffusers (A1111-era SD 1.x files, sdlora's own) or as in the original SGM U-Net (kohya's SDXL files:
  `lora_unet_input_blocks_4_1_...`); the latter are renamed by diffusers' own converters.
- peft: a folder with `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight`) and
  `adapter_config.json`, one per component (sub-folders `unet/`, `text_encoder/` when there are several).

Every reader returns a `LoraFile`: per module its down (A) and up (B) matrices and its true alpha, so
converting never loses alpha (diffusers' `convert_state_dict_to_kohya` writes alpha = rank).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
from peft import LoraConfig
from safetensors.torch import save as safetensors_bytes

from sdlora.adapters.files import FACTS_PREFIX, AdapterError, AdapterFacts, lora_config_metadata, read_adapter
from sdlora.config import FORMATS
from sdlora.files import atomic_write_bytes, atomic_write_text
from sdlora.models.families import FAMILIES, Family, family_with_components, get_family, kohya_components

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# Parts of diffusers/transformers module names that contain underscores: kohya's names flatten every
# "." to "_", so these are re-joined when reading them back.
_COMPOUNDS = (
    "down_blocks",
    "up_blocks",
    "mid_block",
    "transformer_blocks",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "proj_in",
    "proj_out",
    "text_model",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "final_layer_norm",
    "layer_norm1",
    "layer_norm2",
    "time_emb_proj",
    "conv_shortcut",
    "conv_in",
    "conv_out",
    "time_embedding",
    "linear_1",
    "linear_2",
    "add_embedding",
    "add_k_proj",
    "add_v_proj",
)
_SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")


@dataclass
class LoraModule:
    down: torch.Tensor  # lora_A / lora_down: (rank, in_features)
    up: torch.Tensor  # lora_B / lora_up: (out_features, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """The weight change this module adds: (alpha / rank) · up @ down."""
        up, down = self.up.flatten(1).float(), self.down.flatten(1).float()
        return (self.alpha / self.rank) * up @ down


@dataclass
class LoraFile:
    """An adapter independent of its layout: `component.module` -> LoraModule, plus the file's metadata."""

    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "diffusers"

    def components(self) -> dict[str, dict[str, LoraModule]]:
        parts: dict[str, dict[str, LoraModule]] = {}
        for key, module in self.modules.items():
            component, name = key.split(".", 1)
            parts.setdefault(component, {})[name] = module
        return parts

    @property
    def facts(self) -> AdapterFacts | None:
        return AdapterFacts.from_metadata(self.metadata)

    def family(self) -> Family:
        """The family to label the file for: the one it was trained on, else the first with all its parts."""
        components = set(self.components())
        trained_on = FAMILIES.get(self.facts.family) if self.facts else None
        if trained_on and components <= set(trained_on.components):
            return trained_on
        family = family_with_components(components)
        if family is None:
            raise AdapterError(f"No model family has all of {sorted(self.components())}.")
        return family


def lora_from_peft(
    parts: dict[str, tuple[dict[str, torch.Tensor], float]], metadata: dict[str, str]
) -> LoraFile:
    """From `{component: (get_peft_model_state_dict(model), alpha)}`, as the trainer holds them."""
    modules = {}
    for component, (state, alpha) in parts.items():
        for module, down, up in _peft_pairs(state):
            modules[f"{component}.{module}"] = LoraModule(
                down.detach().to("cpu", copy=True), up.detach().to("cpu", copy=True), float(alpha)
            )
    return LoraFile(modules, metadata)


def _peft_pairs(state: dict[str, torch.Tensor]):
    """(module name, down, up) for each lora_A / lora_B pair of a peft state dict; names lose peft's
    `base_model.model.` wrapper and transformers' `text_model.` level."""
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            stem = key.removesuffix(".lora_A.weight")
            yield (
                strip_text_model(stem.removeprefix("base_model.model.")),
                down,
                state[f"{stem}.lora_B.weight"],
            )


# ----------------------------------------------------------------------------------------------- reading


def read_lora(path: str | Path, unet_config: Any | None = None) -> LoraFile:
    """Read a LoRA in any of the three layouts (a peft folder, or a .safetensors file).

    `unet_config`, the base U-Net's config, numbers the blocks of kohya's SGM-named (SDXL) files; without
    it SDXL's layout is assumed.
    """
    path = Path(path)
    if path.is_dir():
        return _read_peft_folder(path)
    tensors, metadata = read_adapter(path)
    if any(k.startswith(tuple(kohya_components())) for k in tensors):
        return LoraFile(_modules_from_kohya(tensors, path, unet_config), metadata, "kohya")
    return LoraFile(_modules_from_diffusers(tensors, metadata, path), metadata, "diffusers")


def _modules_from_kohya(
    tensors: dict[str, torch.Tensor], path: Path, unet_config: Any | None
) -> dict[str, LoraModule]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, kind = key.partition(".")
        grouped.setdefault(name, {})[kind] = value
    names = _kohya_module_names(list(grouped), unet_config)
    modules = {}
    for name, parts in grouped.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise AdapterError(f"{path}: kohya module {name} lacks its lora_down/lora_up pair.")
        down = parts["lora_down.weight"]
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(down.shape[0])
        modules[names[name]] = LoraModule(down, parts["lora_up.weight"], alpha)
    return modules


def _kohya_module_names(names: list[str], unet_config: Any | None) -> dict[str, str]:
    """kohya module name -> 'component.module' in diffusers/transformers naming."""
    prefixes = kohya_components()
    split: dict[str, tuple[str, str]] = {}
    for name in names:
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None:
            raise AdapterError(f"Unrecognised kohya key {name!r}.")
        split[name] = (prefixes[prefix], name[len(prefix) :])
    unet = [name for name, (component, _) in split.items() if component == "unet"]
    sgm = any(block in name for name in unet for block in _SGM_BLOCKS)
    result = {name: f"{component}.{_unflatten(flat)}" for name, (component, flat) in split.items()}
    if sgm:
        result.update({name: f"unet.{module}" for name, module in _sgm_unet_names(unet, unet_config).items()})
    return result


def _sgm_unet_names(names: list[str], unet_config: Any | None) -> dict[str, str]:
    """kohya's names for SDXL's original (SGM) U-Net -> diffusers module names, by the converters
    `load_lora_weights` itself uses, so a file reads here as it loads in diffusers."""
    config = unet_config or SimpleNamespace(layers_per_block=get_family("sdxl").layers_per_block)
    renumbered = _maybe_map_sgm_blocks_to_diffusers({f"{n}.lora_down.weight": n for n in names}, config)
    result = {}
    for key, name in renumbered.items():
        (peft_key,) = convert_unet_state_dict_to_peft({_convert_unet_lora_key(key): None})
        result[name] = peft_key.removesuffix(".lora_A.weight").replace(".processor.", ".")
    return result


def _unflatten(flat: str) -> str:
    """'down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q' -> 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'."""
    words = flat.split("_")
    parts: list[str] = []
    i = 0
    while i < len(words):
        for size in (3, 2):
            joined = "_".join(words[i : i + size])
            if joined in _COMPOUNDS:
                parts.append(joined)
                i += size
                break
        else:
            parts.append(words[i])
            i += 1
    name = ".".join(parts)
    if name.endswith(".to_out"):
        name += ".0"
    return strip_text_model(name)


def strip_text_model(name: str) -> str:
    """Text-encoder names with or without transformers 4's `text_model.` level compare as one."""
    return name.removeprefix("text_model.")


_DIFFUSERS_SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
)


def _modules_from_diffusers(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path
) -> dict[str, LoraModule]:
    configs = _configs_from_metadata(metadata)
    alphas = {k.removesuffix(".alpha"): float(v.item()) for k, v in tensors.items() if k.endswith(".alpha")}
    modules = {}
    for key, down in tensors.items():
        for down_suffix, up_suffix in _DIFFUSERS_SUFFIXES:
            if key.endswith(down_suffix):
                stem = key.removesuffix(down_suffix)
                up = tensors.get(stem + up_suffix)
                if up is None:
                    raise AdapterError(f"{path}: {key} has no matching {up_suffix[1:]} tensor.")
                component, module = stem.split(".", 1)
                module = strip_text_model(module.replace(".processor.", "."))
                rank = int(down.shape[0])
                alpha = alphas.get(stem, _config_alpha(configs.get(component), module, rank))
                modules[f"{component}.{module}"] = LoraModule(down, up, alpha)
                break
    if not modules:
        raise AdapterError(f"{path}: no LoRA weights found (neither diffusers nor kohya key names).")
    return modules


def _configs_from_metadata(metadata: dict[str, str]) -> dict[str, dict]:
    if LORA_ADAPTER_METADATA_KEY not in metadata:
        return {}
    configs: dict[str, dict] = {}
    for key, value in json.loads(metadata[LORA_ADAPTER_METADATA_KEY]).items():
        component, _, option = key.partition(".")
        configs.setdefault(component, {})[option] = value
    return configs


def _config_alpha(config: dict | None, module: str, rank: int) -> float:
    """A module's alpha under a peft LoraConfig dict (alpha_pattern first), or rank when unknown."""
    if not config:
        return float(rank)
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module) or module.endswith(pattern):
            return float(alpha)
    return float(config.get("lora_alpha", rank))


def _read_peft_folder(folder: Path) -> LoraFile:
    subfolders = [folder / c for c in COMPONENTS if (folder / c / "adapter_config.json").is_file()]
    sources = [(p.name, p) for p in subfolders] or [("unet", folder)]
    modules: dict[str, LoraModule] = {}
    metadata: dict[str, str] = {}
    for component, source in sources:
        config_path, weights_path = source / "adapter_config.json", source / "adapter_model.safetensors"
        if not config_path.is_file() or not weights_path.is_file():
            raise AdapterError(
                f"{source}: a peft folder needs adapter_config.json and adapter_model.safetensors "
                "(pickled adapter_model.bin is not loaded)."
            )
        config = json.loads(config_path.read_text())
        tensors, file_metadata = read_adapter(weights_path)
        metadata.update(file_metadata)
        for module, down, up in _peft_pairs(tensors):
            modules[f"{component}.{module}"] = LoraModule(
                down, up, _config_alpha(config, module, down.shape[0])
            )
    return LoraFile(modules, metadata, "peft")


# ----------------------------------------------------------------------------------------------- writing


def write_lora(lora: LoraFile, out: str | Path, fmt: str) -> Path:
    """Write `lora` in `fmt` ('diffusers' or 'kohya': a .safetensors file; 'peft': a folder), atomically."""
    if fmt not in FORMATS:
        raise ValueError(f"Unknown format {fmt!r}; choose from {', '.join(FORMATS)}.")
    out = Path(out)
    if fmt == "peft":
        return _write_peft_folder(lora, out)
    if out.suffix != ".safetensors":
        raise AdapterError(f"{out}: {fmt} adapters are .safetensors files.")
    tensors, metadata = (_to_kohya if fmt == "kohya" else _to_diffusers)(lora)
    return atomic_write_bytes(out, safetensors_bytes(tensors, metadata=metadata))


def peft_config_for(modules: dict[str, LoraModule]) -> LoraConfig:
    """A LoraConfig naming exactly these modules, with rank/alpha patterns where a module differs."""
    rank = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(modules),
        rank_pattern={name: m.rank for name, m in modules.items() if m.rank != rank},
        alpha_pattern={name: m.alpha for name, m in modules.items() if m.alpha != alpha},
    )


def _to_diffusers(lora: LoraFile) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    config_meta: dict[str, object] = {}
    for component, modules in lora.components().items():
        for name, module in modules.items():
            key = f"{component}.{_file_module_name(component, name)}"
            tensors[f"{key}.lora_A.weight"] = module.down.contiguous()
            tensors[f"{key}.lora_B.weight"] = module.up.contiguous()
        config = lora_config_metadata(peft_config_for(modules))
        config_meta.update({f"{component}.{k}": v for k, v in config.items()})
    metadata = {k: v for k, v in lora.metadata.items() if not k.startswith(("ss_", "modelspec."))}
    metadata.update({"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(config_meta, sort_keys=True)})
    return tensors, metadata


def diffusers_state_dict(lora: LoraFile) -> dict[str, torch.Tensor]:
    """diffusers-layout tensors with each module's alpha / rank folded into its up matrix.

    For handing to `load_lora_weights` as a dict, where no metadata travels: the folded weights give
    exactly the same delta with the loader's default alpha = rank.
    """
    tensors = {}
    for key, module in lora.modules.items():
        component, name = key.split(".", 1)
        stem = f"{component}.{_file_module_name(component, name)}"
        tensors[f"{stem}.lora_A.weight"] = module.down.float()
        tensors[f"{stem}.lora_B.weight"] = module.up.float() * (module.alpha / module.rank)
    return tensors


def _file_module_name(component: str, module: str) -> str:
    """Text encoders are written with the `text_model.` level that every loader (old and new) accepts."""
    return f"text_model.{module}" if component.startswith("text_encoder") else module


def _to_kohya(lora: LoraFile) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    prefixes = lora.family().kohya_prefixes
    tensors: dict[str, torch.Tensor] = {}
    for key, module in lora.modules.items():
        component, name = key.split(".", 1)
        flat = prefixes[component] + _file_module_name(component, name).replace(".", "_")
        tensors[f"{flat}.lora_down.weight"] = module.down.contiguous()
        tensors[f"{flat}.lora_up.weight"] = module.up.contiguous()
        tensors[f"{flat}.alpha"] = torch.tensor(float(module.alpha))
    return tensors, kohya_metadata(lora)


def kohya_metadata(lora: LoraFile) -> dict[str, str]:
    """kohya's `ss_*` keys and the `modelspec.*` header, from sdlora's training facts where present."""
    facts = lora.facts
    family = lora.family()
    ranks = Counter(m.rank for m in lora.modules.values())
    alphas = Counter(m.alpha for m in lora.modules.values())
    rank, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    name = facts.name if facts else "lora"
    metadata = {k: v for k, v in lora.metadata.items() if k.startswith(FACTS_PREFIX)}
    metadata.update(
        {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank),
            "ss_network_alpha": f"{alpha:g}",
            "ss_base_model_version": family.kohya_base_version,
            "ss_v2": str(family.kohya_v2),
            "ss_output_name": name,
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"{family.modelspec_architecture}/lora",
            "modelspec.implementation": "diffusers",
            "modelspec.title": name,
        }
    )
    if facts:
        metadata.update(
            {
                "ss_sd_model_name": facts.base_model,
                "ss_steps": str(facts.steps),
                "ss_learning_rate": f"{facts.learning_rate:g}",
                "ss_num_train_images": str(facts.image_count),
                "ss_resolution": f"({facts.resolution}, {facts.resolution})",
                "ss_seed": str(facts.seed),
                "ss_training_comment": f"trigger words: {facts.trigger_words}",
                "ss_tag_frequency": json.dumps({name: json.loads(facts.tag_frequency or "{}")}),
                "modelspec.trigger_phrase": facts.trigger_words,
                "modelspec.resolution": f"{facts.resolution}x{facts.resolution}",
                "modelspec.date": facts.created,
                "modelspec.prediction_type": family.modelspec_prediction_type,
            }
        )
    return metadata


def _write_peft_folder(lora: LoraFile, out: Path) -> Path:
    components = lora.components()
    for component, modules in components.items():
        folder = out / component if len(components) > 1 or component != "unet" else out
        tensors = {}
        for name, module in modules.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = module.down.contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = module.up.contiguous()
        atomic_write_bytes(
            folder / "adapter_model.safetensors", safetensors_bytes(tensors, metadata={"format": "pt"})
        )
        config = lora_config_metadata(peft_config_for(modules))
        atomic_write_text(folder / "adapter_config.json", json.dumps(config, indent=2, default=str))
    return out
