"""Single-file checkpoints in the original (LDM/SGM) layout, read and written without a network.

Reading: the family is told by which text encoders the file holds (`TextEncoder.checkpoint_prefix` in
the family table) and the prediction type by its `modelspec.*` metadata (or the caller). diffusers'
`from_single_file` then gets the configuration folder sdlora ships for that family
(`sdlora/models/configs/<folder>`), so it never asks the hub; the text encoders are built here and the
CLIP tokenizers from the BPE vocabulary shipped beside the configs.

Files that sdlora writes also carry their pipeline's diffusers configs (and the tokenizer, when it is
not CLIP's) in their metadata. Those are used first: a checkpoint's sizes can't all be read off its
tensors (attention heads, norm groups and the tokenizer leave no trace in the shapes), so this is what
lets the demo model, tests' tiny models and any non-standard model go through a single file and back.

Writing: `save_single_file` renames a pipeline's weights to the keys A1111, Forge and ComfyUI load
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*` / `conditioner.embedders.*`).
"""

from __future__ import annotations

import functools
import gzip
import inspect
import json
import logging
import tempfile
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import diffusers
import torch
import transformers
from accelerate import init_empty_weights
from diffusers import DiffusionPipeline
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from sdlora.errors import SdloraError
from sdlora.files import atomic_file
from sdlora.models.families import FAMILIES, Family, TextEncoder, family_of

log = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).parent / "configs"
CLIP_BPE = CONFIGS_DIR / "bpe_simple_vocab_16e6.txt.gz"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CONFIGS_KEY = "sdlora.configs"  # JSON: file name -> diffusers/transformers config, per component
TOKENIZERS_KEY = "sdlora.tokenizers"  # JSON: tokenizer component -> its saved files' text
FUSED_KEY = "sdlora.fused"  # JSON: the adapters fused into the weights, with their weights

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class SingleFileError(SdloraError, ValueError):
    """A single-file checkpoint sdlora can't read (or a pipeline it can't write as one)."""


# ------------------------------------------------------------------------------------------ key renaming


def _unet_names(config: Mapping) -> dict[str, str]:
    """diffusers U-Net module -> its name in the original U-Net (`input_blocks`/`middle_block`/...).

    Each original level holds `layers_per_block` (resnet, attention) pairs and then a downsampler; on the
    way up `layers_per_block + 1` pairs and an upsampler, after the attention when there is one.
    """
    per_level = config["layers_per_block"]
    if not isinstance(per_level, int):
        raise SingleFileError("U-Nets with a different layer count per block have no original layout.")
    names = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    levels = len(config["block_out_channels"])
    for i in range(levels):
        first = 1 + i * (per_level + 1)
        for j in range(per_level):
            names[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{first + j}.0"
            names[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{first + j}.1"
        names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{first + per_level}.0.op"
        first = i * (per_level + 1)
        for j in range(per_level + 1):
            names[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{first + j}.0"
            names[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{first + j}.1"
        upsampler = 2 if "CrossAttn" in config["up_block_types"][i] else 1
        names[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{first + per_level}.{upsampler}.conv"
    return names


def _vae_names(config: Mapping) -> dict[str, str]:
    """diffusers VAE module -> its name in the original autoencoder (decoder levels count upwards)."""
    levels = len(config["block_out_channels"])
    names = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for part in ("encoder", "decoder"):
        names[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        names[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        names[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
    for i in range(levels):
        for j in range(config["layers_per_block"] + 1):
            names[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
            names[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{levels - 1 - i}.block.{j}"
        names[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        names[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{levels - 1 - i}.upsample.conv"
    return names


def _rename(
    state: Mapping[str, torch.Tensor],
    names: Mapping[str, str],
    resnet: Mapping[str, str],
    attention: Mapping[str, str] | None = None,
    keep: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """Rename each key by the longest module prefix `names` knows, and the layers inside resnets (and
    the VAE's attention, `attention`) by their own tables. Keys starting with `keep` are the same in
    both layouts; any other key has no place in the original one and is refused."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        module = next(
            (".".join(parts[:cut]) for cut in range(len(parts) - 1, 0, -1) if ".".join(parts[:cut]) in names),
            None,
        )
        if module is None:
            if not key.startswith(keep):
                raise SingleFileError(f"{key} has no place in the original checkpoint layout.")
            out[key] = value
            continue
        rest = key.removeprefix(module + ".")
        if ".resnets." in module:
            layer, _, tail = rest.partition(".")
            rest = f"{resnet.get(layer, layer)}.{tail}"
        elif attention is not None and ".attentions." in module:
            layer, _, tail = rest.rpartition(".")
            rest = f"{attention[layer]}.{tail}"
            value = value.reshape(*value.shape, 1, 1) if value.dim() == 2 else value  # 1x1 convs there
        out[f"{names[module]}.{rest}"] = value
    return out


def _text_encoder_state(model: torch.nn.Module, encoder: TextEncoder) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's weights as the original checkpoints hold them."""
    state = {
        (key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}"): value
        for key, value in model.state_dict().items()
        if not key.endswith("position_ids")
    }
    if not encoder.open_clip:
        return {encoder.checkpoint_prefix + key: value for key, value in state.items()}
    out = {}
    layers = "text_model.encoder.layers."
    for key, value in state.items():
        if key.startswith(layers):
            index, _, rest = key.removeprefix(layers).partition(".")
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                if rest.startswith("self_attn.q_proj."):  # OpenCLIP keeps q, k, v as one projection
                    kind = rest.rsplit(".", 1)[1]
                    fused = torch.cat([state[f"{layers}{index}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
                    out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = fused
                continue
            rest = (
                rest.replace("self_attn.", "attn.")
                .replace("layer_norm1", "ln_1")
                .replace("layer_norm2", "ln_2")
                .replace("mlp.fc1", "mlp.c_fc")
                .replace("mlp.fc2", "mlp.c_proj")
            )
            out[f"transformer.resblocks.{index}.{rest}"] = value
        elif key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out[key.replace("text_model.final_layer_norm.", "ln_final.")] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()  # OpenCLIP multiplies x @ text_projection
        else:
            raise SingleFileError(f"The text encoder's {key} has no place in OpenCLIP's layout.")
    return {encoder.checkpoint_prefix + key: value for key, value in out.items()}


def to_original(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """Every weight of `pipe` under the key the original LDM/SGM checkpoints give it."""
    family = family_of(pipe)
    state = {
        UNET_PREFIX + key: value
        for key, value in _rename(pipe.unet.state_dict(), _unet_names(pipe.unet.config), _RESNET).items()
    }
    vae = _rename(
        pipe.vae.state_dict(),
        _vae_names(pipe.vae.config),
        {"conv_shortcut": "nin_shortcut"},
        _VAE_ATTENTION,
        keep=("encoder.conv_", "decoder.conv_", "quant_conv.", "post_quant_conv."),
    )
    state.update({VAE_PREFIX + key: value for key, value in vae.items()})
    for encoder in family.text_encoders:
        state.update(_text_encoder_state(getattr(pipe, encoder.component), encoder))
    return state


# ---------------------------------------------------------------------------------------------- tokenizers


@functools.cache
def _clip_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's BPE vocabulary and merges, built from OpenAI's merge list as CLIP's own tokenizer does."""
    with gzip.open(CLIP_BPE, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>", max_length: int = 77) -> CLIPTokenizer:
    """The tokenizer of every SD text encoder (OpenAI's CLIP vocabulary; OpenCLIP's pads with '!')."""
    vocab, merges = _clip_vocabulary()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), model_max_length=max_length, pad_token=pad_token
    )


def _is_clip_vocabulary(tokenizer: CLIPTokenizer) -> bool:
    return tokenizer.get_vocab() == _clip_vocabulary()[0]


def _tokenizer_files(tokenizer: CLIPTokenizer) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {path.name: path.read_text(encoding="utf-8") for path in Path(tmp).iterdir() if path.is_file()}


def _tokenizer_from_files(files: Mapping[str, str]) -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / Path(name).name).write_text(text, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, local_files_only=True)


# ----------------------------------------------------------------------------------------------- writing


def save_single_file(
    pipe: DiffusionPipeline,
    path: str | Path,
    *,
    dtype: torch.dtype | None = torch.float16,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `pipe` as one original-layout .safetensors file (fp16 unless `dtype` says; None keeps the
    pipeline's), atomically: the file appears complete or not at all.

    The metadata holds SAI's `modelspec.*` keys and the pipeline's diffusers configs, so sdlora reloads
    the exact pipeline offline; other tools read the weights by their names alone.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SingleFileError(f"{path}: a single-file model is a .safetensors file.")
    family = family_of(pipe)
    state = {
        key: (value if dtype is None or not value.is_floating_point() else value.to(dtype)).contiguous()
        for key, value in to_original(pipe).items()
    }
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    info = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _architecture(family, prediction),
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
        "modelspec.resolution": f"{_native_size(pipe)}x{_native_size(pipe)}",
        "modelspec.title": path.stem,
        "modelspec.date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        CONFIGS_KEY: json.dumps(_pipeline_configs(pipe), sort_keys=True),
    }
    tokenizers = {
        encoder.tokenizer: _tokenizer_files(getattr(pipe, encoder.tokenizer))
        for encoder in family.text_encoders
        if not _is_clip_vocabulary(getattr(pipe, encoder.tokenizer))
    }
    if tokenizers:
        info[TOKENIZERS_KEY] = json.dumps(tokenizers, sort_keys=True)
    info.update(metadata or {})
    with atomic_file(path) as tmp:
        save_file(state, tmp, metadata=info)
    return path


def _architecture(family: Family, prediction: str) -> str:
    if family.name == "sd2" and prediction != "v_prediction":
        return "stable-diffusion-v2-512"
    return family.modelspec_architecture


def _native_size(pipe: DiffusionPipeline) -> int:
    return int(pipe.unet.config.sample_size) * pipe.vae_scale_factor


def _pipeline_configs(pipe: DiffusionPipeline) -> dict[str, dict]:
    """The files of a diffusers configuration folder for `pipe`: model_index.json and one per part."""
    family = family_of(pipe)
    index = {key: value for key, value in dict(pipe.config).items() if not key.startswith("_")}
    index["_class_name"] = type(pipe).__name__
    configs: dict[str, dict] = {"model_index.json": index}
    for name in ("unet", "vae"):
        configs[f"{name}/config.json"] = dict(getattr(pipe, name).config)
    configs["scheduler/scheduler_config.json"] = dict(pipe.scheduler.config)
    for encoder in family.text_encoders:
        configs[f"{encoder.component}/config.json"] = getattr(pipe, encoder.component).config.to_dict()
    for config in configs.values():  # where the base was loaded from is nobody else's business
        config.pop("_name_or_path", None)
    return json.loads(json.dumps(configs, default=list))  # tuples and the like as JSON has them


# ----------------------------------------------------------------------------------------------- reading


def read_header(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """A safetensors file's tensor shapes and metadata, without reading its tensors."""
    with safe_open(str(path), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
        return shapes, handle.metadata() or {}


def detect_family(keys: Iterable[str]) -> Family:
    """The family whose text encoders the checkpoint holds, all of them (SDXL's two before SD 1.x's one)."""
    keys = list(keys)
    if not any(key.startswith(UNET_PREFIX) for key in keys):
        raise SingleFileError(
            "No U-Net under model.diffusion_model.*: not a Stable Diffusion checkpoint in the original "
            "layout (a LoRA, a VAE or a diffusers-named file?)."
        )
    candidates = sorted(FAMILIES.values(), key=lambda f: -len(f.text_encoders))
    for family in candidates:
        if all(any(k.startswith(e.checkpoint_prefix) for k in keys) for e in family.text_encoders):
            return family
    prefixes = sorted({".".join(k.split(".")[:3]) for k in keys if not k.startswith(UNET_PREFIX)})
    raise SingleFileError(
        f"The checkpoint's text encoders ({', '.join(prefixes[:6]) or 'none'}) are none of "
        f"{', '.join(f.label for f in FAMILIES.values())}'s (an SDXL refiner or another model?)."
    )


def prediction_type_of(metadata: Mapping[str, str], family: Family, requested: str | None) -> str:
    """`requested`, else what the file's metadata says, else the family's default (with a note)."""
    if requested:
        return requested
    configs = json.loads(metadata.get(CONFIGS_KEY, "{}"))
    if "scheduler/scheduler_config.json" in configs:
        return configs["scheduler/scheduler_config.json"].get("prediction_type", "epsilon")
    said = metadata.get("modelspec.prediction_type", "").lower()
    if said in ("v", "v_prediction", "v-prediction") or metadata.get("modelspec.architecture", "").endswith(
        "-v"
    ):
        return "v_prediction"
    if said in ("epsilon", "eps"):
        return "epsilon"
    default = family.single_file_configs[0][0]
    if len(family.single_file_configs) > 1:
        log.warning(
            "The checkpoint does not say what it predicts; assuming %s as %s's reference checkpoint does "
            "(pass prediction_type to load_base for the other).",
            default,
            family.label,
        )
    return default


def load_single_file(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    prediction_type: str | None = None,
    **options,
) -> DiffusionPipeline:
    """A pipeline from an original-layout single file, with no network: the family's shipped configs,
    or the configs sdlora embedded when it wrote the file. `options` go to the pipeline class where it
    takes them (`safety_checker=None` to SD 1.x/2.x only)."""
    path = Path(path)
    try:
        shapes, metadata = read_header(path)
    except Exception as error:  # noqa: BLE001 - safetensors says "header too large", "invalid JSON", ...
        raise SingleFileError(f"{path} is not a readable .safetensors file: {error}") from error
    family = detect_family(shapes)
    prediction = prediction_type_of(metadata, family, prediction_type)
    cls = getattr(diffusers, family.pipeline_class)
    accepted = inspect.signature(cls).parameters
    options = {key: value for key, value in options.items() if key in accepted}  # SDXL: no safety checker
    with tempfile.TemporaryDirectory() as tmp:
        if CONFIGS_KEY in metadata:
            folder = Path(tmp)
            for name, config in json.loads(metadata[CONFIGS_KEY]).items():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_text(json.dumps(config))
        else:
            folders = dict(family.single_file_configs)
            folder = CONFIGS_DIR / folders.get(prediction, family.single_file_configs[0][1])
            _check_sizes(shapes, folder, family, path)
        tokenizers = json.loads(metadata.get(TOKENIZERS_KEY, "{}"))
        parts = {}
        with safe_open(str(path), framework="pt") as handle:
            for encoder in family.text_encoders:
                parts[encoder.component] = _load_text_encoder(handle, shapes, folder, encoder, dtype)
                parts[encoder.tokenizer] = (
                    _tokenizer_from_files(tokenizers[encoder.tokenizer])
                    if encoder.tokenizer in tokenizers
                    else clip_tokenizer(encoder.pad_token)
                )
        try:
            pipe = cls.from_single_file(
                str(path), config=str(folder), local_files_only=True, dtype=dtype, **parts, **options
            )
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise SingleFileError(f"diffusers could not load {path} as {family.label}: {error}") from error
    if pipe.scheduler.config.get("prediction_type") != prediction:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction)
    pipe.register_to_config(_name_or_path=str(path))  # what from_pretrained records: the base's name
    return pipe


def _load_text_encoder(
    handle, shapes: Mapping[str, tuple[int, ...]], folder: Path, encoder: TextEncoder, dtype: torch.dtype
) -> torch.nn.Module:
    """One text encoder, built from its config and filled strictly: a missing weight is an error.

    Built here rather than by diffusers, which picks the encoder's keys by width alone and so mixes up
    SDXL's two encoders when they are equally wide (as in small test models).
    """
    config = CLIPTextConfig.from_json_file(folder / encoder.component / "config.json")
    _, class_name = json.loads((folder / "model_index.json").read_text())[encoder.component]
    with init_empty_weights():  # weights on the meta device until loaded; buffers (position ids) real
        model = getattr(transformers, class_name)(config)
    checkpoint = {key: handle.get_tensor(key) for key in shapes if key.startswith(encoder.checkpoint_prefix)}
    if encoder.open_clip:
        state = convert_open_clip_checkpoint(model, checkpoint, prefix=encoder.checkpoint_prefix)
    else:
        state = {key.removeprefix(encoder.checkpoint_prefix): value for key, value in checkpoint.items()}
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        state = {key.removeprefix("text_model."): value for key, value in state.items()}
    expected = model.state_dict()
    missing = [key for key in expected if key not in state and not key.endswith("position_ids")]
    if missing:
        raise SingleFileError(
            f"The checkpoint's {encoder.component} lacks {len(missing)} weight(s) its config needs, "
            f"e.g. {missing[0]}."
        )
    wrong = [k for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise SingleFileError(
            f"The checkpoint's {encoder.component} has {wrong[0]} of shape {tuple(state[wrong[0]].shape)}, "
            f"its config wants {tuple(expected[wrong[0]].shape)}."
        )
    model.load_state_dict({k: state[k].to(dtype) for k in expected if k in state}, strict=False, assign=True)
    return model.eval()


def _check_sizes(shapes: Mapping[str, tuple[int, ...]], folder: Path, family: Family, path: Path) -> None:
    """Refuse, with the reason, a checkpoint whose U-Net is not the shape of the family's reference one."""
    config = json.loads((folder / "unet" / "config.json").read_text())
    width = config["block_out_channels"][0]
    expected = {
        "input_blocks.0.0.weight": (width, config["in_channels"], 3, 3),
        "out.2.weight": (config["out_channels"], width, 3, 3),
    }
    cross = [s for k, s in shapes.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    problems = [
        f"{key} is {shapes.get(UNET_PREFIX + key)}, not {shape}"
        for key, shape in expected.items()
        if shapes.get(UNET_PREFIX + key) != shape
    ]
    if cross and cross[0][1] != config["cross_attention_dim"]:
        problems.append(f"cross-attention reads {cross[0][1]} wide, not {config['cross_attention_dim']}")
    if problems:
        raise SingleFileError(
            f"{path} holds a {family.label} checkpoint of non-standard size ({'; '.join(problems)}), so the "
            f"shipped {family.label} configuration does not fit it (inpainting and other variants are not "
            "supported). sdlora reads the sizes of such models from files it wrote itself."
        )
