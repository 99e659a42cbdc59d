"""Optimizers and LoRA+: each trains, LoRA+ gives B its own learning rate, schedule-free saves, samples
and resumes on its evaluation weights, and a missing optional package says how to install it."""

from __future__ import annotations

import sys

import pytest
import torch

from sdlora.adapters import read_adapter
from sdlora.config import ConfigError
from sdlora.train import TrainingError, read_events, train
from sdlora.train.optimizers import evaluation_weights, make_optimizer, param_groups
from tests.conftest import step_losses, train_config


def _toy() -> torch.nn.Module:
    model = torch.nn.Module()
    model.lora_A = torch.nn.Linear(4, 2)
    model.lora_B = torch.nn.Linear(2, 4)
    return torch.nn.ModuleDict(
        {"layer": torch.nn.ModuleDict({"lora_A": model.lora_A, "lora_B": model.lora_B})}
    )


def test_loraplus_puts_the_b_matrices_in_a_group_at_ratio_times_the_lr(tmp_path):
    config = train_config(tmp_path, "unused", tmp_path, lr=1e-4, loraplus_ratio=16, text_encoder_lr=5e-5)
    groups = param_groups(config, {"unet": _toy(), "text_encoder": _toy()})
    assert [(len(g["params"]), g["lr"]) for g in groups] == [(2, 1e-4), (2, 1.6e-3), (2, 5e-5), (2, 8e-4)]
    plain = param_groups(train_config(tmp_path, "unused", tmp_path, lr=1e-4), {"unet": _toy()})
    assert [(len(g["params"]), g["lr"]) for g in plain] == [(4, 1e-4)]


@pytest.mark.parametrize(
    "options",
    [
        dict(optimizer="adamw", loraplus_ratio=16),
        dict(optimizer="prodigy", lr=1.0),
        dict(optimizer="adafactor", lr=1e-3),
        dict(optimizer="adamw-schedulefree", lr=3e-3, warmup_steps=2),
    ],
    ids=lambda o: o["optimizer"] + ("+loraplus" if "loraplus_ratio" in o else ""),
)
def test_each_optimizer_trains(options, tiny_base, blob_folder, tmp_path):
    result = train(train_config(blob_folder, tiny_base, tmp_path / "out", steps=4, **options))
    assert all(torch.isfinite(torch.tensor(step_losses(result))))
    tensors = read_adapter(result.adapter)[0]
    learned = torch.cat([v.flatten() for k, v in tensors.items() if "lora_up" in k])
    assert learned.abs().max() > 0, "the B matrices start at zero; training should move them"


def test_schedulefree_evaluation_weights_switch_in_and_back_exactly():
    pytest.importorskip("schedulefree")
    config = train_config(".", "unused", ".", optimizer="adamw-schedulefree", lr=0.1)
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = make_optimizer(config, [{"params": [param], "lr": 0.1}], torch.device("cpu"))
    for _ in range(3):
        param.grad = torch.tensor([1.0, -1.0, 0.5])
        optimizer.step()
    training = param.detach().clone()
    with evaluation_weights(optimizer):
        averaged = param.detach().clone()
    assert not torch.equal(averaged, training)  # the evaluation weights are the average, not the iterate
    torch.testing.assert_close(param.detach(), training)


def test_schedulefree_resume_matches_an_uninterrupted_run(tiny_base, blob_folder, tmp_path):
    pytest.importorskip("schedulefree")
    common = dict(steps=6, save_every=2, optimizer="adamw-schedulefree", lr=3e-3)
    straight = train(train_config(blob_folder, tiny_base, tmp_path / "a", **common))
    outputs = tmp_path / "b"
    train(train_config(blob_folder, tiny_base, outputs, **{**common, "steps": 4}))
    resumed = train(train_config(blob_folder, tiny_base, outputs, resume="latest", **common))
    assert [e["start_step"] for e in read_events(resumed.run / "events.jsonl") if e["event"] == "start"] == [
        0,
        4,
    ]
    a, b = read_adapter(straight.adapter)[0], read_adapter(resumed.adapter)[0]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_a_missing_optional_optimizer_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # makes `import prodigyopt` fail
    config = train_config(tmp_path, "unused", tmp_path, optimizer="prodigy", lr=1.0)
    with pytest.raises(TrainingError, match=r"pip install 'sdlora\[optim\]'"):
        make_optimizer(config, [{"params": [torch.nn.Parameter(torch.ones(1))]}], torch.device("cpu"))


def test_adamw8bit_on_the_cpu_says_it_needs_cuda(tmp_path):
    config = train_config(tmp_path, "unused", tmp_path, optimizer="adamw8bit")
    with pytest.raises(TrainingError, match="CUDA"):
        make_optimizer(config, [{"params": [torch.nn.Parameter(torch.ones(1))]}], torch.device("cpu"))


@pytest.mark.parametrize(
    "change, option",
    [
        (dict(optimizer="prodigy"), "--lr 1"),
        (dict(optimizer="adamw-schedulefree", lr_scheduler="cosine"), "--lr-scheduler constant"),
        (dict(loraplus_ratio=0), "--loraplus-ratio"),
        (dict(loraplus_ratio=16, network="loha"), "--loraplus-ratio"),
        (dict(optimizer="sgd"), "--optimizer"),
    ],
)
def test_bad_optimizer_options_are_named(change, option, blob_folder, tmp_path):
    with pytest.raises(ConfigError, match=option):
        train_config(blob_folder, "unused", tmp_path, **change).validate()
