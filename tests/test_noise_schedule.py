"""Zero terminal SNR and debiased estimation, checked against their closed forms."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from sdlora.train import TrainingError, train
from sdlora.train.loss import debiased_weight, training_scheduler
from tests.conftest import step_losses, train_config

BASE = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
}


def test_zero_terminal_snr_rescales_sqrt_alpha_bar_to_end_at_zero(tmp_path):
    config = train_config(tmp_path, "unused", tmp_path, zero_terminal_snr=True)
    scheduler = training_scheduler(config, {**BASE, "prediction_type": "v_prediction"})
    original = DDPMScheduler.from_config(BASE).alphas_cumprod.double().sqrt()
    # Lin et al. 2023, Algorithm 1: shift so the last is 0, scale so the first is unchanged.
    expected = (original - original[-1]) * original[0] / (original[0] - original[-1])
    rescaled = scheduler.alphas_cumprod.double().sqrt()
    assert rescaled[-1] < 1e-3 and abs(rescaled[0] - original[0]) < 1e-6
    torch.testing.assert_close(rescaled[:-1], expected[:-1], rtol=1e-4, atol=1e-6)
    # Left off, the base's schedule is used as it is.
    plain = training_scheduler(train_config(tmp_path, "unused", tmp_path), BASE)
    torch.testing.assert_close(plain.alphas_cumprod, DDPMScheduler.from_config(BASE).alphas_cumprod)


def test_zero_terminal_snr_refuses_an_epsilon_base_and_says_why(tiny_base, blob_folder, tmp_path):
    with pytest.raises(TrainingError, match="v-prediction"):
        train(train_config(blob_folder, tiny_base, tmp_path / "out", zero_terminal_snr=True))


def test_zero_terminal_snr_trains_a_v_prediction_base(tiny_vpred_base, blob_folder, tmp_path):
    result = train(train_config(blob_folder, tiny_vpred_base, tmp_path / "out", zero_terminal_snr=True))
    assert all(torch.isfinite(torch.tensor(step_losses(result))))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_debiased_weight_is_the_closed_form(prediction):
    scheduler = DDPMScheduler.from_config({**BASE, "prediction_type": prediction})
    timesteps = torch.tensor([0, 10, 500, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    snr = (alpha_bar / (1 - alpha_bar)).clamp(max=1000)
    expected = 1 / (snr + 1) if prediction == "v_prediction" else 1 / snr.sqrt()
    torch.testing.assert_close(debiased_weight(scheduler, timesteps).double(), expected, rtol=1e-4, atol=1e-7)


def test_debiased_estimation_trains(tiny_base, blob_folder, tmp_path):
    plain = step_losses(train(train_config(blob_folder, tiny_base, tmp_path / "a")))
    weighted = step_losses(
        train(train_config(blob_folder, tiny_base, tmp_path / "b", debiased_estimation=True))
    )
    assert all(torch.isfinite(torch.tensor(weighted))) and weighted[0] != plain[0]
