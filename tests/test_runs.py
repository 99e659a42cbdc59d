"""Every run kept and reachable: states read from run folders, resume after a restart, checkpoints to adapters."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdlora.adapters import read_lora
from sdlora.config import ConfigError
from sdlora.jobs import JobQueue, JobStatus, loss_curves
from sdlora.outputs import Outputs
from sdlora.train import read_events, train
from sdlora.train.runs import (
    RunFolder,
    RunState,
    checkpoint_adapter,
    list_runs,
    run_info,
    run_row,
    run_summary,
    sample_grid,
)
from tests.conftest import train_config


def test_a_finished_run_is_done_with_its_losses_samples_checkpoints_and_adapter(
    tiny_base, blob_folder, tmp_path
):
    config = train_config(
        blob_folder, tiny_base, tmp_path, steps=4, save_every=2, sample_every=2, sample_prompt=["a", "b"]
    )
    result = train(config)
    (info,) = list_runs(Outputs(tmp_path))
    assert (info.state, info.step, info.total, info.adapter) == (RunState.DONE, 4, 4, result.adapter)
    assert [step for step, _ in info.losses] == [1, 2, 3, 4] and not info.resumable
    assert [c.name for c in info.checkpoints] == ["step-000002", "step-000004"]
    cells, columns = sample_grid(info)
    assert columns == 2 and [caption for _, caption in cells] == [
        "step 2 · a",
        "step 4 · a",
        "step 2 · b",
        "step 4 · b",
    ]
    assert run_row(info)[1:] == ["done", "4/4", "2", "", result.adapter.name]  # no validation: no best
    assert not info.folder.owner_file.exists()  # the process is done with it


def test_a_run_whose_process_died_is_interrupted_and_resumes_after_a_restart(
    tiny_base, blob_folder, tmp_path
):
    result = train(train_config(blob_folder, tiny_base, tmp_path, steps=3, save_every=2))
    run = RunFolder(result.run)
    # As a kill -9 after step 3's checkpoint would leave it: no ending event, a marker of a dead process.
    lines = run.events.read_text().splitlines()
    run.events.write_text("\n".join(line for line in lines if '"event": "done"' not in line) + "\n")
    run.owner_file.write_text(json.dumps({"pid": 2**22 + 12345, "host": __import__("socket").gethostname()}))
    info = run_info(run.path)
    assert info.state is RunState.INTERRUPTED and info.resumable

    restarted = JobQueue()  # a new server knows no jobs, only the run folders
    job = restarted.resume_run(run.path)
    with pytest.raises(ConfigError, match="already running or queued"):
        restarted.resume_run(run.path)
    restarted.wait(job.id, timeout=120)
    assert job.status is JobStatus.DONE and job.run_dir == run.path
    assert run_info(run.path).state is RunState.DONE


def test_a_cancelled_run_is_cancelled_and_a_running_one_is_running(tiny_base, blob_folder, tmp_path):
    queue = JobQueue()
    job = queue.submit(train_config(blob_folder, tiny_base, tmp_path, steps=10_000, name="long"))
    while job.last("step") is None and not job.finished:
        time.sleep(0.05)
    (info,) = list_runs(Outputs(tmp_path))
    assert info.state is RunState.RUNNING and queue.job_for_run(info.folder.path) is job
    queue.cancel_run(info.folder.path)
    queue.wait(job.id, timeout=120)
    info = run_info(info.folder.path)
    assert info.state is RunState.CANCELLED and info.resumable
    with pytest.raises(ConfigError, match="not running"):
        queue.cancel_run(info.folder.path)


def test_a_done_run_is_not_resumed_and_a_failed_one_without_checkpoint_says_why(tmp_path):
    run = RunFolder(Outputs(tmp_path).new_run_dir("broken"))
    run.events.write_text(json.dumps({"event": "error", "time": 1.0, "message": "OSError: disk full"}) + "\n")
    info = run_info(run.path)
    assert (info.state, info.error, info.resumable) == (RunState.FAILED, "OSError: disk full", False)
    with pytest.raises(ConfigError, match="no checkpoint"):
        JobQueue().resume_run(run.path)


def test_any_checkpoint_becomes_a_kohya_adapter(tiny_base, blob_folder, tmp_path):
    result = train(train_config(blob_folder, tiny_base, tmp_path, steps=4, save_every=2, name="stars"))
    info = run_info(result.run)
    made = checkpoint_adapter(info.folder, info.checkpoints[0], Outputs(tmp_path))
    assert made == Outputs(tmp_path).adapters / "stars_step2.safetensors"
    with safe_open(made, "pt") as adapter, safe_open(result.adapter, "pt") as final:
        assert set(adapter.keys()) == set(final.keys())  # the same layers as the finished adapter
        assert adapter.metadata()["ss_steps"] == "2"
    with pytest.raises(ConfigError, match="not a checkpoint"):
        checkpoint_adapter(info.folder, tmp_path, Outputs(tmp_path))


@pytest.mark.parametrize(
    "options",
    [
        dict(network="locon", conv_rank=2),
        dict(network="loha"),
        dict(network="lokr"),
        dict(dora=True),
        dict(rslora=True, alpha=8.0),
        dict(ema=True, ema_decay=0.5),
    ],
    ids=["locon", "loha", "lokr", "dora", "rslora", "ema"],
)
def test_the_last_checkpoint_becomes_the_adapter_the_run_wrote(options, tiny_base, blob_folder, tmp_path):
    """Every network type (and the EMA's average) comes out of a checkpoint as the trainer writes it."""
    config = train_config(blob_folder, tiny_base, tmp_path, steps=3, save_every=3, lr=3e-3, **options)
    result = train(config)
    info = run_info(result.run)
    made = checkpoint_adapter(info.folder, info.checkpoints[-1], Outputs(tmp_path))
    final, rebuilt = load_file(result.adapter), load_file(made)
    assert set(rebuilt) == set(final)
    for key, tensor in final.items():
        torch.testing.assert_close(rebuilt[key], tensor, rtol=1e-5, atol=1e-7, msg=key)
    assert read_lora(made).facts.network == config.network


def test_the_best_checkpoint_is_named_and_its_losses_are_charted(tiny_base, blob_folder, tmp_path):
    config = train_config(
        blob_folder, tiny_base, tmp_path, steps=6, save_every=2, lr=3e-3, validation_split=0.25, name="v"
    )
    result = train(config)
    info = run_info(result.run)
    validation = {e["step"]: e["loss"] for e in read_events(info.folder.events) if e["event"] == "validation"}
    assert info.validation_losses == sorted(validation.items()) and [*validation] == [2, 4, 6]
    best_step = min(validation, key=lambda step: (validation[step], step))
    assert info.best_checkpoint == info.folder.checkpoints / f"step-{best_step:06d}"
    assert info.best_checkpoint == result.best_checkpoint  # what the trainer said at the end
    assert run_row(info)[4] == info.best_checkpoint.name
    assert f"best: {info.best_checkpoint.name} (validation loss {validation[best_step]:.4f})" in run_summary(
        info
    )
    curves = loss_curves(info.losses, info.validation_losses)
    assert [(step, loss) for step, loss, curve in curves if curve == "validation"] == sorted(
        validation.items()
    )


def test_runs_are_listed_newest_first_whatever_their_names(tmp_path):
    outputs = Outputs(tmp_path)
    for name in ("zebra-20260101-000000", "apple-20260102-000000", "apple-20260102-000000-2"):
        (outputs.runs / name).mkdir(parents=True)
    assert [info.folder.path.name for info in list_runs(outputs)] == [
        "apple-20260102-000000-2",
        "apple-20260102-000000",
        "zebra-20260101-000000",
    ]
