"""A quantized base (--quantize-base int8 on the CPU, torchao through diffusers' TorchAoConfig): the LoRA
trains on top of the int8 weights, and the file it writes works on the ordinary, unquantized base. The
NF4 path needs CUDA (tests/test_cuda.py)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from sdlora.adapters import AdapterFacts, LoraFile, read_lora, write_lora
from sdlora.adapters.from_peft import modules_from_peft_model
from sdlora.config import ConfigError
from sdlora.generate import Generator
from sdlora.models import BaseModelError, load_base
from sdlora.models.quantization import QuantizationError, pipeline_quantization
from sdlora.train import train
from sdlora.train.checkpoint import load_checkpoint
from sdlora.train.networks import add_adapters, load_adapter_state
from sdlora.train.runs import RunFolder
from tests.conftest import step_losses, train_config
from tests.test_networks import NETWORKS, _randomise
from tests.tiny_models import load, unet_output

pytest.importorskip("torchao", reason="the int8 backend (pip install 'sdlora[quant]')")

# The adapter's effect on the int8 base and on the full-precision base differ only through the rounding
# of the frozen weights the effect passes through: int8 per output row keeps each weight within 1/254 of
# the row's largest, a fraction of a percent, compounded over the tiny U-Net's few layers (measured:
# 0.2-0.8% of the effect across the network types with random layers, 0.3% for the trained adapter). 3% of the effect leaves room for that and is far
# below what a wrong file gives (100%: the effect missing or doubled, a transposed or mis-scaled factor).
EFFECT_TOLERANCE = 0.03


def _linear_weight_types(model: torch.nn.Module) -> set[str]:
    return {type(m.weight).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)}


def test_int8_base_loads_its_unet_and_text_encoder_quantized(tiny_base):
    pipe = load_base(tiny_base, quantize="int8")
    assert _linear_weight_types(pipe.unet) == {"Int8Tensor"}
    assert _linear_weight_types(pipe.text_encoder) == {"Int8Tensor"}
    assert pipe.vae.dtype == torch.float32 and not getattr(pipe.vae, "is_quantized", False)


@pytest.mark.parametrize("kind", ["lora", "locon", "loha", "lokr", "dora"])
def test_adapter_made_on_an_int8_base_changes_the_full_base_as_it_did_in_memory(kind, tiny_base, tmp_path):
    options = {**NETWORKS[kind], "quantize_base": "int8"}
    config = train_config(tmp_path, tiny_base, tmp_path / "out", **options)
    quantized = load_base(tiny_base, quantize="int8")
    add_adapters(config, quantized.unet, {})
    _randomise(quantized.unet, seed=3)
    in_memory = unet_output(quantized.unet)
    quantized.unet.disable_adapters()
    effect_in_memory = in_memory - unet_output(quantized.unet)

    facts = AdapterFacts(name=kind, base_model=tiny_base, family="sd1", rank=4, alpha=4.0, targets="all")
    modules = {f"unet.{k}": m for k, m in modules_from_peft_model(quantized.unet).items()}
    path = write_lora(LoraFile(modules, facts.to_metadata()), tmp_path / "q.safetensors", "kohya")
    assert all(m.delta().dtype == torch.float32 for m in read_lora(path).modules.values())

    generator = Generator(tiny_base, device="cpu")  # the ordinary base, in fp32
    generator.activate({generator.load_adapter(path): 1.0})
    effect_on_full_base = unet_output(generator.pipe.unet) - unet_output(load(tiny_base).unet)

    scale = effect_in_memory.abs().max()
    assert scale > 1e-2, "the adapter should change the output"
    assert (effect_on_full_base - effect_in_memory).abs().max() < EFFECT_TOLERANCE * scale


def test_training_on_an_int8_base_writes_the_adapter_it_trained_for_the_full_base(
    tiny_base, blob_folder, tmp_path
):
    """A few steps on the int8 base; the trained layers (restored from the last checkpoint onto the int8
    base) and the written file (on the fp32 base) change the U-Net alike."""
    config = train_config(
        blob_folder, tiny_base, tmp_path / "out", steps=6, lr=3e-3, save_every=6, quantize_base="int8"
    )
    result = train(config)
    losses = step_losses(result)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert json.loads(RunFolder(result.run).config.read_text())["quantize_base"] == "int8"

    quantized = load_base(tiny_base, quantize="int8")
    add_adapters(config, quantized.unet, {})
    load_adapter_state(
        {"unet": quantized.unet}, load_checkpoint(RunFolder(result.run).latest_checkpoint()).lora
    )
    trained = unet_output(quantized.unet)
    quantized.unet.disable_adapters()
    effect_in_memory = trained - unet_output(quantized.unet)

    generator = Generator(tiny_base, device="cpu")
    generator.activate({generator.load_adapter(result.adapter): 1.0})
    effect_on_full_base = unet_output(generator.pipe.unet) - unet_output(load(tiny_base).unet)
    scale = effect_in_memory.abs().max()
    assert scale > 1e-4, "training left the adapter at its zero start"
    assert (effect_on_full_base - effect_in_memory).abs().max() < EFFECT_TOLERANCE * scale


def test_missing_int8_backend_says_what_to_install_before_any_run_starts(
    monkeypatch, tiny_base, blob_folder, tmp_path
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a)
    )
    with pytest.raises(QuantizationError, match=r"pip install 'sdlora\[quant\]'"):
        pipeline_quantization("int8", torch.float32, ["unet"])
    config = train_config(blob_folder, tiny_base, tmp_path / "out", quantize_base="int8")
    with pytest.raises(QuantizationError, match=r"pip install 'sdlora\[quant\]'"):
        train(config)
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_nf4_without_cuda_points_to_int8():
    with pytest.raises(QuantizationError, match="--quantize-base int8"):
        pipeline_quantization("nf4", torch.float32, ["unet"])


def test_a_single_file_base_is_refused_with_the_way_out(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    with pytest.raises(BaseModelError, match="diffusers folder"):
        load_base(str(checkpoint), quantize="int8")


def test_an_unknown_quantization_is_named(tmp_path):
    with pytest.raises(ConfigError, match="--quantize-base"):
        train_config(tmp_path, "unused", tmp_path / "out", quantize_base="fp4").validate()
