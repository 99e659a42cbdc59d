"""Caption options: another caption extension, tag shuffling with kept leading tags, caption dropout, and
the warning when no caption file matches the extension."""

from __future__ import annotations

import pytest
import torch

from sdlora.config import ConfigError
from sdlora.data import missing_captions, scan_folder
from sdlora.train import read_events, train
from sdlora.train.captions import caption_variant, varies_captions
from tests.conftest import draw_blob, step_losses, train_config

CAPTION = "sks, blob, purple, round, white background"


def test_shuffling_keeps_the_leading_tags_and_permutes_the_rest(tmp_path):
    config = train_config(tmp_path, "unused", tmp_path, shuffle_tags=True, keep_tokens=1)
    rng = torch.Generator().manual_seed(0)
    variants = {caption_variant(CAPTION, config, rng) for _ in range(40)}
    assert len(variants) > 5
    for variant in variants:
        tags = variant.split(", ")
        assert tags[0] == "sks" and sorted(tags) == sorted(CAPTION.split(", "))
    again = torch.Generator().manual_seed(0)
    assert caption_variant(CAPTION, config, again) == caption_variant(
        CAPTION, config, torch.Generator().manual_seed(0)
    )


def test_dropout_empties_about_its_share_and_off_draws_nothing(tmp_path):
    config = train_config(tmp_path, "unused", tmp_path, caption_dropout=0.25)
    rng = torch.Generator().manual_seed(1)
    empty = sum(caption_variant(CAPTION, config, rng) == "" for _ in range(2000))
    assert 400 < empty < 600
    plain = train_config(tmp_path, "unused", tmp_path)
    assert not varies_captions(plain)
    rng = torch.Generator().manual_seed(2)
    state = rng.get_state()
    assert caption_variant(CAPTION, plain, rng) == CAPTION and torch.equal(rng.get_state(), state)


def test_caption_extension_and_the_warning_when_none_matches(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(2):
        draw_blob(folder / f"{i}.png", (16, 16), (200, 0, 200))
        (folder / f"{i}.caption").write_text(f"sks blob {i}")
    assert [i.caption for i in scan_folder(folder, "fallback", caption_extension=".caption")] == [
        "sks blob 0",
        "sks blob 1",
    ]
    items = scan_folder(folder, "fallback")
    assert [i.caption for i in items] == ["fallback", "fallback"]
    (warning,) = missing_captions(items, ".txt")
    assert "No .txt caption" in warning and "--caption-extension .caption" in warning
    assert missing_captions(scan_folder(folder, None, caption_extension=".caption"), ".caption") == []


def test_a_run_with_varied_captions_trains_and_warns_about_unmatched_captions(tiny_base, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        draw_blob(folder / f"{i}.png", (16, 16), (200, 0, 200))
        (folder / f"{i}.caption").write_text("sks, blob, purple, round")
    config = train_config(
        folder, tiny_base, tmp_path / "out", shuffle_tags=True, keep_tokens=1, caption_dropout=0.2
    )
    with pytest.warns(UserWarning, match="caption-extension .caption"):
        result = train(config)
    assert all(torch.isfinite(torch.tensor(step_losses(result))))
    assert any(e["event"] == "warning" for e in read_events(result.run / "events.jsonl"))

    quiet = train(
        train_config(folder, tiny_base, tmp_path / "out2", caption_extension=".caption", shuffle_tags=True)
    )
    assert not any(e["event"] == "warning" for e in read_events(quiet.run / "events.jsonl"))


@pytest.mark.parametrize(
    "change, option",
    [
        (dict(caption_extension="txt"), "--caption-extension"),
        (dict(keep_tokens=1), "--keep-tokens"),
        (dict(caption_dropout=1.0), "--caption-dropout"),
    ],
)
def test_bad_caption_options_are_named(change, option, blob_folder, tmp_path):
    with pytest.raises(ConfigError, match=option):
        train_config(blob_folder, "unused", tmp_path, **change).validate()
