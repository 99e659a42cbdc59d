"""--log-with tensorboard: accelerate's tracker writes the run's numbers and samples into the run folder,
the same numbers events.jsonl records."""

from __future__ import annotations

import importlib.util

import pytest

from sdlora.config import ConfigError
from sdlora.train import TrainingError, read_events, train
from tests.conftest import train_config

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator", reason="pip install 'sdlora[log]'"
)


def test_tensorboard_holds_the_losses_lr_grad_norm_and_samples(blob_folder, tiny_base, tmp_path):
    config = train_config(
        blob_folder,
        tiny_base,
        tmp_path / "out",
        steps=4,
        log_with="tensorboard",
        validation_split=0.25,
        validate_every=2,
        sample_prompt=["a photo of sks blob"],
        sample_every=4,
    )
    result = train(config)
    events = read_events(result.run / "events.jsonl")
    steps = [e for e in events if e["event"] == "step"]
    validations = [e for e in events if e["event"] == "validation"]

    assert list(result.run.glob("events.out.tfevents.*")), "no TensorBoard event file in the run folder"
    board = event_accumulator.EventAccumulator(str(result.run), size_guidance={"images": 0})
    board.Reload()
    scalars = {tag: [(s.step, s.value) for s in board.Scalars(tag)] for tag in board.Tags()["scalars"]}

    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([e["loss"] for e in steps], rel=1e-6)
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([e["lr"] for e in steps], rel=1e-6)
    assert [v for _, v in scalars["train/grad_norm"]] == pytest.approx([e["grad_norm"] for e in steps])
    assert all(v > 0 for _, v in scalars["train/grad_norm"])
    assert [step for step, _ in scalars["validation/loss"]] == [e["step"] for e in validations] == [2, 4]
    assert [v for _, v in scalars["validation/loss"]] == pytest.approx([e["loss"] for e in validations])
    images = board.Images(board.Tags()["images"][0])
    assert [image.step for image in images] == [4]
    assert images[0].width == images[0].height > 0


def test_missing_tensorboard_says_what_to_install(blob_folder, tiny_base, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    config = train_config(blob_folder, tiny_base, tmp_path / "out", log_with="tensorboard")
    with pytest.raises(TrainingError, match=r"pip install 'sdlora\[log\]'"):
        train(config)
    assert not (tmp_path / "out" / "runs").exists() or not any((tmp_path / "out" / "runs").iterdir())


def test_an_unknown_tracker_is_named(tmp_path):
    with pytest.raises(ConfigError, match="--log-with"):
        train_config(tmp_path, "unused", tmp_path / "out", log_with="wandb").validate()
