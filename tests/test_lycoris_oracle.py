"""LyCORIS files load exactly as LyCORIS itself computes them, checked against the lycoris-lora package.

The oracle is code sdlora did not write: lycoris-lora builds each network type on the demo model (and
on a tiny SDXL), with non-zero weights, applies it through its own modules and saves it with its own
writer. sdlora reads that file, writes the mix into the base weights and must give the same U-Net and
text-encoder outputs, within 1e-4 of the adapter's effect.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import pytest
import torch

from sdlora.adapters import read_lora
from sdlora.cli import main
from sdlora.generate import Generator
from sdlora.models import load_base
from tests.tiny_models import tiny_sdxl_pipeline

kohya = pytest.importorskip("lycoris.kohya", reason="lycoris-lora is the oracle (pip install lycoris-lora)")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)

# lycoris-lora 4.1's "full" preset names the time embedding twice (by class and by name) on diffusers
# U-Nets; the same targets, each once: attention, resnet convs, up/down samplers, conv in/out.
PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""

# name -> (lycoris network args, std of the random weights, the types sdlora must report)
CASES = {
    "locon": ({"algo": "locon"}, 0.1, {"LoRA", "LoCon"}),
    "locon-tucker": ({"algo": "locon", "use_tucker": True}, 0.1, {"LoRA", "LoCon"}),
    "loha": ({"algo": "loha"}, 0.3, {"LoHa"}),
    "loha-tucker": ({"algo": "loha", "use_tucker": True}, 0.3, {"LoHa"}),
    "lokr": ({"algo": "lokr", "factor": 4}, 0.1, {"LoKr"}),
    "lokr-both": ({"algo": "lokr", "factor": 4, "decompose_both": True}, 0.1, {"LoKr"}),
    "full": ({"algo": "full"}, 0.01, {"full"}),
    "dora": ({"algo": "locon", "dora_wd": True}, 0.1, {"LoRA+DoRA", "LoCon+DoRA"}),
    "dora-old-shape": (
        {"algo": "locon", "dora_wd": True, "wd_on_output": False},
        0.1,
        {"LoRA+DoRA", "LoCon+DoRA"},
    ),
    "loha-dora": ({"algo": "loha", "dora_wd": True}, 0.3, {"LoHa+DoRA"}),
}
TOLERANCE = 1e-4  # of the adapter's effect on the output


@pytest.fixture(scope="module")
def preset(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("lycoris") / "preset.toml"
    path.write_text(PRESET)
    return str(path)


def lycoris_network(pipe, preset: str, args: dict, std: float, seed: int, sdxl: bool = False):
    """A LyCORIS network applied to `pipe` (U-Net and text encoders) with random non-zero weights."""
    encoders = [pipe.text_encoder, pipe.text_encoder_2] if sdxl else pipe.text_encoder
    network = kohya.create_network(
        1.0, 4, 2.0, pipe.vae, encoders, pipe.unet, conv_dim=4, conv_alpha=1.0, preset=preset, **args
    )
    network.apply_to(encoders, pipe.unet, apply_text_encoder=True, apply_unet=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "dora_scale" in name:  # starts as the weight's norm: move it off that
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(std * torch.randn(param.shape, generator=generator))
    return network


@torch.no_grad()
def outputs(pipe, sdxl: bool = False) -> dict[str, torch.Tensor]:
    """What the adapter changes: each text encoder's hidden states and the U-Net's prediction."""
    generator = torch.Generator().manual_seed(0)
    prompts = ["a red circle", "a blue square on a white background"]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids  # fmt: skip
    size = 2 if sdxl else 4
    latents = torch.randn(2, pipe.unet.config.in_channels, size * 2, size * 2, generator=generator)
    timesteps = torch.tensor([10, 500])
    result = {"text_encoder": pipe.text_encoder(ids)[0]}
    if sdxl:
        second = pipe.text_encoder_2(ids, output_hidden_states=True)
        result["text_encoder_2"] = second.hidden_states[-2]
        hidden = torch.cat([result["text_encoder"], result["text_encoder_2"]], dim=-1)
        extra = {"text_embeds": second.text_embeds, "time_ids": torch.tensor([[16, 16, 0, 0, 16, 16]] * 2)}
        result["unet"] = pipe.unet(latents, timesteps, hidden, added_cond_kwargs=extra).sample
    else:
        result["unet"] = pipe.unet(latents, timesteps, encoder_hidden_states=result["text_encoder"]).sample
    return result


def assert_matches(ours: dict, reference: dict, base: dict) -> dict[str, float]:
    """Every output within TOLERANCE of the adapter's effect; returns the relative errors."""
    errors = {}
    for part in reference:
        effect = (reference[part] - base[part]).abs().max().item()
        assert effect > 1e-3, f"{part}: the adapter must change the output for the test to mean anything"
        errors[part] = (ours[part] - reference[part]).abs().max().item() / effect
    assert max(errors.values()) < TOLERANCE, errors
    return errors


@pytest.mark.parametrize("case", list(CASES))
def test_lycoris_file_generates_what_lycoris_computes(case, preset, tmp_path, capsys):
    args, std, types = CASES[case]
    base = outputs(load_base(None))
    pipe = load_base(None)
    network = lycoris_network(pipe, preset, args, std, seed=1)
    reference = outputs(pipe)
    path = tmp_path / f"{case}.safetensors"
    network.save_weights(str(path), torch.float32, {})

    lora = read_lora(path)
    assert set(lora.kinds) <= types and lora.kinds
    generator = Generator(load_base(None))
    name = generator.load_adapter(path)
    assert generator.skipped(name) == []
    generator.activate({name: 1.0})
    errors = assert_matches(outputs(generator.pipe), reference, base)
    print(f"{case}: largest relative difference {max(errors.values()):.2e}")

    generator.activate({})  # and the base comes back exactly
    for part, value in outputs(generator.pipe).items():
        assert torch.equal(value, base[part])
    assert main(["inspect", str(path), "--base", "--modules"]) == 0
    printed = capsys.readouterr().out
    assert "every tensor understood" in printed and "fits" in printed
    assert all(kind in printed for kind in lora.kinds)


def test_loha_and_lora_stack_at_weights_like_lycoris(preset, tmp_path):
    """A LoHa at 0.7 with a LoCon at 0.5: both LyCORIS networks on one model versus sdlora's mix."""
    base = outputs(load_base(None))
    pipe = load_base(None)
    loha = lycoris_network(pipe, preset, {"algo": "loha"}, 0.3, seed=2)
    loha.save_weights(str(tmp_path / "loha.safetensors"), torch.float32, {})
    locon = lycoris_network(pipe, preset, {"algo": "locon"}, 0.1, seed=3)
    locon.save_weights(str(tmp_path / "locon.safetensors"), torch.float32, {})
    loha.set_multiplier(0.7)
    locon.set_multiplier(0.5)
    reference = outputs(pipe)

    generator = Generator(load_base(None))
    names = [generator.load_adapter(tmp_path / f"{n}.safetensors") for n in ("loha", "locon")]
    generator.activate(dict(zip(names, (0.7, 0.5), strict=True)))
    assert_matches(outputs(generator.pipe), reference, base)


def test_sdxl_lycoris_file_with_both_text_encoders(preset, tmp_path):
    """lora_te1_ / lora_te2_ and the SDXL U-Net's layout, on a tiny SDXL."""
    base = outputs(tiny_sdxl_pipeline(), sdxl=True)
    pipe = tiny_sdxl_pipeline()
    network = lycoris_network(pipe, preset, {"algo": "lokr", "factor": 2}, 0.2, seed=4, sdxl=True)
    reference = outputs(pipe, sdxl=True)
    path = Path(tmp_path / "xl.safetensors")
    network.save_weights(str(path), torch.float32, {})
    assert {k.split(".")[0] for k in read_lora(path).modules} == {"unet", "text_encoder", "text_encoder_2"}

    generator = Generator(tiny_sdxl_pipeline())
    generator.activate({generator.load_adapter(path): 1.0})
    assert_matches(outputs(generator.pipe, sdxl=True), reference, base)


@pytest.mark.parametrize(
    "options",
    [dict(network="locon"), dict(network="loha"), dict(network="lokr"), dict(network="locon", dora=True)],
    ids=["locon", "loha", "lokr", "locon-dora"],
)
def test_the_files_sdlora_trains_load_in_lycoris_as_in_sdlora(options, tmp_path):
    """The other way round: LoCon, LoHa, LoKr and DoRA layers as sdlora trains them (resnet and resampling
    convolutions included, with their own rank), written by sdlora, read by LyCORIS's own loader
    (`create_network_from_weights`), move the demo model as sdlora's Generator does."""
    from sdlora.adapters import AdapterFacts, LoraFile, write_lora
    from sdlora.adapters.from_peft import modules_from_peft_model
    from sdlora.config import TrainConfig
    from sdlora.train.networks import add_adapters
    from tests.test_networks import _randomise

    config = TrainConfig(data_dir=str(tmp_path), rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, **options)
    network = config.network
    trained = load_base(None)
    add_adapters(config, trained.unet, {})
    _randomise(trained.unet, seed=5)
    modules = {f"unet.{k}": m for k, m in modules_from_peft_model(trained.unet).items()}
    facts = AdapterFacts(name=network, base_model="demo", family="sd1", rank=4, alpha=2.0, targets="all")
    path = write_lora(LoraFile(modules, facts.to_metadata()), tmp_path / f"{network}.safetensors", "kohya")

    base = outputs(load_base(None))
    pipe = load_base(None)
    kohya.LycorisNetworkKohya.apply_preset(tomllib.loads(PRESET))
    lycoris, weights = kohya.create_network_from_weights(
        1.0, str(path), pipe.vae, pipe.text_encoder, pipe.unet
    )
    lycoris.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    loaded = lycoris.load_state_dict(weights, strict=False)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    assert any("_resnets_" in lora.lora_name for lora in lycoris.unet_loras)
    reference = outputs(pipe)

    generator = Generator(load_base(None))
    generator.activate({generator.load_adapter(path): 1.0})
    ours = outputs(generator.pipe)
    assert_matches({"unet": ours["unet"]}, {"unet": reference["unet"]}, base)
