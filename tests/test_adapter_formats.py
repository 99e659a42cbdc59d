"""Adapters every tool loads: diffusers, kohya (SD 1.x and SDXL naming) and peft layouts agree numerically; others' files load;
a LoRA for another base is refused with a reason; merges are exact or report their error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

from sdlora.adapters import AdapterError, LoraFile, LoraModule, read_adapter, read_lora, write_lora
from sdlora.adapters.merge import merge_loras
from sdlora.cli import main
from sdlora.generate import GenerationParams, Generator, fuse_into_base
from sdlora.train import train
from tests.conftest import diffusers_mix, draw_blob, train_config
from tests.tiny_models import load, save_tiny_pipeline, tiny_sdxl_pipeline, unet_output

PARAMS = GenerationParams("a sks blob", seed=1, steps=3, guidance=3.0)


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    """Two adapters with alpha != rank; the first also has a text-encoder LoRA."""
    root = tmp_path_factory.mktemp("formats")
    paths = []
    for index, (colour, te) in enumerate((((200, 0, 200), True), ((0, 150, 0), False))):
        folder = root / f"data{index}"
        folder.mkdir()
        for i in range(3):
            draw_blob(folder / f"{i}.png", (16, 16), colour, caption=f"a sks blob, style{index}")
        result = train(
            train_config(
                folder,
                tiny_base,
                root / "out",
                steps=5,
                lr=5e-3,
                rank=4,
                alpha=7 + index,
                text_encoder=te,
                name=f"a{index}",
                seed=index,
            )
        )
        paths.append(result.adapter)
    return paths


def deltas(path) -> dict[str, torch.Tensor]:
    return {k: m.delta() for k, m in read_lora(path).modules.items()}


def test_every_layout_gives_the_same_delta_weights(trained, tmp_path):
    ours = trained[0]
    kohya = write_lora(read_lora(ours), tmp_path / "k.safetensors", "kohya")
    peft = write_lora(read_lora(kohya), tmp_path / "peft", "peft")
    back = write_lora(read_lora(peft), tmp_path / "d.safetensors", "diffusers")
    reference = deltas(ours)
    assert any(k.startswith("text_encoder.") for k in reference)
    for path in (kohya, peft, back):
        other = deltas(path)
        assert other.keys() == reference.keys()
        assert max((other[k] - reference[k]).abs().max().item() for k in reference) < 1e-6
    # kohya keys carry the true alpha, not the rank.
    kohya_tensors = load_file(kohya)
    alphas = {v.item() for k, v in kohya_tensors.items() if k.endswith(".alpha")}
    assert alphas == {7.0}
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in kohya_tensors)
    assert any(
        k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0")
        for k in kohya_tensors
    )


def test_kohya_export_loads_in_diffusers_with_the_same_unet_output(trained, tiny_base, tmp_path):
    kohya = write_lora(read_lora(trained[0]), tmp_path / "k.safetensors", "kohya")
    ours_pipe, kohya_pipe = load(tiny_base), load(tiny_base)
    ours_pipe.load_lora_weights(str(trained[0]), adapter_name="lora_ours")
    kohya_pipe.load_lora_weights(str(kohya), adapter_name="lora_kohya")  # diffusers' own kohya loader
    expected = unet_output(ours_pipe.unet)
    assert (expected - unet_output(load(tiny_base).unet)).abs().max() > 1e-4
    torch.testing.assert_close(unet_output(kohya_pipe.unet), expected, rtol=1e-5, atol=1e-5)


def test_kohya_metadata(trained, tmp_path):
    kohya = write_lora(read_lora(trained[0]), tmp_path / "k.safetensors", "kohya")
    metadata = read_adapter(kohya)[1]
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "7"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_output_name"] == "a0"
    assert json.loads(metadata["ss_tag_frequency"]) == {"a0": {"a sks blob": 3, "style0": 3}}
    assert metadata["modelspec.trigger_phrase"] == "a photo of sks blob"  # no class prompt to tell them apart
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_others_files_generate_like_ours(trained, tiny_base, tmp_path):
    """kohya and peft files (text encoder included, alpha != rank) give the same images as our file."""
    kohya = write_lora(read_lora(trained[0]), tmp_path / "k.safetensors", "kohya")
    peft = write_lora(read_lora(trained[0]), tmp_path / "peft", "peft")
    assert (peft / "unet" / "adapter_config.json").is_file() and (peft / "text_encoder").is_dir()
    generator = Generator(tiny_base)
    names = [generator.load_adapter(p) for p in (trained[0], kohya, peft)]
    images = [np.asarray(generator.generate(PARAMS, {n: 0.8}), dtype=np.int16) for n in names]
    base = np.asarray(generator.generate(PARAMS), dtype=np.int16)
    assert np.abs(images[0] - base).mean() > 1.0
    assert np.abs(images[1] - images[0]).max() <= 1 and np.abs(images[2] - images[0]).max() <= 1


def test_a_lora_for_another_base_is_refused_with_the_reason(trained, tmp_path):
    wider = str(save_tiny_pipeline(tmp_path / "wider", width=48))
    generator = Generator(wider)
    with pytest.raises(AdapterError, match="do not fit") as error:
        generator.load_adapter(trained[0])
    assert "32" in str(error.value) and "48" in str(error.value)
    assert generator.adapters == {}
    # An SDXL-style file (two text encoders) is named as such.
    sdxl = {
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4),
    }
    save_file(sdxl, tmp_path / "xl.safetensors")
    with pytest.raises(AdapterError, match="for sdxl"):
        generator.load_adapter(tmp_path / "xl.safetensors")
    assert main(["inspect", str(trained[0]), "--base", wider]) == 1


def test_concatenated_merge_is_exact_and_svd_reports_its_error(trained):
    a, b = read_lora(trained[0]), read_lora(trained[1])
    merged, report = merge_loras([(a, 0.7), (b, -0.4)])
    assert report.max_relative_error == 0.0
    for key, module in merged.modules.items():
        expected = sum(
            w * lora.modules[key].delta() for lora, w in ((a, 0.7), (b, -0.4)) if key in lora.modules
        )
        torch.testing.assert_close(module.delta(), expected, rtol=1e-5, atol=1e-6)
    full, full_report = merge_loras([(a, 0.7), (b, -0.4)], rank=8)  # 4 + 4: full rank
    assert full_report.max_relative_error < 1e-5
    low, low_report = merge_loras([(a, 0.7), (b, -0.4)], rank=2)
    assert low_report.max_relative_error > 1e-3
    assert all(m.rank <= 2 for m in low.modules.values())


def test_fused_full_model_matches_the_base_with_adapters(trained, tiny_base, tmp_path):
    weights = [(trained[0], 0.6), (trained[1], 0.9)]
    out = fuse_into_base(tiny_base, weights, tmp_path / "fused")
    fused = DiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    reference = diffusers_mix(tiny_base, weights)  # diffusers' own loader, adapters applied on the fly
    torch.testing.assert_close(unet_output(fused.unet), unet_output(reference.unet), rtol=1e-4, atol=1e-5)


def test_convert_and_merge_commands(trained, tmp_path, capsys):
    kohya = tmp_path / "k.safetensors"
    assert main(["convert", str(trained[0]), "--to", "kohya", str(kohya)]) == 0
    assert (
        main(
            [
                "merge",
                f"{trained[0]}:0.5",
                f"{trained[1]}:0.5",
                "--rank",
                "4",
                "--out",
                str(tmp_path / "m.safetensors"),
            ]
        )
        == 0
    )
    assert "relative error" in capsys.readouterr().out
    assert main(["inspect", str(kohya), "--modules"]) == 0
    out = capsys.readouterr().out
    assert "kohya layout" in out and "alpha 7" in out


def test_training_can_write_kohya_directly(tiny_base, blob_folder, tmp_path):
    result = train(
        train_config(
            blob_folder, tiny_base, tmp_path / "out", steps=1, rank=2, alpha=3, adapter_format="kohya"
        )
    )
    tensors, metadata = read_adapter(result.adapter)
    assert all(k.startswith("lora_unet_") for k in tensors) and metadata["ss_network_alpha"] == "3"
    assert Generator(tiny_base).load_adapter(result.adapter).startswith("lora_")


# kohya's SDXL trainer names U-Net modules as the original (SGM) U-Net does. The tiny SDXL has one layer
# per block, so input block 3 is down_blocks.1 and output blocks 0 and 1 are up_blocks.0.
SGM_TO_DIFFUSERS = {
    "input_blocks_3_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_3_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "middle_block_1_transformer_blocks_0_attn2_to_k": "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "output_blocks_1_1_transformer_blocks_0_attn1_to_out_0": "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0",
    "output_blocks_0_1_transformer_blocks_0_ff_net_2": "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
}


def sdxl_unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    latents = torch.randn(2, 4, size, size, generator=g)
    text = torch.randn(2, 16, unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad():
        return unet(
            latents, torch.tensor([10, 500]), encoder_hidden_states=text, added_cond_kwargs=added
        ).sample


def test_kohya_sdxl_files_with_sgm_names_load_like_diffusers_names(tmp_path):
    pipe = tiny_sdxl_pipeline()
    layers = dict(pipe.unet.named_modules())
    g = torch.Generator().manual_seed(1)
    modules, kohya = {}, {}
    for sgm, name in SGM_TO_DIFFUSERS.items():
        out_features, in_features = layers[name].weight.shape[:2]
        down, up = torch.randn(4, in_features, generator=g), torch.randn(out_features, 4, generator=g)
        modules[f"unet.{name}"] = LoraModule(3.0, down=down, up=up)
        kohya |= {
            f"lora_unet_{sgm}.lora_down.weight": down,
            f"lora_unet_{sgm}.lora_up.weight": up,
            f"lora_unet_{sgm}.alpha": torch.tensor(3.0),
        }
    native = write_lora(LoraFile(modules), tmp_path / "native.safetensors", "diffusers")
    save_file(kohya, tmp_path / "sgm.safetensors")

    generator = Generator(pipe, device="cpu")
    base = sdxl_unet_output(generator.pipe.unet)
    outputs = []
    for path in (native, tmp_path / "sgm.safetensors"):
        generator.activate({generator.load_adapter(path): 1.0})
        outputs.append(sdxl_unet_output(generator.pipe.unet))
    assert (outputs[0] - base).abs().max() > 1e-3
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)

    # diffusers' own loader reads the file the same way.
    theirs = tiny_sdxl_pipeline()
    theirs.load_lora_weights(str(tmp_path / "sgm.safetensors"))
    torch.testing.assert_close(sdxl_unet_output(theirs.unet), outputs[0], rtol=1e-5, atol=1e-6)
