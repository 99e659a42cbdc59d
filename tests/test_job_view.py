"""What a page shows about a job: status line, progress, losses, samples and the jobs queued after it."""

from __future__ import annotations

from pathlib import Path

from sdlora.jobs import Job, JobStatus, job_view, pending_names
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
    assert "step 2/4 · loss 0.5000" in view.status and "1 min 20 s left" in view.status
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
