"""Single-file checkpoints in the original layout, with no network: written from the demo model and tiny
SD 1.x / SDXL pipelines, read back into the same U-Net output; fused models as one file; LoRAs
extracted from two models; the CLI doing all of it with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders import single_file as diffusers_single_file
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdlora.adapters import LoraFile, read_lora, write_lora
from sdlora.adapters.extract import extract_lora
from sdlora.adapters.modules import LoraModule
from sdlora.cli import main
from sdlora.generate import Generator, fuse_into_base
from sdlora.models import BaseModelError, family_of, get_family, load_base
from sdlora.models.single_file import (
    CONFIGS_DIR,
    CONFIGS_KEY,
    FUSED_KEY,
    SingleFileError,
    clip_tokenizer,
    detect_family,
    prediction_type_of,
    save_single_file,
    to_original,
)
from tests.tiny_models import tiny_pipeline, tiny_sdxl_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network, and proof of it: diffusers' hub download for single files fails if reached."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("from_single_file tried to download its configuration")

    monkeypatch.setattr(diffusers_single_file, "_download_diffusers_model_config_from_hub", refuse)


def unet_output(pipe, seed: int = 0) -> torch.Tensor:
    """The U-Net's prediction for fixed random latents and text embeddings (with SDXL's extra inputs)."""
    config = pipe.unet.config
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, config.sample_size, config.sample_size, generator=generator)
    text = torch.randn(2, 7, config.cross_attention_dim, generator=generator)
    extra = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=generator),
            "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2),
        }
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([10, 700]), text, **extra).sample.float()


def text_output(pipe, encoder: str, tokenizer: str) -> torch.Tensor:
    ids = getattr(pipe, tokenizer)("a red star, sks", return_tensors="pt", padding="max_length").input_ids
    with torch.no_grad():
        out = getattr(pipe, encoder)(ids, output_hidden_states=True)
    return torch.cat([out.hidden_states[-2].flatten(), out[0].flatten()])


PIPELINES = {
    "demo": lambda: load_base(None),
    "tiny-sd1": lambda: tiny_pipeline(seed=3),
    "tiny-sdxl": lambda: tiny_sdxl_pipeline(seed=4),
}


@pytest.mark.parametrize("name", PIPELINES)
def test_single_file_round_trip_is_exact(name, tmp_path):
    pipe = PIPELINES[name]()
    path = save_single_file(pipe, tmp_path / f"{name}.safetensors", dtype=torch.float32)
    keys = load_file(path).keys()
    family = family_of(pipe)
    assert all(
        k.startswith(
            (
                "model.diffusion_model.",
                "first_stage_model.",
                *(e.checkpoint_prefix for e in family.text_encoders),
            )
        )
        for k in keys
    )
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys

    loaded = load_base(str(path))
    assert type(loaded) is type(pipe) and family_of(loaded) == family
    difference = (unet_output(loaded) - unet_output(pipe)).abs().max().item()
    print(f"{name}: U-Net output, diffusers pipeline vs its fp32 single file: max |diff| {difference:.3g}")
    assert difference == 0.0
    for encoder in family.text_encoders:
        assert torch.equal(
            text_output(loaded, encoder.component, encoder.tokenizer),
            text_output(pipe, encoder.component, encoder.tokenizer),
        )
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(
            loaded.vae.decode(loaded.vae.encode(image).latent_dist.mean).sample,
            pipe.vae.decode(pipe.vae.encode(image).latent_dist.mean).sample,
        )
    assert loaded.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type

    half = load_base(str(save_single_file(pipe, tmp_path / "half.safetensors")))  # fp16, the default
    with safe_open(str(tmp_path / "half.safetensors"), "pt") as handle:
        assert handle.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    reference = unet_output(pipe)
    difference = (unet_output(half) - reference).abs().max().item()
    print(f"{name}: fp16 single file: max |diff| {difference:.3g} (output scale {reference.abs().max():.3g})")
    assert difference < 2e-2 * reference.abs().max().item()


def test_a_folder_and_its_single_file_give_the_same_pipeline_output(tmp_path):
    """What a user sees: the demo model as a diffusers folder and as a single file, same images."""
    from sdlora.generate import GenerationParams

    path = save_single_file(load_base(None), tmp_path / "demo-single.safetensors", dtype=torch.float32)
    params = GenerationParams("a red star", seed=5, steps=3)
    folder_image = Generator(None, device="cpu").generate(params)
    file_image = Generator(str(path), device="cpu").generate(params)
    assert folder_image.tobytes() == file_image.tobytes()


def test_clip_tokenizer_is_clips():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.model_max_length == 77 and tokenizer.pad_token == "<|endoftext|>"
    assert clip_tokenizer("!").pad_token_id == 0  # OpenCLIP pads with "!", token 0


REFERENCE_PARAMETERS = {  # of the reference checkpoints' parts, as their model cards and diffusers give them
    "sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2-512": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sd2-768-v": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
}


def _meta_pipeline(folder: Path):
    """A pipeline of the shipped config's full size on the meta device: names and shapes, no weights."""
    index = json.loads((folder / "model_index.json").read_text())
    parts = {}
    with init_empty_weights():
        parts["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        parts["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        for name in ("text_encoder", "text_encoder_2"):
            if name in index:
                cls = {
                    "CLIPTextModel": CLIPTextModel,
                    "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
                }
                parts[name] = cls[index[name][1]](
                    CLIPTextConfig.from_json_file(folder / name / "config.json")
                )
    return index, parts


@pytest.mark.parametrize("folder", REFERENCE_PARAMETERS)
def test_shipped_configs_are_the_reference_models(folder):
    index, parts = _meta_pipeline(CONFIGS_DIR / folder)
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in parts.items()}
    assert counts == REFERENCE_PARAMETERS[folder]

    # at full size, the written keys are the ones real checkpoints have, and diffusers reads them all back
    tokenizers = {
        name.replace("text_encoder", "tokenizer"): clip_tokenizer() for name in parts if "text" in name
    }
    cls = StableDiffusionXLPipeline if "text_encoder_2" in parts else StableDiffusionPipeline
    extra = {} if cls is StableDiffusionXLPipeline else {"safety_checker": None, "feature_extractor": None}
    from diffusers import DDIMScheduler

    pipe = cls(**parts, **tokenizers, scheduler=DDIMScheduler(), **extra)
    state = to_original(pipe)
    family = detect_family(state)
    assert family.name == folder[:3] + ("l" if folder == "sdxl" else "")
    expected = {
        "sd1": ["v1", "clip"],
        "sd2": ["v1", "v2", "open_clip"],
        "sdxl": ["xl_base", "clip_sdxl", "open_clip_sdxl"],
    }
    for kind in expected[family.name]:
        assert CHECKPOINT_KEY_NAMES[kind] in state, kind
    unet = convert_ldm_unet_checkpoint(state, dict(parts["unet"].config))
    assert set(unet) == set(parts["unet"].state_dict())
    vae = convert_ldm_vae_checkpoint(
        {k: v for k, v in state.items() if k.startswith("first_stage")}, dict(parts["vae"].config)
    )
    assert set(vae) == set(parts["vae"].state_dict())


def test_family_and_prediction_from_the_file():
    sd1 = ["model.diffusion_model.x", "cond_stage_model.transformer.text_model.y"]
    sd2 = ["model.diffusion_model.x", "cond_stage_model.model.token_embedding.weight"]
    sdxl = [
        "model.diffusion_model.x",
        "conditioner.embedders.0.transformer.a",
        "conditioner.embedders.1.model.b",
    ]
    assert [detect_family(keys).name for keys in (sd1, sd2, sdxl)] == ["sd1", "sd2", "sdxl"]
    with pytest.raises(SingleFileError, match="refiner"):
        detect_family(["model.diffusion_model.x", "conditioner.embedders.0.model.text_projection"])
    with pytest.raises(SingleFileError, match="model.diffusion_model"):
        detect_family(["lora_unet_down_blocks_0.lora_down.weight"])

    sd2_family = get_family("sd2")
    assert prediction_type_of({}, sd2_family, None) == "v_prediction"  # 2.1-768-v, the common one
    assert prediction_type_of({"modelspec.prediction_type": "epsilon"}, sd2_family, None) == "epsilon"
    assert prediction_type_of(
        {"modelspec.architecture": "stable-diffusion-v2-768-v"}, get_family("sd1"), None
    ) == ("v_prediction")
    assert prediction_type_of({"modelspec.prediction_type": "v"}, sd2_family, "epsilon") == "epsilon"
    assert prediction_type_of({}, get_family("sdxl"), None) == "epsilon"


def test_v_prediction_travels_and_can_be_overridden(tmp_path):
    path = save_single_file(tiny_pipeline(prediction_type="v_prediction"), tmp_path / "v.safetensors")
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["modelspec.prediction_type"] == "v"
    assert load_base(str(path)).scheduler.config.prediction_type == "v_prediction"
    assert load_base(str(path), prediction_type="epsilon").scheduler.config.prediction_type == "epsilon"


def test_a_non_standard_file_without_sdlora_configs_is_refused_with_the_reason(tmp_path):
    """Without the configs sdlora embeds, a file must be the family's reference size: the shipped
    config is used, and a tiny model is told apart from it by its shapes."""
    path = save_single_file(tiny_pipeline(), tmp_path / "tiny.safetensors")
    with safe_open(str(path), "pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != CONFIGS_KEY}
    save_file(load_file(path), tmp_path / "stripped.safetensors", metadata=metadata)
    with pytest.raises(BaseModelError, match="non-standard size.*input_blocks.0.0.weight"):
        load_base(str(tmp_path / "stripped.safetensors"))
    (tmp_path / "lora.safetensors").write_bytes((tmp_path / "stripped.safetensors").read_bytes()[:100])
    with pytest.raises(BaseModelError, match="not a readable"):
        load_base(str(tmp_path / "lora.safetensors"))


def _random_lora(pipe, seed: int) -> LoraFile:
    """A LoRA on every attention projection of the U-Net and on the text encoder's q/v, random, rank 2."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for component, suffixes in (
        ("unet", ("to_q", "to_v", "to_out.0")),
        ("text_encoder", ("q_proj", "v_proj")),
    ):
        for name, layer in getattr(pipe, component).named_modules():
            if name.endswith(suffixes):
                out_features, in_features = layer.weight.shape
                down = torch.randn(2, in_features, generator=generator) * 0.3
                up = torch.randn(out_features, 2, generator=generator) * 0.3
                modules[f"{component}.{name.removeprefix('text_model.')}"] = LoraModule(4.0, down=down, up=up)
    return LoraFile(modules, {}, "kohya")


def test_fused_single_file_reloads_as_the_in_memory_mix(tmp_path):
    first = write_lora(_random_lora(load_base(None), 1), tmp_path / "one.safetensors", "kohya")
    second = write_lora(_random_lora(load_base(None), 2), tmp_path / "two.safetensors", "kohya")
    mix = [(first, 0.7), (second, -0.4)]
    generator = Generator(None, device="cpu", dtype=torch.float32)
    generator.activate({generator.load_adapter(path): weight for path, weight in mix})
    expected = unet_output(generator.pipe)
    expected_text = text_output(generator.pipe, "text_encoder", "tokenizer")
    assert (expected - unet_output(load_base(None))).abs().max() > 1e-2  # the mix does change the output

    exact = fuse_into_base(None, mix, tmp_path / "fused32.safetensors", dtype=torch.float32)
    loaded = load_base(str(exact))
    difference = (unet_output(loaded) - expected).abs().max().item()
    print(f"fused fp32 single file vs in-memory mix: max |diff| {difference:.3g}")
    assert difference == 0.0
    assert torch.equal(text_output(loaded, "text_encoder", "tokenizer"), expected_text)

    out = fuse_into_base(None, mix, tmp_path / "fused.safetensors")  # fp16, as shared
    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
        assert handle.get_tensor("model.diffusion_model.input_blocks.0.0.weight").dtype == torch.float16
    assert json.loads(metadata[FUSED_KEY]) == [
        {"adapter": "one.safetensors", "weight": 0.7},
        {"adapter": "two.safetensors", "weight": -0.4},
    ]
    assert "one.safetensors at 0.7" in metadata["modelspec.description"]
    difference = (unet_output(load_base(str(out))) - expected).abs().max().item()
    print(
        f"fused fp16 single file vs in-memory mix: max |diff| {difference:.3g} (scale {expected.abs().max():.3g})"
    )
    assert difference < 1e-2 * expected.abs().max().item()
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left over


def _tuned_copy(seed: int = 0):
    """The demo model 'fine-tuned': rank-2 changes to every attention projection, a full-rank one to a conv."""
    tuned = load_base(None)
    generator = torch.Generator().manual_seed(seed)
    changed = {}
    for name, layer in tuned.unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            out_features, in_features = layer.weight.shape
            delta = torch.randn(out_features, 2, generator=generator) @ torch.randn(
                2, in_features, generator=generator
            )
            layer.weight.data += 0.02 * delta
            changed[f"unet.{name}"] = 0.02 * delta
    conv = tuned.unet.down_blocks[0].resnets[0].conv1
    delta = 0.01 * torch.randn(conv.weight.shape, generator=generator)
    conv.weight.data += delta
    changed["unet.down_blocks.0.resnets.0.conv1"] = delta
    return tuned, changed


def test_extracted_lora_reproduces_the_tuned_model_and_reports_its_error(tmp_path):
    tuned, changed = _tuned_copy()
    base = load_base(None)
    conv_key = "unet.down_blocks.0.resnets.0.conv1"

    lora, report = extract_lora(tuned, base, rank=4, conv_rank=3)
    assert set(lora.modules) == set(changed) and report.unchanged > 0
    assert report.ranks[conv_key] == 3
    path = write_lora(lora, tmp_path / "extracted.safetensors", "kohya")
    back = read_lora(path, base.unet.config)
    assert set(back.modules) == set(changed)
    for key, delta in changed.items():  # the reported error is the file's error
        actual = torch.linalg.norm(back.modules[key].delta().double() - delta.double()) / torch.linalg.norm(
            delta.double()
        )
        assert report.errors[key] == pytest.approx(actual.item(), rel=1e-3, abs=1e-6)
        if key != conv_key:
            assert report.errors[key] < 1e-5  # rank 2 changes, rank 4 kept: all of it
    singular = torch.linalg.svdvals(changed[conv_key].flatten(1).double())
    assert report.errors[conv_key] == pytest.approx(
        (singular[3:].square().sum() / singular.square().sum()).sqrt().item(), rel=1e-6
    )  # Eckart-Young: what rank 3 can't hold

    full, full_report = extract_lora(tuned, base, rank=4, conv_rank=10_000)
    assert full_report.max_error < 1e-5
    write_lora(full, tmp_path / "full.safetensors", "kohya")
    generator = Generator(base, device="cpu")
    generator.activate({generator.load_adapter(tmp_path / "full.safetensors"): 1.0})
    reference = unet_output(tuned)
    difference = (unet_output(generator.pipe) - reference).abs().max().item()
    print(f"extracted LoRA on the base vs the tuned model: max |diff| {difference:.3g}")
    assert difference < 1e-4 * reference.abs().max().item()
    generator.activate({})
    assert (unet_output(generator.pipe) - reference).abs().max() > 100 * difference  # the LoRA did it

    with pytest.raises(Exception, match="same weights"):
        extract_lora(base, load_base(None), rank=4)


def test_cli_offline_train_generate_merge_extract_with_single_files(tmp_path, capsys):
    single = save_single_file(load_base(None), tmp_path / "demo-single.safetensors")
    outputs = tmp_path / "outputs"
    adapter = tmp_path / "star.safetensors"
    args = ["train", str(ROOT / "training_data" / "sks_star"), "--base", str(single), "--steps", "1"]
    assert main([*args, "--outputs", str(outputs), "--out", str(adapter), "--resolution", "32"]) == 0
    assert adapter.is_file()
    image = tmp_path / "star.png"
    code = main(
        [
            "generate",
            "a sks star",
            "--base",
            str(single),
            "--lora",
            f"{adapter}:0.8",
            "--steps",
            "2",
            "--out",
            str(image),
        ]
    )
    assert code == 0 and image.is_file()

    fused = tmp_path / "fused.safetensors"
    assert main(["merge", f"{adapter}:0.8", "--into-model", "--base", str(single), "--out", str(fused)]) == 0
    assert "(single file)" in capsys.readouterr().out
    assert main(["generate", "a sks star", "--base", str(fused), "--steps", "2", "--out", str(image)]) == 0
    folder = tmp_path / "fused-folder"
    assert main(["merge", f"{adapter}:0.8", "--into-model", "--base", str(single), "--out", str(folder)]) == 0
    assert (folder / "model_index.json").is_file()

    extracted = tmp_path / "extracted.safetensors"
    assert main(["extract", str(fused), str(single), "--rank", "8", "--out", str(extracted)]) == 0
    printed = capsys.readouterr().out
    assert "Extracted" in printed and "relative error max" in printed
    assert read_lora(extracted).modules

    capsys.readouterr()
    assert main(["generate", "x", "--base", str(tmp_path / "star.png.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_files_without_sdlora_configs_load_through_the_family_folder(tmp_path, monkeypatch):
    """The path real checkpoints take: the file says nothing of its sizes, the family's config folder
    (here a tiny one standing in for the shipped sd1 folder) goes to from_single_file."""
    from sdlora.models import single_file

    pipe = tiny_pipeline(seed=5)
    path = save_single_file(pipe, tmp_path / "tiny.safetensors", dtype=torch.float32)
    with safe_open(str(path), "pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != CONFIGS_KEY}
    save_file(load_file(path), tmp_path / "plain.safetensors", metadata=metadata)
    for name, config in single_file._pipeline_configs(pipe).items():
        (tmp_path / "configs" / "sd1" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "configs" / "sd1" / name).write_text(json.dumps(config))
    monkeypatch.setattr(single_file, "CONFIGS_DIR", tmp_path / "configs")
    loaded = load_base(str(tmp_path / "plain.safetensors"))
    assert (unet_output(loaded) - unet_output(pipe)).abs().max().item() == 0.0


@pytest.mark.skipif(
    not os.environ.get("SDLORA_FULL_SIZE_TESTS"), reason="SD 1.5-sized (2 GB file, ~10 GB RAM): opt in"
)
def test_a_full_size_sd1_file_loads_with_the_shipped_configs(tmp_path):
    """An SD 1.5-shaped pipeline (random weights) written as a single file without sdlora's configs
    loads through the shipped sd1 folder and CLIP tokenizer into the same U-Net output."""
    index, parts = _meta_pipeline(CONFIGS_DIR / "sd1")
    generator = torch.Generator().manual_seed(0)
    for model in parts.values():
        model.to_empty(device="cpu")
        for parameter in model.parameters():
            parameter.data.normal_(0, 0.02, generator=generator)
        for name, buffer in model.named_buffers():
            if name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    from diffusers import PNDMScheduler

    pipe = StableDiffusionPipeline(
        **parts,
        tokenizer=clip_tokenizer(),
        scheduler=PNDMScheduler(),
        safety_checker=None,
        feature_extractor=None,
    )
    path = tmp_path / "sd15-random.safetensors"
    save_file(
        {k: v.half().contiguous() for k, v in to_original(pipe).items()}, path, metadata={"format": "pt"}
    )
    del pipe
    loaded = load_base(str(path))
    assert (
        json.loads((CONFIGS_DIR / "sd1" / "unet" / "config.json").read_text())["cross_attention_dim"] == 768
    )
    half = {k: v.half().float() for k, v in parts["unet"].state_dict().items()}
    parts["unet"].load_state_dict(half)
    reference = type("P", (), {"unet": parts["unet"]})()
    difference = (unet_output(loaded) - unet_output(reference)).abs().max().item()
    print(f"full-size SD 1.5-shaped file via the shipped configs: U-Net max |diff| {difference:.3g}")
    assert difference == 0.0
    assert loaded.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
