"""The GPU path: what only a CUDA device can show (half precision, 8-bit AdamW, the compiler on its
real backend, running out of memory). Skipped without CUDA; `make gpu-check` runs them on a GPU.

    python -m pytest -m cuda tests/test_cuda.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdlora.config import TrainConfig
from sdlora.demo import demo_model_available
from sdlora.generate import GenerationParams, Generator
from sdlora.train import TrainingError, read_events, train
from tests.conftest import train_config
from tests.tiny_models import save_tiny_pipeline

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PARAMS = GenerationParams("a photo of sks blob", seed=7, steps=4, guidance=3.0)


@pytest.fixture(scope="module")
def tiny_sdxl_base(tmp_path_factory) -> str:
    return str(save_tiny_pipeline(tmp_path_factory.mktemp("bases") / "tiny-sdxl", sdxl=True))


def learned(path) -> torch.Tensor:
    """All LoRA B weights of an adapter file: they start at zero, so they hold what training learned."""
    weights = load_file(path)
    return torch.cat([weights[key].flatten().float() for key in sorted(weights) if "lora_B" in key])


def events_of(result) -> list[dict]:
    return read_events(result.run / "events.jsonl")


def losses(result) -> list[float]:
    return [e["loss"] for e in events_of(result) if e["event"] == "step"]


def start_event(result) -> dict:
    return next(e for e in events_of(result) if e["event"] == "start")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_half_precision_training_learns_what_fp32_learns(
    tiny_base, tiny_sdxl_base, blob_folder, tmp_path, precision, family
):
    """Frozen weights in bf16/fp16 under autocast (fp16 with a gradient scaler), LoRA weights in fp32."""
    base = tiny_base if family == "sd" else tiny_sdxl_base
    full = train(train_config(blob_folder, base, tmp_path / "fp32", steps=4, mixed_precision="no"))
    half = train(train_config(blob_folder, base, tmp_path / precision, steps=4, mixed_precision=precision))
    assert start_event(half)["mixed_precision"] == precision
    assert {t.dtype for t in load_file(half.adapter).values()} == {torch.float32}
    assert all(np.isfinite(losses(half)))
    assert torch.nn.functional.cosine_similarity(learned(half.adapter), learned(full.adapter), dim=0) > 0.9
    assert losses(half) == pytest.approx(losses(full), rel=0.05)


@pytest.mark.skipif(not demo_model_available(), reason="the demo model has not been built")
def test_the_demo_model_learns_the_star_in_bf16(tmp_path):
    """tests/test_learning.py's subject claim, trained in bf16 on the GPU: the LoRA draws the star."""
    from tests.test_learning import DATA, SUBJECT_PROMPT, images_of, render, star_distance

    config = TrainConfig(
        data_dir=str(DATA / "sks_star"),
        prompt="a purple sks shape",
        steps=400,
        rank=4,
        lr=1e-3,
        batch_size=4,
        snr_gamma=5.0,
        seed=0,
        mixed_precision="bf16",
        outputs=str(tmp_path),
        name="star",
    )
    result = train(config)
    assert start_event(result)["mixed_precision"] == "bf16"
    generator = Generator()
    generator.load_adapter(result.adapter, name="star")
    stars = images_of(DATA / "sks_star")
    base = star_distance(render(generator, SUBJECT_PROMPT, {}), stars)
    lora = star_distance(render(generator, SUBJECT_PROMPT, {"lora_star": 1.0}), stars)
    assert lora < 0.6 * base, (base, lora)  # the CPU's fp32 run: 0.250 -> 0.081


def test_adamw8bit_trains(tiny_base, blob_folder, tmp_path):
    """bitsandbytes' 8-bit AdamW (CUDA only) on the LoRA weights: finite losses, a learned adapter."""
    result = train(train_config(blob_folder, tiny_base, tmp_path / "out", steps=4, optimizer="adamw8bit"))
    assert all(np.isfinite(losses(result)))
    assert learned(result.adapter).abs().max() > 0


def test_gradient_checkpointing_trains_the_same_adapter(tiny_base, blob_folder, tmp_path):
    """Recomputing activations in the backward pass changes the memory, not the maths."""
    common = {"steps": 3, "mixed_precision": "no", "tf32": False}
    plain = train(train_config(blob_folder, tiny_base, tmp_path / "plain", **common))
    saving = train(
        train_config(blob_folder, tiny_base, tmp_path / "ckpt", gradient_checkpointing=True, **common)
    )
    torch.testing.assert_close(learned(saving.adapter), learned(plain.adapter), atol=1e-5, rtol=1e-3)


def test_compile_is_checked_against_eager_on_the_gpu(tiny_base, blob_folder, tmp_path):
    """--compile with inductor's CUDA backend: the gradient check runs, and its verdict holds either way
    (compiled and equal to eager, or refused with a warning event)."""
    common = {"steps": 3, "mixed_precision": "no", "tf32": False}
    plain = train(train_config(blob_folder, tiny_base, tmp_path / "plain", **common))
    result = train(train_config(blob_folder, tiny_base, tmp_path / "compiled", compile=True, **common))
    start = start_event(result)
    warned = [e["message"] for e in events_of(result) if e["event"] == "warning"]
    if start["compiled"]:
        assert start["compile_gradient_error"] <= 0.05 and not warned
        assert losses(result) == pytest.approx(losses(plain), rel=1e-3)
        torch.testing.assert_close(learned(result.adapter), learned(plain.adapter), atol=1e-4, rtol=1e-2)
    else:
        assert start["compile_gradient_error"] > 0.05 and "training without it" in warned[0]


def test_stacked_generation_in_fp16_matches_fp32(tiny_base, two_adapters):
    """The mix written into fp16 weights (computed in fp32 from the pristine copy) draws what fp32 draws."""
    images = {}
    for dtype in (torch.float16, torch.float32):
        generator = Generator(tiny_base, dtype=dtype)
        assert generator.device.type == "cuda"
        names = [generator.load_adapter(path) for path in two_adapters]
        mix = dict(zip(names, (0.8, 0.5), strict=True))
        images[dtype] = {
            "base": np.asarray(generator.generate(PARAMS), dtype=np.int16),
            "mix": np.asarray(generator.generate(PARAMS, mix), dtype=np.int16),
        }
    half, full = images[torch.float16], images[torch.float32]
    effect = np.abs(full["mix"] - full["base"]).mean()
    assert effect > 1.0  # the adapters visibly change the image...
    assert np.abs(half["mix"] - full["mix"]).mean() < 0.25 * effect  # ...and fp16 draws that change


def test_two_hundred_fp16_mixes_on_the_gpu_leave_the_base_bit_identical(tiny_base, two_adapters):
    """tests/test_generate.py's drift test on the device: the fp16 U-Net after 200 mixes then none is a
    fresh load, bit for bit."""
    fresh = {
        k: v.clone() for k, v in Generator(tiny_base, dtype=torch.float16).pipe.unet.state_dict().items()
    }
    generator = Generator(tiny_base, dtype=torch.float16)
    names = [generator.load_adapter(path) for path in two_adapters]
    rng = np.random.default_rng(0)
    for step in range(200):
        mix = {name: float(w) for name, w in zip(names, rng.uniform(-4, 4, size=2), strict=True)}
        generator.activate(mix if step % 7 else {names[0]: 4.0})
    generator.activate({})
    for key, value in generator.pipe.unet.state_dict().items():
        assert value.device.type == "cuda" and value.dtype == torch.float16
        assert torch.equal(value, fresh[key]), key


def test_nf4_base_trains_an_adapter_that_works_on_the_full_base(tiny_base, blob_folder, tmp_path):
    """QLoRA: the U-Net and text encoder load as bitsandbytes NF4, the LoRA trains on top, and the file
    moves the ordinary fp32 base as the layers moved the NF4 one. NF4 keeps 16 levels per block of 64
    weights, so each frozen weight is off by up to ~1/16 of its block's largest (int8: 1/254): the two
    effects agree to 25%; a wrong file (effect missing, doubled, mis-scaled) is off by 100%."""
    pytest.importorskip("bitsandbytes", reason="pip install 'sdlora[cuda]'")
    from sdlora.adapters import AdapterFacts, LoraFile, read_lora, write_lora
    from sdlora.adapters.from_peft import modules_from_peft_model
    from sdlora.models import load_base
    from sdlora.train.networks import add_adapters
    from tests.test_networks import _randomise
    from tests.tiny_models import load, unet_output

    config = train_config(blob_folder, tiny_base, tmp_path / "out", steps=6, lr=3e-3, quantize_base="nf4")
    result = train(config)
    assert all(np.isfinite(losses(result)))
    assert learned(result.adapter).abs().max() > 1e-4

    nf4 = load_base(tiny_base, quantize="nf4", dtype=torch.bfloat16)
    nf4.unet.to("cuda")
    assert "Linear4bit" in {type(m).__name__ for m in nf4.unet.modules()}
    add_adapters(config, nf4.unet, {})
    _randomise(nf4.unet, seed=3)
    with torch.autocast("cuda", torch.bfloat16):
        trained = unet_output(nf4.unet).float()
        nf4.unet.disable_adapters()
        effect_nf4 = (trained - unet_output(nf4.unet).float()).cpu()
    facts = AdapterFacts(name="nf4", base_model=tiny_base, family="sd1", rank=4, alpha=4.0, targets="all")
    modules = {f"unet.{k}": m for k, m in modules_from_peft_model(nf4.unet).items()}
    path = write_lora(LoraFile(modules, facts.to_metadata()), tmp_path / "nf4.safetensors", "kohya")
    assert all(m.delta().dtype == torch.float32 for m in read_lora(path).modules.values())

    generator = Generator(tiny_base, device="cpu")
    generator.activate({generator.load_adapter(path): 1.0})
    effect_full = unet_output(generator.pipe.unet) - unet_output(load(tiny_base).unet)
    assert (effect_full - effect_nf4).abs().max() < 0.25 * effect_full.abs().max()


def test_an_oversized_batch_runs_out_of_memory_with_advice(tiny_base, blob_folder, tmp_path):
    """A batch no GPU holds (16384 images at 256 px, 128x128 latents on the tiny base: one activation of
    its first block alone is 34 GB) stops with what to change, not a bare CUDA error. Last in this file:
    it leaves the allocator at its high-water mark."""
    try:
        with pytest.raises(TrainingError, match="Out of GPU memory.*--gradient-checkpointing"):
            train(
                train_config(
                    blob_folder, tiny_base, tmp_path / "out", steps=1, batch_size=16384, resolution=256
                )
            )
    finally:
        torch.cuda.empty_cache()
