"""The trainer: adapters that change the model, reload identically, preserve priors, resume and say what they are."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file

from sdlora.adapters import read_adapter, summarize
from sdlora.config import ConfigError
from sdlora.data import DataError
from sdlora.train import TrainingError, read_events, train
from tests.conftest import adapter_learned, step_losses, train_config
from tests.tiny_models import load, text_output, unet_output


def test_adapter_changes_the_model_and_reloads_identically_with_alpha_not_rank(
    tiny_base, blob_folder, tmp_path
):
    config = train_config(
        blob_folder, tiny_base, tmp_path / "out", rank=4, alpha=16, save_every=4, text_encoder=True
    )
    result = train(config)
    assert result.adapter.is_file() and result.steps == 4

    # The weights as they were in memory at the end of training (the final checkpoint holds exactly those).
    checkpoint = load_file(result.run / "checkpoints" / "step-000004" / "lora.safetensors")
    in_memory = load(tiny_base)
    unet_before, text_before = unet_output(in_memory.unet), text_output(in_memory)
    for part, targets in (
        ("unet", ["to_q", "to_k", "to_v", "to_out.0"]),
        ("text_encoder", ["q_proj", "k_proj", "v_proj", "out_proj"]),
    ):
        model = getattr(in_memory, part)
        model.add_adapter(LoraConfig(r=4, lora_alpha=16, target_modules=targets))
        set_peft_model_state_dict(
            model, {k.removeprefix(f"{part}."): v for k, v in checkpoint.items() if k.startswith(f"{part}.")}
        )
    unet_expected, text_expected = unet_output(in_memory.unet), text_output(in_memory)
    assert (unet_expected - unet_before).abs().max() > 1e-4, "training did not change the U-Net's output"
    assert (text_expected - text_before).abs().max() > 1e-4, "training did not change the text encoder"

    # Reloaded by diffusers' own loader from the adapter file: the same outputs, alpha 16 on rank 4 honoured.
    pipe = load(tiny_base)
    pipe.load_lora_weights(str(result.adapter), adapter_name="lora_trained")
    torch.testing.assert_close(unet_output(pipe.unet), unet_expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_output(pipe), text_expected, rtol=1e-5, atol=1e-5)


def test_metadata_round_trips(tiny_base, blob_folder, tmp_path):
    config = train_config(
        blob_folder,
        tiny_base,
        tmp_path / "out",
        rank=4,
        alpha=2,
        steps=2,
        lr=5e-4,
        class_prompt="a photo of blob",
        num_class_images=2,
        text_encoder=True,
    )
    result = train(config)
    facts = summarize(result.adapter)["facts"]
    assert facts["rank"] == 4 and facts["alpha"] == 2.0 and facts["steps"] == 2
    assert facts["base_model"] == tiny_base and facts["family"] == "sd1"
    assert facts["instance_prompt"] == "a photo of sks blob" and facts["class_prompt"] == "a photo of blob"
    assert facts["trigger_words"] == "sks"
    assert facts["resolution"] == 16 and facts["image_count"] == 4 and facts["learning_rate"] == 5e-4
    assert facts["text_encoder"] is True and facts["version"]
    tensors, metadata = read_adapter(result.adapter)  # the kohya layout, as handed out
    assert any(k.startswith("lora_te_") for k in tensors) and any(k.startswith("lora_unet_") for k in tensors)
    assert metadata["ss_network_alpha"] == "2" and metadata["ss_network_dim"] == "4"
    assert all(float(v) == 2.0 for k, v in tensors.items() if k.endswith(".alpha"))


def test_cross_attention_only_targets_attn2(tiny_base, blob_folder, tmp_path):
    result = train(train_config(blob_folder, tiny_base, tmp_path / "out", steps=1, targets="cross"))
    keys = read_adapter(result.adapter)[0]
    assert keys and all("_attn2_" in k for k in keys)  # kohya names: dots flattened to underscores


def test_prior_preservation_generates_then_reuses_class_images(tiny_base, blob_folder, tmp_path):
    class_dir = tmp_path / "class"
    config = train_config(
        blob_folder,
        tiny_base,
        tmp_path / "out",
        steps=2,
        class_prompt="a photo of blob",
        class_dir=str(class_dir),
        num_class_images=3,
        prior_weight=0.5,
    )
    first = train(config)
    made = [e for e in read_events(first.run / "events.jsonl") if e["event"] == "class_images"][0]
    assert made["generated"] == 3 and len(list(class_dir.glob("*.png"))) == 3
    assert (class_dir / "class-00000.txt").read_text() == "a photo of blob"
    stamps = {p.name: p.stat().st_mtime_ns for p in class_dir.glob("*.png")}

    second = train(config)
    again = [e for e in read_events(second.run / "events.jsonl") if e["event"] == "class_images"][0]
    assert again["generated"] == 0
    assert stamps == {p.name: p.stat().st_mtime_ns for p in class_dir.glob("*.png")}


def test_resume_continues_from_the_saved_step_and_matches_an_uninterrupted_run(
    tiny_base, blob_folder, tmp_path
):
    common = dict(steps=6, save_every=2, dropout=0.1, flip=True)
    straight = train(train_config(blob_folder, tiny_base, tmp_path / "a", **common))

    outputs = tmp_path / "b"
    train(train_config(blob_folder, tiny_base, outputs, **{**common, "steps": 4}))
    resumed = train(train_config(blob_folder, tiny_base, outputs, resume="latest", **common))
    events = read_events(resumed.run / "events.jsonl")
    starts = [e for e in events if e["event"] == "start"]
    assert [s["start_step"] for s in starts] == [0, 4]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4, 5, 6]

    a, b = read_adapter(straight.adapter)[0], read_adapter(resumed.adapter)[0]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_v_prediction_base_trains(tiny_vpred_base, blob_folder, tmp_path):
    result = train(
        train_config(
            blob_folder, tiny_vpred_base, tmp_path / "out", steps=2, snr_gamma=5.0, noise_offset=0.05
        )
    )
    assert result.final_loss == pytest.approx(result.final_loss)  # finite
    assert summarize(result.adapter)["facts"]["family"] == "sd2"


def test_events_and_samples(tiny_base, blob_folder, tmp_path):
    seen = []
    result = train(
        train_config(
            blob_folder,
            tiny_base,
            tmp_path / "out",
            steps=2,
            sample_every=1,
            sample_prompt=["a sks blob", "a blob"],
        ),
        on_event=seen.append,
    )
    events = read_events(result.run / "events.jsonl")
    assert [e["event"] for e in events] == [e["event"] for e in seen]
    steps = [e for e in events if e["event"] == "step"]
    assert {"loss", "lr", "eta_s", "elapsed_s"} <= steps[0].keys()
    samples = [e for e in events if e["event"] == "sample"]
    assert len(samples) == 2 and all(len(e["paths"]) == 2 for e in samples)
    assert events[-1]["event"] == "done" and (result.run / "config.json").is_file()


def test_no_usable_image_fails_before_loading_any_model(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="No usable images"):
        train(train_config(tmp_path / "empty", "no/such-model", tmp_path / "out"))


@pytest.mark.parametrize(
    "change, option",
    [
        ({"rank": 0}, "--rank"),
        ({"lr": -1.0}, "--lr"),
        ({"steps": 0}, "--steps"),
        ({"resolution": 30}, "--resolution"),
        ({"prior_weight": 1.0}, "--prior-weight"),
    ],
)
def test_bad_options_are_named(blob_folder, tmp_path, change, option):
    with pytest.raises(ConfigError, match=option):
        train(train_config(blob_folder, "no/such-model", tmp_path / "out", **change))


def test_memory_and_schedule_options_train(tiny_base, blob_folder, tmp_path):
    result = train(
        train_config(
            blob_folder,
            tiny_base,
            tmp_path / "out",
            steps=3,
            batch_size=2,
            grad_accum=2,
            gradient_checkpointing=True,
            lr_scheduler="cosine",
            warmup_steps=1,
            text_encoder=True,
            text_encoder_lr=1e-5,
        )
    )
    events = read_events(result.run / "events.jsonl")
    lrs = [e["lr"] for e in events if e["event"] == "step"]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] < lrs[0]  # warmed up, then decaying


def test_channels_last_trains_the_same_adapter(tiny_base, blob_folder, tmp_path):
    plain = train(train_config(blob_folder, tiny_base, tmp_path / "plain", steps=2))
    fast = train(train_config(blob_folder, tiny_base, tmp_path / "fast", steps=2, channels_last=True))
    start = next(e for e in read_events(fast.run / "events.jsonl") if e["event"] == "start")
    assert start["channels_last"] is True
    assert start["attention"] == "AttnProcessor2_0"  # PyTorch's fused scaled_dot_product_attention
    torch.testing.assert_close(
        adapter_learned(fast.adapter), adapter_learned(plain.adapter), atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("compiler_is_right", [True, False])
def test_compile_is_used_only_when_its_gradients_match_eager(
    tiny_base, blob_folder, tmp_path, monkeypatch, compiler_is_right
):
    """--compile checks the compiled U-Net's LoRA gradients against eager ones on the first batch and
    trains without it, saying so, when they differ (inductor has miscompiled LoRA gradients before)."""

    real_compile = torch.compile

    def fake_compile(module, **options):  # dynamo's eager backend: traced, not code-generated, so quick
        compiled = real_compile(module, backend="eager", **options)
        return (
            compiled
            if compiler_is_right
            else lambda *a, **k: type("Out", (), {"sample": 0.5 * compiled(*a, **k).sample})
        )

    monkeypatch.setattr(torch, "compile", fake_compile)
    plain = train(train_config(blob_folder, tiny_base, tmp_path / "plain", steps=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(train_config(blob_folder, tiny_base, tmp_path / "compiled", steps=2, compile=True))
    events = read_events(result.run / "events.jsonl")
    start = next(e for e in events if e["event"] == "start")
    assert start["compiled"] is compiler_is_right
    warned = [e["message"] for e in events if e["event"] == "warning"]
    if compiler_is_right:
        assert start["compile_gradient_error"] < 1e-3 and not warned
    else:
        assert start["compile_gradient_error"] > 0.1
        assert "training without it" in warned[0] and any("torch.compile" in str(w.message) for w in caught)
    assert step_losses(result) == pytest.approx(step_losses(plain), rel=1e-4)
    torch.testing.assert_close(
        adapter_learned(result.adapter), adapter_learned(plain.adapter), atol=1e-5, rtol=1e-4
    )


def test_bf16_mixed_precision_learns_what_fp32_learns(tiny_base, blob_folder, tmp_path):
    """The GPU default (bf16 autocast, frozen weights in bf16, LoRA weights kept in fp32) runs on the CPU too."""
    plain = train(train_config(blob_folder, tiny_base, tmp_path / "fp32", steps=4))
    mixed = train(train_config(blob_folder, tiny_base, tmp_path / "bf16", steps=4, mixed_precision="bf16"))
    start = next(e for e in read_events(mixed.run / "events.jsonl") if e["event"] == "start")
    assert start["mixed_precision"] == "bf16"
    assert {t.dtype for t in load_file(mixed.adapter).values()} == {torch.float32}
    learned, reference = adapter_learned(mixed.adapter), adapter_learned(plain.adapter)
    assert torch.nn.functional.cosine_similarity(learned, reference, dim=0) > 0.9
    assert step_losses(mixed) == pytest.approx(step_losses(plain), rel=0.05)
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="fp16 needs a CUDA GPU"):
            train(train_config(blob_folder, tiny_base, tmp_path / "fp16", steps=1, mixed_precision="fp16"))
