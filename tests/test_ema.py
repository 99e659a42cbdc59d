"""EMA of the adapter weights: swapped in for evaluation and back, written as the adapter, and resumed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sdlora.adapters import read_adapter
from sdlora.config import ConfigError
from sdlora.train import train
from sdlora.train.ema import ema_weights, make_ema
from tests.conftest import train_config


def test_ema_weights_are_swapped_in_and_the_trained_ones_restored(tmp_path):
    param = torch.nn.Parameter(torch.zeros(3))
    ema = make_ema(train_config(tmp_path, "unused", tmp_path, ema=True, ema_decay=0.5), [param])
    for value in (1.0, 2.0, 3.0):  # decay 0 (start at the weights), then min(0.5, 2/11), min(0.5, 3/12)
        param.data.fill_(value)
        ema.step([param])
    expected = (1.0 * 2 / 11 + 2.0 * 9 / 11) * 0.25 + 3.0 * 0.75  # decay d keeps d of the average
    with ema_weights(ema, [param]):
        torch.testing.assert_close(param.data, torch.full((3,), expected))
    torch.testing.assert_close(param.data, torch.full((3,), 3.0))
    assert make_ema(train_config(tmp_path, "unused", tmp_path), [param]) is None


def test_the_adapter_holds_the_average_and_resume_restores_it(tiny_base, blob_folder, tmp_path):
    common = dict(steps=6, save_every=2, lr=3e-3, ema=True, ema_decay=0.9)
    straight = train(train_config(blob_folder, tiny_base, tmp_path / "a", **common))
    outputs = tmp_path / "b"
    train(train_config(blob_folder, tiny_base, outputs, **{**common, "steps": 4}))
    resumed = train(train_config(blob_folder, tiny_base, outputs, resume="latest", **common))
    a, b = read_adapter(straight.adapter)[0], read_adapter(resumed.adapter)[0]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)

    # The checkpoint keeps the trained weights (for resuming) and the average beside them.
    last = straight.run / "checkpoints" / "step-000006"
    assert (last / "ema.safetensors").is_file()
    raw = load_file(last / "lora.safetensors")
    raw_up = sum(v.abs().sum() for k, v in raw.items() if "lora_B" in k)
    ema_up = sum(v.abs().sum() for k, v in a.items() if "lora_up" in k)
    assert 0 < ema_up < raw_up  # the average lags the trained weights, which grow from zero


@pytest.mark.parametrize(
    "change, option",
    [(dict(ema_decay=1.0), "--ema-decay"), (dict(ema=True, optimizer="adamw-schedulefree"), "--ema")],
)
def test_bad_ema_options_are_named(change, option, blob_folder, tmp_path):
    with pytest.raises(ConfigError, match=option):
        train_config(blob_folder, "unused", tmp_path, **change).validate()
