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

import hashlib
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
from sdlora.adapters.modules import LoraModule, NetworkModule, module_from_tensors
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
# LyCORIS's own networks (`create_lycoris` on a U-Net) name their modules `lycoris_...`.
_EXTRA_PREFIXES = {"lycoris_": "unet"}


def read_prefixes() -> dict[str, str]:
    """Every key prefix of a kohya / LyCORIS file -> the component it names."""
    return {**kohya_components(), **_EXTRA_PREFIXES}


@dataclass
class LoraFile:
    """An adapter independent of its layout: `component.module` -> its module, plus the file's metadata."""

    modules: dict[str, NetworkModule]
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "diffusers"

    def components(self) -> dict[str, dict[str, NetworkModule]]:
        parts: dict[str, dict[str, NetworkModule]] = {}
        for key, module in self.modules.items():
            component, name = key.split(".", 1)
            parts.setdefault(component, {})[name] = module
        return parts

    @property
    def facts(self) -> AdapterFacts | None:
        return AdapterFacts.from_metadata(self.metadata)

    @property
    def kinds(self) -> dict[str, int]:
        """How many modules of each network type ('LoRA', 'LoHa+DoRA', ...)."""
        return dict(Counter(m.label for m in self.modules.values()))

    @property
    def plain_lora(self) -> bool:
        """Only plain LoRA modules: the diffusers and peft layouts can hold it."""
        return all(
            type(m) is LoraModule and m.mid is None and m.dora_scale is None for m in self.modules.values()
        )

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
                float(alpha), down=down.detach().to("cpu", copy=True), up=up.detach().to("cpu", copy=True)
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
    """Read an adapter in any common layout (a peft folder, or a .safetensors file).

    `unet_config`, the base U-Net's config, numbers the blocks of kohya's SGM-named (SDXL) files; without
    it SDXL's layout is assumed.
    """
    path = Path(path)
    if path.is_dir():
        return _read_peft_folder(path)
    tensors, metadata = read_adapter(path)
    if any(k.startswith(tuple(read_prefixes())) for k in tensors):
        return LoraFile(_modules_from_kohya(tensors, path, unet_config), metadata, "kohya")
    return LoraFile(_modules_from_diffusers(tensors, metadata, path), metadata, "diffusers")


def _modules_from_kohya(
    tensors: dict[str, torch.Tensor], path: Path, unet_config: Any | None
) -> dict[str, NetworkModule]:
    """kohya / LyCORIS keys: `<prefix><module_with_underscores>.<tensor kind>`; every kind is understood
    (LoRA, LoCon with Tucker `lora_mid`, LoHa, LoKr, full diffs, DoRA scales) or the file is refused."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, kind = key.partition(".")
        grouped.setdefault(name, {})[kind] = value
    names = _kohya_module_names(list(grouped), unet_config)
    modules = {}
    for name, parts in grouped.items():
        module = module_from_tensors(parts)
        if isinstance(module, str):
            raise AdapterError(
                f"{path}: module {name} {module}; sdlora refuses the file rather than drop it."
            )
        if isinstance(module, LoraModule) and module.alpha is None:
            module.alpha = float(module.rank)
        modules[names[name]] = module
    return modules


def _kohya_module_names(names: list[str], unet_config: Any | None) -> dict[str, str]:
    """kohya module name -> 'component.module' in diffusers/transformers naming."""
    prefixes = read_prefixes()
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
) -> dict[str, NetworkModule]:
    """diffusers / peft keys (`unet.<module>.lora_A.weight`, ...), peft's DoRA `lora_magnitude_vector`;
    a tensor that is none of these is named and the file refused, never dropped."""
    configs = _configs_from_metadata(metadata)
    alphas = {k.removesuffix(".alpha"): float(v.item()) for k, v in tensors.items() if k.endswith(".alpha")}
    used = {k for k in tensors if k.endswith(".alpha")}
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
                magnitude = _magnitude(tensors, stem)
                modules[f"{component}.{module}"] = LoraModule(
                    alpha, dora_scale=None if magnitude is None else magnitude[1], down=down, up=up
                )
                used.update({key, stem + up_suffix} | ({magnitude[0]} if magnitude else set()))
                break
    if not modules:
        raise AdapterError(f"{path}: no LoRA weights found (neither diffusers nor kohya key names).")
    leftover = sorted(set(tensors) - used)
    if leftover:
        raise AdapterError(
            f"{path}: {len(leftover)} tensor(s) of a kind sdlora does not understand, e.g. {leftover[0]}; "
            "the file is refused rather than loaded without them."
        )
    return modules


def _magnitude(tensors: dict[str, torch.Tensor], stem: str) -> tuple[str, torch.Tensor] | None:
    """peft's DoRA magnitude for a module (`lora_magnitude_vector`, with or without `.weight`)."""
    for suffix in (".lora_magnitude_vector.weight", ".lora_magnitude_vector"):
        if stem + suffix in tensors:
            return stem + suffix, tensors[stem + suffix]
    return None


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
                _config_alpha(config, module, down.shape[0]), down=down, up=up
            )
    return LoraFile(modules, metadata, "peft")


# ----------------------------------------------------------------------------------------------- writing


def write_lora(lora: LoraFile, out: str | Path, fmt: str) -> Path:
    """Write `lora` in `fmt` ('kohya' or 'diffusers': a .safetensors file; 'peft': a folder), atomically.

    kohya holds every network type (LyCORIS key names); diffusers and peft hold plain LoRA only.
    """
    if fmt not in FORMATS:
        raise ValueError(f"Unknown format {fmt!r}; choose from {', '.join(FORMATS)}.")
    out = Path(out)
    if fmt != "kohya" and not lora.plain_lora:
        kinds = ", ".join(sorted(lora.kinds))
        raise AdapterError(
            f"{out}: the {fmt} layout holds plain LoRA only, this adapter has {kinds}; use kohya."
        )
    if fmt == "peft":
        return _write_peft_folder(lora, out)
    if out.suffix != ".safetensors":
        raise AdapterError(f"{out}: {fmt} adapters are .safetensors files.")
    tensors, metadata = (_to_kohya if fmt == "kohya" else _to_diffusers)(lora)
    return atomic_write_bytes(out, safetensors_bytes(tensors, metadata=metadata))


def peft_config_for(modules: dict[str, LoraModule]) -> LoraConfig:
    """A LoraConfig naming exactly these modules, with rank/alpha patterns where a module differs."""
    alphas = {name: _alpha(m) for name, m in modules.items()}
    rank = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(modules),
        rank_pattern={name: m.rank for name, m in modules.items() if m.rank != rank},
        alpha_pattern={name: a for name, a in alphas.items() if a != alpha},
    )


def _alpha(module: NetworkModule) -> float:
    return float(module.rank) if module.alpha is None else float(module.alpha)


def folded(lora: LoraFile) -> LoraFile:
    """The same adapter with each module's alpha / rank folded into its up matrix (alpha = rank).

    Readers that ignore alpha metadata (diffusers 0.32, a state dict handed to `load_lora_weights`)
    then apply exactly the trained strength instead of a silently different one.
    """
    modules = {
        key: LoraModule(float(m.rank), down=m.down, up=(m.up.float() * m.scale).to(m.up.dtype))
        for key, m in lora.modules.items()
    }
    return LoraFile(modules, lora.metadata, lora.format)


def _to_diffusers(lora: LoraFile) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    config_meta: dict[str, object] = {}
    for component, modules in folded(lora).components().items():
        for name, module in modules.items():
            key = f"{component}.{_file_module_name(component, name)}"
            tensors[f"{key}.lora_A.weight"] = module.down.contiguous()
            tensors[f"{key}.lora_B.weight"] = module.up.contiguous()
        config = lora_config_metadata(peft_config_for(modules))
        config_meta.update({f"{component}.{k}": v for k, v in config.items()})
    metadata = {k: v for k, v in lora.metadata.items() if not k.startswith(("ss_", "sshs_", "modelspec."))}
    metadata.update({"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(config_meta, sort_keys=True)})
    return tensors, metadata


def _file_module_name(component: str, module: str) -> str:
    """Text encoders are written with the `text_model.` level that every loader (old and new) accepts."""
    return f"text_model.{module}" if component.startswith("text_encoder") else module


def _to_kohya(lora: LoraFile) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    prefixes = lora.family().kohya_prefixes
    tensors: dict[str, torch.Tensor] = {}
    for key, module in lora.modules.items():
        component, name = key.split(".", 1)
        flat = prefixes[component] + _file_module_name(component, name).replace(".", "_")
        tensors.update({f"{flat}.{suffix}": value for suffix, value in module.tensors().items()})
    metadata = kohya_metadata(lora)
    metadata["sshs_model_hash"] = tensor_hash(tensors)
    return tensors, metadata


def tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of a safetensors file's tensor data (after the header), as kohya's `sshs_model_hash`
    and AUTOMATIC1111's addnet hash compute it: the same whatever the metadata says."""
    data = safetensors_bytes(tensors)
    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header :]).hexdigest()


def kohya_metadata(lora: LoraFile) -> dict[str, str]:
    """kohya's `ss_*` keys and the `modelspec.*` header, from sdlora's training facts where present."""
    facts = lora.facts
    family = lora.family()
    ranks = Counter(m.rank for m in lora.modules.values())
    alphas = Counter(_alpha(m) for m in lora.modules.values())
    rank, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    network = (
        {"networks.lora": "LoRA"} if lora.plain_lora else {"lycoris.kohya": ",".join(sorted(lora.kinds))}
    )
    name = facts.name if facts else "lora"
    metadata = {k: v for k, v in lora.metadata.items() if k.startswith(FACTS_PREFIX)}
    metadata.update(
        {
            "ss_network_module": next(iter(network)),
            "ss_network_dim": str(rank),
            "ss_network_alpha": f"{alpha:g}",
            "ss_base_model_version": family.kohya_base_version,
            "ss_v2": str(family.kohya_v2),
            "ss_output_name": name,
            "ss_clip_skip": "None",
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
                "ss_num_epochs": str(facts.epochs),
                "ss_training_started_at": str(facts.started_at()),
                "ss_dataset_dirs": facts.dataset_dirs,
                "ss_training_comment": f"trigger words: {facts.trigger_words}",
                "ss_tag_frequency": json.dumps({name: json.loads(facts.tag_frequency or "{}")}),
                "modelspec.trigger_phrase": facts.trigger_words,
                "modelspec.resolution": f"{facts.resolution}x{facts.resolution}",
                "modelspec.date": facts.created,
                "modelspec.prediction_type": family.modelspec_prediction_type,
            }
        )
    args = {} if lora.plain_lora else {"algo": network["lycoris.kohya"]}
    if facts and facts.dora:
        args["dora_wd"] = "True"
    if args:
        metadata["ss_network_args"] = json.dumps(args)
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
