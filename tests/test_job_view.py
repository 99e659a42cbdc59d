"""What a page shows about a job: status line, progress, losses, samples and the jobs queued after it."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdlora.jobs import Job, JobStatus, eta_seconds, job_view, pending_names, smooth
from sdlora.train.events import EVENT_TYPES
from tests.conftest import train_config

START = dict(
    run="r",
    base="b",
    steps=4,
    start_step=0,
    images=1,
    class_images=0,
    resolution=16,
    buckets=["16x16"],
    mixed_precision="no",
    attention="AttnProcessor2_0",
    tf32=False,
    channels_last=False,
    compiled=False,
)


def job_with(events: list[tuple[str, dict]], status: JobStatus, blob_folder: Path, job_id: int = 1) -> Job:
    job = Job(job_id, train_config(blob_folder, "x", Path("out"), name=f"job{job_id}"), status)
    job.events.extend(EVENT_TYPES[kind](**fields) for kind, fields in events)
    return job


def running_and_queued(blob_folder: Path) -> tuple[Job, Job]:
    steps = [
        (
            "step",
            dict(
                step=s,
                total=4,
                loss=1.0 / s,
                lr=1e-3,
                elapsed_s=s * 2.0,
                eta_s=(4 - s) * 40.0,
                images_per_s=1.0,
            ),
        )
        for s in (1, 2)
    ]
    running = job_with(
        [("start", START), *steps, ("sample", dict(step=2, paths=["/s/2.png"]))],
        JobStatus.RUNNING,
        blob_folder,
    )
    return running, job_with([], JobStatus.QUEUED, blob_folder, job_id=2)


def test_the_job_view_shows_steps_loss_samples_and_the_queue(blob_folder):
    running, queued = running_and_queued(blob_folder)
    view = job_view(running, [running, queued])
    assert "step 2/4 · loss 0.5000" in view.status and "about 4 s left" in view.status  # 2 s a step
    assert "Queued after it: job 2 (job2)" in view.status and view.active
    assert (view.done, view.total) == (2, 4) and [loss for _, loss in view.losses] == [1.0, 0.5]
    assert view.samples == [("/s/2.png", "step 2")]


def test_pending_names_are_those_of_unfinished_jobs(blob_folder):
    running, queued = running_and_queued(blob_folder)
    done = job_with([], JobStatus.DONE, blob_folder, job_id=3)
    assert pending_names([running, queued, done]) == {"job1", "job2"}


def test_the_job_view_of_finished_jobs(blob_folder):
    failed = job_with([("start", START)], JobStatus.FAILED, blob_folder)
    failed.error = "TrainingError: the loss became nan"
    assert "failed: TrainingError: the loss became nan" in job_view(failed).status
    assert not job_view(failed).active
    starting = job_with([], JobStatus.RUNNING, blob_folder)
    assert "making class images" not in job_view(starting).status  # no class prompt in this job


def test_the_job_view_without_a_job():
    view = job_view(None)
    assert view.status == "No training job yet." and view.total == 0 and not view.active


def test_each_phase_is_shown_with_its_count_and_the_time_since_the_click(blob_folder):
    job = job_with([("phase", dict(phase="loading", run="r"))], JobStatus.RUNNING, blob_folder)
    job.submitted -= 75
    assert "loading the base model… · 1 min 15 s elapsed" in job_view(job).status
    job.events.append(EVENT_TYPES["phase"](phase="class_images", done=3, total=16))
    assert "making class images for prior preservation 3/16…" in job_view(job).status
    job.events.append(EVENT_TYPES["phase"](phase="caching"))
    assert "caching the images…" in job_view(job).status
    job.events.append(EVENT_TYPES["phase"](phase="samples", done=1, total=2))
    assert "drawing samples 1/2…" in job_view(job).status
    assert job.run_dir == Path("r")  # known from the first event, before the first step


def test_the_eta_follows_the_recent_step_time_not_the_slow_first_steps():
    def step(n: int, elapsed: float):
        return EVENT_TYPES["step"](
            step=n, total=100, loss=1.0, lr=1e-3, elapsed_s=elapsed, eta_s=0.0, images_per_s=1.0
        )

    steps = [step(1, 30.0)] + [step(n, 30.0 + (n - 1) * 1.0) for n in range(2, 51)]
    assert eta_seconds(steps) == pytest.approx(50.0, rel=0.01)  # 1 s a step, not (80 s / 50 steps)
    assert eta_seconds(steps[:1]) is None


def test_smoothing_starts_at_the_first_value_and_follows_the_trend():
    values = [1.0, 0.0] * 50
    smoothed = smooth(values)
    assert smoothed[0] == 1.0 and 0.4 < smoothed[-1] < 0.6 and len(smoothed) == len(values)
