"""The file sdlora hands out loads everywhere with the true alpha, and others' files load or are refused
by name: checked against diffusers' own loader and the key rules AUTOMATIC1111 and ComfyUI document."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdlora.adapters import AdapterError, read_adapter, read_lora, write_lora
from sdlora.adapters.formats import tensor_hash
from sdlora.cli import main
from sdlora.generate import Generator
from sdlora.train import train
from tests.conftest import diffusers_mix, draw_blob, train_config
from tests.tiny_models import load, unet_output

# AUTOMATIC1111 (extensions-builtin/Lora): a kohya U-Net name is accepted when it matches one of these
# diffusers-name patterns (which it rewrites to the original SD layout); text-encoder names must carry
# `text_model_encoder_layers_N_`. ComfyUI (comfy/lora.py model_lora_keys_unet/clip) accepts
# "lora_unet_" + the diffusers module path with "." -> "_", and lora_te_/lora_te1_/lora_te2_ +
# "text_model_encoder_layers_N_{self_attn_q_proj,...,mlp_fc1,mlp_fc2}".
A1111_UNET = [
    r"lora_unet_conv_in",
    r"lora_unet_conv_out",
    r"lora_unet_time_embedding_linear_[12]",
    r"lora_unet_down_blocks_\d+_(attentions|resnets)_\d+_.+",
    r"lora_unet_down_blocks_\d+_downsamplers_0_conv",
    r"lora_unet_mid_block_(attentions|resnets)_\d+_.+",
    r"lora_unet_up_blocks_\d+_(attentions|resnets)_\d+_.+",
    r"lora_unet_up_blocks_\d+_upsamplers_0_conv",
]
A1111_TEXT = r"lora_te[12]?_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])"


@pytest.fixture(scope="module")
def handed_out(tiny_base, tmp_path_factory):
    """The adapter a user gets with default settings (text encoder on, alpha != rank)."""
    root = tmp_path_factory.mktemp("interop")
    folder = root / "data"
    folder.mkdir()
    for i in range(3):
        draw_blob(folder / f"{i}.png", (16, 16), (200, 0, 200), caption="a sks blob")
    config = train_config(folder, tiny_base, root / "out", steps=5, lr=5e-3, alpha=9, text_encoder=True)
    return train(config).adapter


def test_default_file_is_kohya_with_the_metadata_a1111_shows(handed_out):
    tensors, metadata = read_adapter(handed_out)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_alpha"] == "9"
    for key in (
        "ss_training_started_at",
        "ss_num_epochs",
        "ss_clip_skip",
        "ss_dataset_dirs",
        "sshs_model_hash",
    ):
        assert key in metadata, key
    assert int(metadata["ss_training_started_at"]) > 1_700_000_000
    with open(handed_out, "rb") as handle:  # A1111's addnet hash: sha256 of the bytes after the header
        data = handle.read()
    header = int.from_bytes(data[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header :]).hexdigest()
    assert metadata["sshs_model_hash"] == tensor_hash(load_file(handed_out))


def test_default_file_keys_follow_a1111_and_comfyui_rules(handed_out, tiny_base):
    unet_modules = {name.replace(".", "_") for name, _ in load(tiny_base).unet.named_modules()}
    modules = {key.partition(".")[0] for key in load_file(handed_out)}
    assert any(m.startswith("lora_te_") for m in modules) and any(m.startswith("lora_unet_") for m in modules)
    for module in modules:
        if module.startswith("lora_unet_"):
            assert any(re.fullmatch(p, module) for p in A1111_UNET), f"A1111 would ignore {module}"
            assert module.removeprefix("lora_unet_") in unet_modules, f"ComfyUI would ignore {module}"
        else:
            assert re.fullmatch(A1111_TEXT, module), f"A1111 and ComfyUI would ignore {module}"


def test_diffusers_loader_applies_the_true_alpha(handed_out, tiny_base):
    """diffusers' own loader reads the kohya file; alpha 9 on rank 4 must show, not rank/rank."""
    ours = Generator(tiny_base)
    ours.activate({ours.load_adapter(handed_out): 1.0})
    reference = diffusers_mix(tiny_base, [(handed_out, 1.0)])
    torch.testing.assert_close(unet_output(reference.unet), unet_output(ours.pipe.unet), rtol=1e-4, atol=1e-5)
    base = unet_output(load(tiny_base).unet)
    assert (unet_output(ours.pipe.unet) - base).abs().max() > 1e-3


def test_diffusers_layout_carries_alpha_for_readers_that_ignore_metadata(handed_out, tiny_base, tmp_path):
    """diffusers 0.32 (and a state dict passed without metadata) assumes alpha = rank: the weights must
    already carry alpha / rank, so that reader agrees with one that reads the metadata."""
    path = write_lora(read_lora(handed_out), tmp_path / "d.safetensors", "diffusers")
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(path), bare)  # the same tensors, no metadata at all
    with_metadata = diffusers_mix(tiny_base, [(path, 1.0)])
    without = diffusers_mix(tiny_base, [(bare, 1.0)])
    torch.testing.assert_close(
        unet_output(with_metadata.unet), unet_output(without.unet), rtol=1e-5, atol=1e-6
    )
    ours = Generator(tiny_base)
    ours.activate({ours.load_adapter(handed_out): 1.0})
    torch.testing.assert_close(unet_output(without.unet), unet_output(ours.pipe.unet), rtol=1e-4, atol=1e-5)


def test_a_few_missing_modules_are_skipped_and_named(handed_out, tiny_base, tmp_path, capsys):
    tensors, metadata = read_adapter(handed_out)
    extra = "lora_unet_down_blocks_9_attentions_0_proj_in"
    tensors[f"{extra}.lora_down.weight"] = torch.zeros(4, 32)
    tensors[f"{extra}.lora_up.weight"] = torch.zeros(32, 4)
    partial = tmp_path / "partial.safetensors"
    save_file(tensors, partial, metadata)
    generator = Generator(tiny_base)
    name = generator.load_adapter(partial)
    assert [m for m, _ in generator.skipped(name)] == ["unet.down_blocks.9.attentions.0.proj_in"]
    assert main(["inspect", str(partial), "--base", tiny_base]) == 0
    printed = capsys.readouterr().out
    assert "fits, some modules skipped" in printed and "down_blocks.9.attentions.0.proj_in" in printed
    assert "DOES NOT FIT" not in printed
    code = main(["generate", "a sks blob", "--base", tiny_base, "--lora", str(partial), "--steps", "2",
                 "--out", str(tmp_path / "x.png")])  # fmt: skip
    assert code == 0 and "skipped unet.down_blocks.9.attentions.0.proj_in" in capsys.readouterr().err


def test_an_unknown_tensor_kind_refuses_the_file_by_name(handed_out, tmp_path):
    tensors = load_file(handed_out)
    key = next(k for k in tensors if k.endswith(".lora_down.weight"))
    tensors[key.replace(".lora_down.weight", ".oft_blocks")] = torch.zeros(2, 2)
    odd = tmp_path / "odd.safetensors"
    save_file(tensors, odd)
    with pytest.raises(AdapterError, match=r"odd\.safetensors.*oft_blocks"):
        read_lora(odd)


def test_loha_and_lokr_are_read_not_called_corrupt(tmp_path):
    module = "lora_unet_down_blocks_0_attentions_0_proj_in"
    loha = {f"{module}.hada_w1_a": torch.ones(8, 2), f"{module}.hada_w1_b": torch.ones(2, 8)}
    loha |= {f"{module}.hada_w2_a": torch.ones(8, 2), f"{module}.hada_w2_b": torch.ones(2, 8)}
    lokr = {f"{module}.lokr_w1": torch.ones(2, 2), f"{module}.lokr_w2": torch.ones(4, 4)}
    for name, tensors, kind in (("loha", loha, "LoHa"), ("lokr", lokr, "LoKr")):
        save_file({**tensors, f"{module}.alpha": torch.tensor(1.0)}, tmp_path / f"{name}.safetensors")
        assert read_lora(tmp_path / f"{name}.safetensors").kinds == {kind: 1}
    with pytest.raises(AdapterError, match="plain LoRA only"):
        write_lora(read_lora(tmp_path / "loha.safetensors"), tmp_path / "x.safetensors", "diffusers")


def test_written_kohya_file_reads_back_every_type(tmp_path):
    """LoHa/LoKr/DoRA written by sdlora (kohya/LyCORIS keys) read back with the same weight change."""
    module = "lora_unet_down_blocks_0_attentions_0_proj_in"
    torch.manual_seed(0)
    tensors = {f"{module}.hada_w1_a": torch.randn(8, 2), f"{module}.hada_w1_b": torch.randn(2, 8)}
    tensors |= {f"{module}.hada_w2_a": torch.randn(8, 2), f"{module}.hada_w2_b": torch.randn(2, 8)}
    tensors |= {f"{module}.alpha": torch.tensor(1.0), f"{module}.dora_scale": torch.rand(8, 1) + 0.5}
    save_file(tensors, tmp_path / "in.safetensors")
    lora = read_lora(tmp_path / "in.safetensors")
    out = write_lora(lora, tmp_path / "out.safetensors", "kohya")
    again = read_lora(out)
    weight = torch.randn(8, 8)
    for key, module_in in lora.modules.items():
        torch.testing.assert_close(again.modules[key].apply_to(weight, 0.7), module_in.apply_to(weight, 0.7))
    with safe_open(out, "pt") as handle:
        assert handle.metadata()["ss_network_module"] == "lycoris.kohya"
