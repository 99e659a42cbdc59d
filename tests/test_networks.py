"""Network types (LoRA, LoCon, LoHa, LoKr, DoRA, rsLoRA): the peft layers the trainer adds are written in
the kohya/LyCORIS layout and reload through sdlora's reader and Generator with the trained output, and each
type learns on the tiny base."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from sdlora.adapters import AdapterFacts, LoraFile, read_lora, write_lora
from sdlora.adapters.from_peft import modules_from_peft_model
from sdlora.config import ConfigError
from sdlora.generate import Generator
from sdlora.train import train
from sdlora.train.networks import add_adapters
from tests.conftest import train_config
from tests.tiny_models import load, unet_output

NETWORKS = {
    "lora": dict(network="lora"),
    "locon": dict(network="locon", conv_rank=2, conv_alpha=3.0),
    "loha": dict(network="loha", conv_rank=2, conv_alpha=3.0),
    "lokr": dict(network="lokr", conv_rank=2, conv_alpha=3.0),
    "dora": dict(network="lora", dora=True),
    "locon-dora": dict(network="locon", dora=True),
    "rslora": dict(network="lora", rslora=True, alpha=8.0),
}
KINDS = {
    "lora": {"LoRA"},
    "locon": {"LoRA", "LoCon"},
    "loha": {"LoHa"},
    "lokr": {"LoKr"},
    "dora": {"LoRA+DoRA"},
    "locon-dora": {"LoRA+DoRA", "LoCon+DoRA"},
    "rslora": {"LoRA"},
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-zero adapter weights (peft starts one factor at zero) so every tensor shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g) * 0.2
                p.copy_(p + noise if "magnitude" in name else noise)


def _keys(path) -> list[str]:
    with safe_open(str(path), "pt") as handle:
        return list(handle.keys())


@pytest.mark.parametrize("kind", NETWORKS)
def test_each_network_type_reloads_with_the_output_it_had_in_memory(kind, tiny_base, tmp_path):
    options = {"rank": 4, "alpha": 2.0, **NETWORKS[kind]}
    config = train_config(tmp_path, tiny_base, tmp_path / "out", **options)
    config.validate()
    trained = load(tiny_base)
    add_adapters(config, trained.unet, {})
    _randomise(trained.unet, seed=1)
    expected = unet_output(trained.unet)

    facts = AdapterFacts(
        name=kind, base_model=tiny_base, family="sd1", rank=4, alpha=config.lora_alpha, targets="all"
    )
    modules = {f"unet.{k}": m for k, m in modules_from_peft_model(trained.unet).items()}
    path = write_lora(LoraFile(modules, facts.to_metadata()), tmp_path / f"{kind}.safetensors", "kohya")
    assert set(read_lora(path).kinds) == KINDS[kind]
    conv_keys = [key for key in _keys(path) if "_resnets_" in key]
    assert bool(conv_keys) == (kind not in ("lora", "dora", "rslora")), "LoCon, LoHa, LoKr adapt the resnets"

    generator = Generator(tiny_base, device="cpu")
    generator.activate({generator.load_adapter(path): 1.0})
    reloaded = unet_output(generator.pipe.unet)
    base = unet_output(load(tiny_base).unet)
    assert (expected - base).abs().max() > 1e-2, "the adapter should change the output"
    assert (reloaded - expected).abs().max() < 1e-4


def test_rslora_writes_the_alpha_that_gives_its_scale_under_alpha_over_rank(tiny_base, tmp_path):
    config = train_config(tmp_path, tiny_base, tmp_path / "out", rank=4, alpha=8.0, rslora=True)
    trained = load(tiny_base)
    add_adapters(config, trained.unet, {})
    module = next(iter(modules_from_peft_model(trained.unet).values()))
    assert module.alpha == pytest.approx(8.0 * 4**0.5)  # alpha' / r == alpha / sqrt(r)
    assert module.scale == pytest.approx(8.0 / 4**0.5)


def test_dora_magnitude_is_lycoris_dora_scale(tiny_base, tmp_path):
    """peft's magnitude is the norm of W0 + dW per output row: exactly LyCORIS's dora_scale [out, 1]."""
    config = train_config(tmp_path, tiny_base, tmp_path / "out", rank=4, dora=True)
    trained = load(tiny_base)
    add_adapters(config, trained.unet, {})
    _randomise(trained.unet, seed=2)
    layer = trained.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    module = modules_from_peft_model(trained.unet)[
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    ]
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        weight = layer.get_base_layer().weight
        assert module.dora_scale.shape == (weight.shape[0], 1)
        torch.testing.assert_close(
            x @ (weight + module.apply_to(weight, 1.0)).T, layer(x), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("kind", ["locon", "loha", "lokr", "dora", "rslora"])
def test_each_network_type_trains_and_its_file_says_what_it_is(kind, tiny_base, blob_folder, tmp_path):
    config = train_config(blob_folder, tiny_base, tmp_path / "out", steps=6, lr=3e-3, **NETWORKS[kind])
    result = train(config)
    lora = read_lora(result.adapter)
    assert set(lora.kinds) == KINDS[kind]
    facts = lora.facts
    assert (facts.network, facts.dora, facts.rslora) == (
        config.network,
        config.dora,
        config.rslora,
    )
    learned = torch.cat([m.delta().flatten() for m in lora.modules.values()])
    assert learned.abs().max() > 1e-4, "training left the adapter at its zero start"
    with safe_open(str(result.adapter), "pt") as handle:
        metadata = handle.metadata()
    if config.dora:
        assert json.loads(metadata["ss_network_args"])["dora_wd"] == "True"


@pytest.mark.parametrize(
    "change, option",
    [
        (dict(network="loha", dora=True), "--dora"),
        (dict(network="lokr", rslora=True), "--rslora"),
        (dict(network="lora", conv_rank=4), "--conv-rank"),
        (dict(network="locon", conv_alpha=0), "--conv-alpha"),
        (dict(network="glora"), "--network"),
    ],
)
def test_bad_network_options_are_named(change, option, tmp_path):
    with pytest.raises(ConfigError, match=option):
        train_config(tmp_path, "unused", tmp_path / "out", **change).validate()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rank=64), r"--rank 64 is more than this base's narrowest adapted layer is wide \(32, "),
        (dict(network="locon", conv_rank=200), r"--conv-rank 200 .* \(32, down_blocks"),
    ],
)
def test_a_rank_wider_than_the_bases_layers_is_refused_before_any_work(
    change, message, tiny_base, blob_folder, tmp_path
):
    """The tiny base's attention and first convolutions are 32 wide: a higher rank would only
    add size, so the run stops at loading with the bound, and writes no adapter."""
    config = train_config(blob_folder, tiny_base, tmp_path / "out", **change)
    config.validate()  # the bound depends on the base, so only loading it can tell
    with pytest.raises(ConfigError, match=message):
        train(config)
    assert not (tmp_path / "out" / "adapters").exists() or not any((tmp_path / "out" / "adapters").iterdir())
    train(train_config(blob_folder, tiny_base, tmp_path / "ok", rank=32, steps=1))  # the bound itself is fine
