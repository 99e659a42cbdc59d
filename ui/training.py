"""The Train tab's logic: presets, turning the form into a `TrainConfig`, and showing a job's events.

A job's state lives in the library's `JobQueue`, never in a browser session, so any page (a reloaded one,
a second tab) renders the same progress from `job_view`.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sdlora.config import ConfigError, TrainConfig
from sdlora.jobs import Job, JobStatus
from ui.library import unique_name
from ui.uploads import caption_rows


@dataclass
class TrainForm:
    """The Train tab's fields, in the order the page passes them (`FORM_FIELDS`)."""

    folder: str | None
    name: str
    prompt: str
    class_prompt: str
    prior: bool
    num_class_images: float
    rank: float
    alpha: float
    steps: float
    lr: float
    resolution: float
    text_encoder: bool
    seed: float
    sample_every: float


FORM_FIELDS = tuple(f.name for f in dataclasses.fields(TrainForm))

# Settings a preset fills in; prompts and names stay the user's own.
PRESETS: dict[str, dict[str, object]] = {
    "Subject": dict(
        prior=True,
        num_class_images=50,
        rank=8,
        alpha=8,
        steps=400,
        lr=1e-4,
        text_encoder=False,
        sample_every=100,
    ),
    "Style": dict(
        prior=False,
        num_class_images=50,
        rank=16,
        alpha=16,
        steps=1000,
        lr=1e-4,
        text_encoder=False,
        sample_every=200,
    ),
    "Quick test": dict(
        prior=False,
        num_class_images=4,
        rank=4,
        alpha=4,
        steps=20,
        lr=1e-3,
        text_encoder=False,
        sample_every=10,
    ),
}
# The bundled demo model is tiny (32 px): it learns in a few hundred steps at a higher rate, and its
# class images are quick to make, so fewer are needed.
DEMO_LIMITS = dict(steps=300, num_class_images=16)
DEMO_MIN_LR = 1e-3


def preset_values(preset: str, demo: bool) -> dict[str, object]:
    """A preset's settings, scaled down for the demo model."""
    values = dict(PRESETS[preset])
    if demo:
        for key, limit in DEMO_LIMITS.items():
            values[key] = min(values[key], limit)
        values["lr"] = max(values["lr"], DEMO_MIN_LR)
    return values


def make_config(
    form: TrainForm, base: str | None, outputs: str | Path, taken: Iterable[str] = ()
) -> TrainConfig:
    """The TrainConfig for a form; ConfigError says in the page's words what is missing or wrong."""
    rows = caption_rows(form.folder)
    if not rows:
        raise ConfigError("No training images yet: drop a folder of images or a .zip first.")
    prompt = " ".join((form.prompt or "").split())
    uncaptioned = [name for name, caption in rows if not caption]
    if uncaptioned and not prompt:
        raise ConfigError(
            f"{len(uncaptioned)} image(s) have no caption (e.g. {uncaptioned[0]}): write captions "
            "in the table or fill in the instance prompt."
        )
    class_prompt = " ".join((form.class_prompt or "").split())
    if form.prior and not class_prompt:
        raise ConfigError(
            "Prior preservation needs a class prompt (e.g. 'a photo of a dog'), or turn it off."
        )
    sample_prompt = prompt or rows[0][1]
    config = TrainConfig(
        data_dir=str(form.folder),
        prompt=prompt or None,
        base=base,
        name=unique_name(outputs, form.name or Path(str(form.folder)).name, taken),
        class_prompt=class_prompt if form.prior else None,
        num_class_images=int(form.num_class_images),
        rank=int(form.rank),
        alpha=float(form.alpha) or None,
        steps=int(form.steps),
        lr=float(form.lr),
        resolution=int(form.resolution) or None,
        text_encoder=bool(form.text_encoder),
        seed=int(form.seed),
        sample_every=int(form.sample_every),
        sample_prompt=[sample_prompt] if form.sample_every else [],
        outputs=str(outputs),
    )
    config.validate()
    return config


def pending_names(jobs: Iterable[Job]) -> set[str]:
    """Adapter names that queued or running jobs will write, so a new job doesn't pick the same one."""
    return {job.config.name for job in jobs if not job.finished and job.config.name}


@dataclass
class JobView:
    """What the page shows about a job."""

    status: str
    progress: str
    loss: pd.DataFrame
    samples: list[tuple[str, str]]
    active: bool


def job_view(job: Job | None, jobs: Iterable[Job] = ()) -> JobView:
    """Status text, progress bar, loss curve and samples of `job` (the queue's current one)."""
    if job is None:
        return JobView("No training job yet.", "", loss_frame([]), [], False)
    step = job.last("step")
    done, total = (step["step"], step["total"]) if step else (0, job.config.steps)
    title = f"**Job {job.id} · {job.config.name}**"
    status = f"{title} · {_status_line(job, step)}"
    waiting = [j for j in jobs if j.status is JobStatus.QUEUED and j.id != job.id]
    if waiting:
        status += "  \nQueued after it: " + ", ".join(f"job {j.id} ({j.config.name})" for j in waiting)
    samples = [
        (path, f"step {event['step']}")
        for event in job.events
        if event["event"] == "sample"
        for path in event["paths"]
    ]
    return JobView(
        status, _bar(done, total), loss_frame(job.events), samples[::-1], not job.finished or bool(waiting)
    )


def _status_line(job: Job, step: dict | None) -> str:
    if job.status is JobStatus.QUEUED:
        return "queued: it starts when the job before it ends."
    if job.status is JobStatus.FAILED:
        return f"failed: {job.error}"
    if job.status is JobStatus.CANCELLED:
        return f"cancelled after {step['step'] if step else 0} steps."
    if job.status is JobStatus.DONE:
        adapter = job.result.adapter if job.result else "?"
        return f"done in {_duration(job.last('done')['elapsed_s'])}: saved `{adapter}`; it is in the Generate tab."
    if step is None:
        preparing = "making class images for prior preservation, " if job.config.prior_preservation else ""
        return f"starting: loading the base model, {preparing}caching the images…"
    return (
        f"step {step['step']}/{step['total']} · loss {step['loss']:.4f} · "
        f"{_duration(step['elapsed_s'])} elapsed · about {_duration(step['eta_s'])} left"
    )


def loss_frame(events: Iterable[dict]) -> pd.DataFrame:
    steps = [e for e in events if e["event"] == "step"]
    return pd.DataFrame({"step": [e["step"] for e in steps], "loss": [e["loss"] for e in steps]})


def _bar(done: int, total: int) -> str:
    percent = 100 * done / max(total, 1)
    return (
        f'<div class="sdlora-progress"><progress max="{total}" value="{done}"></progress>'
        f"<span>{html.escape(f'{done}/{total} steps ({percent:.0f}%)')}</span></div>"
    )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"
