"""Validation loss: a seeded held-out split or a folder, measured with fixed draws (the same weights give the
same number), reported as events, and the checkpoint with the lowest loss kept and named."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdlora.config import ConfigError
from sdlora.data import scan_folder
from sdlora.train import TrainingError, read_events, train
from sdlora.train.validation import split_validation
from tests.conftest import draw_blob, step_losses, train_config


def test_the_split_is_seeded_and_keeps_training_images(blob_folder, tmp_path):
    items = scan_folder(blob_folder, "a photo of sks blob")
    config = train_config(blob_folder, "unused", tmp_path, validation_split=0.25)
    kept, held = split_validation(items, config)
    assert (
        len(held) == 1
        and len(kept) == 3
        and {i.path for i in kept} | {held[0].path} == {i.path for i in items}
    )
    assert split_validation(items, config) == (kept, held)
    with pytest.raises(TrainingError, match="holds out all"):
        split_validation(items[:1], train_config(blob_folder, "unused", tmp_path, validation_split=0.5))
    assert split_validation(items, train_config(blob_folder, "unused", tmp_path)) == (items, [])


def test_unchanged_weights_give_the_same_validation_loss_every_time(tiny_base, blob_folder, tmp_path):
    """At a vanishing learning rate the weights stay put: the training loss still varies with its random
    draws, the validation loss must not."""
    result = train(
        train_config(
            blob_folder,
            tiny_base,
            tmp_path / "out",
            steps=3,
            lr=1e-12,
            validation_split=0.25,
            validate_every=1,
        )
    )
    losses = [e["loss"] for e in read_events(result.run / "events.jsonl") if e["event"] == "validation"]
    assert len(losses) == 3 and max(losses) - min(losses) < 1e-6
    assert max(step_losses(result)) - min(step_losses(result)) > 1e-3


def test_the_best_checkpoint_is_kept_and_named(tiny_base, blob_folder, tmp_path):
    validation = tmp_path / "held"
    validation.mkdir()
    draw_blob(validation / "v.png", (32, 32), (210, 0, 190), caption="a photo of sks blob")
    config = train_config(
        blob_folder,
        tiny_base,
        tmp_path / "out",
        steps=6,
        lr=3e-3,
        save_every=2,
        keep_checkpoints=1,
        validation_dir=str(validation),
    )
    result = train(config)
    events = read_events(result.run / "events.jsonl")
    measured = {e["step"]: e["loss"] for e in events if e["event"] == "validation"}
    assert sorted(measured) == [2, 4, 6]
    best = min(measured, key=measured.get)
    done = next(e for e in events if e["event"] == "done")
    assert (
        Path(done["best_checkpoint"]).name == f"step-{best:06d}"
        and done["best_validation_loss"] == measured[best]
    )
    assert result.best_checkpoint.is_dir()  # kept even with --keep-checkpoints 1
    assert (result.run / "checkpoints" / "step-000006").is_dir()


@pytest.mark.parametrize(
    "change, option",
    [
        (dict(validation_split=1.0), "--validation-split"),
        (dict(validation_split=0.2, validation_dir="."), "--validation-dir"),
        (dict(validation_dir="/no/such/folder"), "--validation-dir"),
        (dict(validate_every=-1), "--validate-every"),
    ],
)
def test_bad_validation_options_are_named(change, option, blob_folder, tmp_path):
    with pytest.raises(ConfigError, match=option):
        train_config(blob_folder, "unused", tmp_path, **change).validate()
