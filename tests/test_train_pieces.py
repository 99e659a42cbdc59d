"""The trainer's pieces without a training run: the loss target, when to save and sample, the registries,
and the typed events' JSON form."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from sdlora.config import TrainConfig
from sdlora.data import Bucket
from sdlora.train.cache import Example
from sdlora.train.conditioning import Conditioning, SizeInfo
from sdlora.train.events import (
    EVENT_TYPES,
    DoneEvent,
    EventLog,
    StartEvent,
    StepEvent,
    parse_event,
    read_events,
)
from sdlora.train.loss import LossContext, diffusion_loss
from sdlora.train.networks import NETWORKS
from sdlora.train.optimizers import OPTIMIZERS
from sdlora.train.trainer import needs_checkpoint, needs_sample


class RecordingUNet(torch.nn.Module):
    """Predicts 0.3 × its input and keeps what it was given, so a test can recompute the loss by hand."""

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, **_) -> SimpleNamespace:
        self.noisy, self.timesteps = noisy.detach().clone(), timesteps.clone()
        return SimpleNamespace(sample=0.3 * noisy)


def loss_context(prediction_type: str, **options) -> tuple[LossContext, list[Example]]:
    """A loss context around the recording U-Net and three examples whose latents are exactly `mean`
    (std 0), so x0 is known and the noise can be solved for from the noisy input."""
    scale = 0.5
    examples = [
        Example(
            mean=torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i)),
            std=torch.zeros(4, 8, 8),
            flipped=None,
            size=SizeInfo((64, 64), (0, 0), Bucket(64, 64)),
            caption="x",
            repeats=1,
        )
        for i in range(3)
    ]
    ctx = LossContext(
        config=TrainConfig(data_dir="unused", **options),
        unet=RecordingUNet(),
        conditioner=SimpleNamespace(unet_kwargs=lambda conditioning, sizes, dtype: {}),
        text_encoders={},
        scheduler=DDPMScheduler(prediction_type=prediction_type),
        cached_text={"x": Conditioning(torch.zeros(1, 4))},
        rng=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        weight_dtype=torch.float32,
        vae_scale=scale,
    )
    return ctx, examples


@pytest.mark.parametrize(
    "prediction_type, snr_gamma",
    [("epsilon", None), ("v_prediction", None), ("v_prediction", 5.0), ("epsilon", 5.0)],
)
def test_the_loss_is_the_mse_to_the_scheduler_target(prediction_type, snr_gamma):
    ctx, examples = loss_context(prediction_type, snr_gamma=snr_gamma)
    loss = diffusion_loss(ctx, examples, [])

    # By hand: x0 is the scaled mean; noisy = alpha_t·x0 + sigma_t·noise gives the noise back.
    x0 = torch.stack([e.mean for e in examples]).double() * ctx.vae_scale
    noisy, t = ctx.unet.noisy.double(), ctx.unet.timesteps
    alpha_bar = ctx.scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    alpha_t, sigma_t = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    noise = (noisy - alpha_t * x0) / sigma_t
    velocity = alpha_t * noise - sigma_t * x0
    target = velocity if prediction_type == "v_prediction" else noise
    per_example = ((0.3 * noisy - target) ** 2).mean(dim=(1, 2, 3))
    if snr_gamma:
        snr = (alpha_t / sigma_t).flatten() ** 2
        weight = snr.clamp(max=snr_gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
        per_example = per_example * weight
    assert loss.item() == pytest.approx(per_example.mean().item(), rel=1e-4)

    other = noise if prediction_type == "v_prediction" else velocity  # the test tells the targets apart
    assert loss.item() != pytest.approx(((0.3 * noisy - other) ** 2).mean().item(), rel=1e-2)


def test_the_class_images_loss_is_added_at_the_prior_weight():
    ctx, examples = loss_context("epsilon", prior_weight=0.25)
    loss = diffusion_loss(ctx, examples[:1], examples[1:2])  # same shapes: one U-Net pass over both
    x0 = torch.stack([e.mean for e in examples[:2]]).double() * ctx.vae_scale
    noisy, t = ctx.unet.noisy.double(), ctx.unet.timesteps
    alpha_bar = ctx.scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    noise = (noisy - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
    instance, prior = ((0.3 * noisy - noise) ** 2).mean(dim=(1, 2, 3))
    assert loss.item() == pytest.approx((instance + 0.25 * prior).item(), rel=1e-4)


def test_checkpoints_every_save_every_steps_at_the_end_and_on_cancel():
    config = TrainConfig(data_dir="unused", steps=10, save_every=4)
    assert [s for s in range(1, 11) if needs_checkpoint(config, s, cancelled=False)] == [4, 8, 10]
    assert needs_checkpoint(config, 3, cancelled=True)
    never = TrainConfig(data_dir="unused", steps=10, save_every=0)
    assert not any(needs_checkpoint(never, s, cancelled=False) for s in range(1, 11))
    assert needs_checkpoint(never, 5, cancelled=True)  # a cancelled run can always be resumed


def test_samples_every_sample_every_steps_and_at_the_end_when_there_are_prompts():
    config = TrainConfig(data_dir="unused", steps=7, sample_every=3, sample_prompt=["a sks blob"])
    assert [s for s in range(1, 8) if needs_sample(config, s)] == [3, 6, 7]
    assert not any(needs_sample(dataclasses.replace(config, sample_prompt=[]), s) for s in range(1, 8))
    assert not any(needs_sample(dataclasses.replace(config, sample_every=0), s) for s in range(1, 8))


def test_every_optimizer_and_network_choice_has_a_builder():
    choices = next(f for f in dataclasses.fields(TrainConfig) if f.name == "optimizer").metadata["choices"]
    assert set(OPTIMIZERS) == set(choices)
    networks = next(f for f in dataclasses.fields(TrainConfig) if f.name == "network").metadata["choices"]
    assert set(NETWORKS) == set(networks)


def test_events_keep_their_json_form_and_read_back_typed(tmp_path):
    step = StepEvent(step=3, total=4, loss=0.5, lr=1e-4, elapsed_s=1.5, eta_s=0.5, images_per_s=2.0)
    seen = []
    EventLog(tmp_path / "events.jsonl", seen.append).emit(step)
    record = json.loads((tmp_path / "events.jsonl").read_text())
    assert list(record) == [
        "event",
        "time",
        "step",
        "total",
        "loss",
        "lr",
        "elapsed_s",
        "eta_s",
        "images_per_s",
        "grad_norm",
    ]
    assert read_events(tmp_path / "events.jsonl") == [step] == seen
    assert step["event"] == "step" and step["loss"] == 0.5 and dict(step) == record  # reads like the JSON

    # A log line from an older run (no optional field) and one from a newer sdlora (an extra field) read.
    old = {"event": "done", "time": 1.0, "step": 4, "adapter": "a.safetensors", "loss": 0.1, "elapsed_s": 2.0}
    assert parse_event(old) == DoneEvent(time=1.0, step=4, adapter="a.safetensors", loss=0.1, elapsed_s=2.0)
    assert parse_event({**old, "new_field": 1}) == parse_event(old)
    assert parse_event({"event": "unknown"}) is None and parse_event({"event": "done"}) is None
    assert len(EVENT_TYPES) == 11 and "validation" in EVENT_TYPES and StartEvent.kind == "start"
