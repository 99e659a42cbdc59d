"""The training queue: one job at a time, in order; cancel stops a job and keeps a checkpoint."""

from __future__ import annotations

import time

import pytest

from sdlora.config import ConfigError
from sdlora.jobs import JobQueue, JobStatus
from sdlora.train.launch import train_distributed
from tests.conftest import train_config


def test_jobs_run_one_at_a_time_in_order(tiny_base, blob_folder, tmp_path):
    queue = JobQueue()
    first = queue.submit(train_config(blob_folder, tiny_base, tmp_path / "a", steps=3, name="first"))
    second = queue.submit(train_config(blob_folder, tiny_base, tmp_path / "b", steps=2, name="second"))
    queue.wait(second.id, timeout=300)
    assert first.status is JobStatus.DONE and second.status is JobStatus.DONE
    assert first.last("done")["time"] <= second.last("start")["time"]  # never interleaved
    assert second.result.adapter.is_file() and first.run_dir.is_dir()


def test_cancel_keeps_a_resumable_checkpoint(tiny_base, blob_folder, tmp_path):
    queue = JobQueue()
    job = queue.submit(train_config(blob_folder, tiny_base, tmp_path / "a", steps=10_000))
    while job.last("step") is None and not job.finished:
        time.sleep(0.05)
    queue.cancel(job.id)
    queue.wait(job.id, timeout=120)
    assert job.status is JobStatus.CANCELLED
    assert job.last("checkpoint") is not None and not job.result.adapter.exists()
    with pytest.raises(ConfigError, match="resumed"):
        queue.resume(queue.submit(train_config(blob_folder, tiny_base, tmp_path / "b", steps=1)).id)

    # Resume continues from the cancelled step, in the same run folder, to the end.
    job.config.steps = job.last("cancelled")["step"] + 2
    resumed = queue.resume(job.id)
    queue.wait(resumed.id, timeout=120)
    assert resumed.status is JobStatus.DONE and resumed.run_dir == job.run_dir
    assert resumed.last("start")["start_step"] == job.last("cancelled")["step"]


def test_a_job_cancelled_before_it_started_cannot_be_resumed(tiny_base, blob_folder, tmp_path):
    queue = JobQueue()
    running = queue.submit(train_config(blob_folder, tiny_base, tmp_path / "a", steps=10_000))
    waiting = queue.submit(train_config(blob_folder, tiny_base, tmp_path / "b", steps=2))
    queue.cancel(waiting.id)
    assert waiting.status is JobStatus.CANCELLED and waiting.run_dir is None
    with pytest.raises(ConfigError, match="resumed"):
        queue.resume(waiting.id)
    queue.cancel(running.id)
    queue.wait(running.id, timeout=120)


def test_bad_options_are_refused_at_submit(blob_folder, tmp_path):
    with pytest.raises(ConfigError, match="--rank"):
        JobQueue().submit(train_config(blob_folder, "x", tmp_path, rank=0))


def test_a_job_can_run_on_several_processes_and_be_cancelled(tiny_base, blob_folder, tmp_path):
    """What the app does when several GPUs are visible, here with 2 CPU processes (gloo)."""
    queue = JobQueue()
    job = queue.submit(train_config(blob_folder, tiny_base, tmp_path / "a", steps=3, name="two"), processes=2)
    queue.wait(job.id, timeout=300)
    assert job.status is JobStatus.DONE, job.error
    assert [e["step"] for e in job.events if e["event"] == "step"] == [1, 2, 3]  # the main process's stream
    assert job.result.adapter.is_file() and len(list((tmp_path / "a" / "runs").iterdir())) == 1

    long = queue.submit(
        train_config(blob_folder, tiny_base, tmp_path / "b", steps=10_000, name="long"), processes=2
    )
    while long.last("step") is None and not long.finished:
        time.sleep(0.05)
    queue.cancel(long.id)
    queue.wait(long.id, timeout=300)
    assert long.status is JobStatus.CANCELLED and long.last("checkpoint") is not None

    # `--resume latest` under several processes: the launcher follows the resumed run's new events only.
    cancelled_at = long.last("cancelled")["step"]
    config = train_config(
        blob_folder, tiny_base, tmp_path / "b", steps=cancelled_at + 1, name="long", resume="latest"
    )
    events: list[dict] = []
    result = train_distributed(config, 2, on_event=events.append)
    assert result.run == long.run_dir and result.steps == cancelled_at + 1 and not result.cancelled
    assert events[0]["event"] == "phase" and events[0]["phase"] == "loading"  # the resumed run's new events
    start = next(e for e in events if e["event"] == "start")
    assert start["start_step"] == cancelled_at
    assert [e["step"] for e in events if e["event"] == "step"] == [cancelled_at + 1]
