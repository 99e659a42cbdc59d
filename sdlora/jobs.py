"""A training queue that both faces submit to: one job runs at a time in the background, the rest wait.

A job's state lives here, not in a browser session, so a reloaded page (or a second one) sees the
running job, its events and its result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TypeVar, overload

from sdlora.config import ConfigError, TrainConfig
from sdlora.data.uploads import clean_uploads
from sdlora.errors import describe
from sdlora.outputs import Outputs
from sdlora.train import TrainResult, train
from sdlora.train.events import (
    EVENT_TYPES,
    CancelledEvent,
    DoneEvent,
    Event,
    PhaseEvent,
    SampleEvent,
    StartEvent,
    StepEvent,
    ValidationEvent,
)
from sdlora.train.launch import train_distributed
from sdlora.train.runs import RunFolder, RunState, run_config, run_info, settings_lines

E = TypeVar("E", bound=Event)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class Job:
    id: int
    config: TrainConfig
    status: JobStatus = JobStatus.QUEUED
    events: list[Event] = field(default_factory=list)
    result: TrainResult | None = None
    error: str | None = None
    submitted: float = field(default_factory=time.time)
    processes: int = 1  # data-parallel processes (GPUs); more than one runs under torchrun
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self.status in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)

    @property
    def run_dir(self) -> Path | None:
        """The job's run folder: the one it resumes, else the one its first event names (None before)."""
        if self.config.resume and self.config.resume != "latest":
            return Path(self.config.resume)
        named = next((e for e in self.events if isinstance(e, (PhaseEvent, StartEvent)) and e.run), None)
        return Path(named.run) if named else None

    @overload
    def last(self, kind: type[E]) -> E | None: ...
    @overload
    def last(self, kind: str) -> Event | None: ...
    def last(self, kind: type[Event] | str) -> Event | None:
        """The newest event of a kind (`StepEvent`, or by its name, 'step'), or None."""
        cls = EVENT_TYPES[kind] if isinstance(kind, str) else kind
        return next((e for e in reversed(self.events) if isinstance(e, cls)), None)


class JobQueue:
    """Runs submitted training jobs one after another on a single worker thread."""

    def __init__(self) -> None:
        self._jobs: dict[int, Job] = {}
        self._waiting: deque[Job] = deque()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._worker = threading.Thread(target=self._work, name="sdlora-trainer", daemon=True)
        self._worker.start()

    def submit(self, config: TrainConfig, processes: int = 1) -> Job:
        """Check the config now (so the caller sees bad options at once) and queue the job."""
        config.validate()
        if processes < 1:
            raise ConfigError("processes must be at least 1.")
        with self._wake:
            job = Job(next(self._ids), config, processes=processes)
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._wake.notify()
        return job

    def cancel(self, job_id: int) -> None:
        """A queued job is dropped; a running one stops after its current step and keeps a checkpoint."""
        with self._lock:
            job = self._jobs[job_id]
            if job.status is JobStatus.QUEUED:
                self._waiting.remove(job)
                job.status = JobStatus.CANCELLED
            job.cancel_requested.set()

    def resume(self, job_id: int) -> Job:
        """Queue a new job that continues a cancelled or failed one from its newest checkpoint."""
        job = self._jobs.get(job_id)
        if (
            job is None
            or job.status not in (JobStatus.CANCELLED, JobStatus.FAILED)
            or job.run_dir is None
            or RunFolder(job.run_dir).latest_checkpoint() is None
        ):
            raise ConfigError("Only a cancelled or failed job with a checkpoint can be resumed.")
        if self.job_for_run(job.run_dir) is not None:
            raise ConfigError(f"{job.config.name} is already being resumed.")
        return self.submit(dataclasses.replace(job.config, resume=str(job.run_dir)), job.processes)

    def job_for_run(self, run: Path) -> Job | None:
        """The queued or running job of a run folder, if this queue has one."""
        run = Path(run).resolve()
        return next(
            (j for j in self.jobs() if not j.finished and j.run_dir and j.run_dir.resolve() == run), None
        )

    def resume_run(self, run: Path) -> Job:
        """Queue a job that continues a run folder from its newest checkpoint: any cancelled, failed or
        interrupted run on disk, also one from before a restart."""
        info = run_info(Path(run))
        if self.job_for_run(run) is not None or info.state is RunState.RUNNING:
            raise ConfigError(f"{info.name} is already running or queued.")
        if not info.resumable:
            raise ConfigError(
                f"{info.name} is {info.state} and has no checkpoint to resume from."
                if not info.checkpoints
                else f"{info.name} is {info.state}: only cancelled, failed or interrupted runs resume."
            )
        return self.submit(run_config(info.folder))

    def cancel_run(self, run: Path) -> None:
        """Stop a run: its job here, or (a run of another process) through the run's CANCEL file."""
        job = self.job_for_run(run)
        if job is not None:
            self.cancel(job.id)
        elif run_info(Path(run)).state is RunState.RUNNING:
            RunFolder(Path(run)).cancel_file.touch()
        else:
            raise ConfigError(f"{Path(run).name} is not running.")

    def get(self, job_id: int) -> Job:
        return self._jobs[job_id]

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def current(self) -> Job | None:
        """The running job, else the newest one (so a reloaded page shows what happened last)."""
        jobs = self.jobs()
        running = [j for j in jobs if j.status is JobStatus.RUNNING]
        return running[0] if running else (jobs[-1] if jobs else None)

    def wait(self, job_id: int, timeout: float | None = None) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self._jobs[job_id]
        while not job.finished:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
            time.sleep(0.05)
        return job

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._waiting:
                    self._wake.wait()
                job = self._waiting.popleft()
                job.status = JobStatus.RUNNING
            try:
                if job.processes > 1:
                    job.result = train_distributed(
                        job.config, job.processes, on_event=job.events.append, cancel=job.cancel_requested
                    )
                else:
                    job.result = train(job.config, on_event=job.events.append, cancel=job.cancel_requested)
                job.status = JobStatus.CANCELLED if job.result.cancelled else JobStatus.DONE
            except Exception as error:  # noqa: BLE001 - any failure is reported on the job, the worker lives on
                job.error = describe(error)
                job.status = JobStatus.FAILED
            self._clean_uploads(job)

    def _clean_uploads(self, job: Job) -> None:
        """After a run: remove old uploads that no run used and no waiting job needs."""
        with self._lock:
            in_use = [job.config.data_dir, *(waiting.config.data_dir for waiting in self._waiting)]
        # Cleaning is a courtesy: a folder that can't be read now is tried again after the next run.
        with contextlib.suppress(OSError):
            clean_uploads(Outputs(Path(job.config.outputs)), in_use)


def pending_names(jobs: Iterable[Job]) -> set[str]:
    """Adapter names that queued or running jobs will write, so a new job doesn't pick the same one."""
    return {job.config.name for job in jobs if not job.finished and job.config.name}


@dataclass
class JobView:
    """What a page shows about a job: a status line, progress, the loss curve and samples (newest first).

    `total` is 0 when there is no job; `active` says whether polling should go on."""

    status: str
    done: int
    total: int
    losses: list[tuple[int, float]]
    samples: list[tuple[str, str]]
    active: bool
    settings: str = ""  # the job's settings, one 'option = value' per line
    validation_losses: list[tuple[int, float]] = field(default_factory=list)

    @property
    def smoothed_losses(self) -> list[tuple[int, float]]:
        return smoothed_losses(self.losses)

    @property
    def curves(self) -> list[tuple[int, float, str]]:
        return loss_curves(self.losses, self.validation_losses)


def smoothed_losses(losses: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """The loss curve a person can read: per-step losses are mostly noise."""
    return list(zip([s for s, _ in losses], smooth([v for _, v in losses]), strict=True))


def loss_curves(
    losses: Sequence[tuple[int, float]], validation: Sequence[tuple[int, float]] = ()
) -> list[tuple[int, float, str]]:
    """The loss chart's points as (step, loss, curve): the raw step losses, their smoothed curve and,
    once the run measures it, the validation loss (a rise there while training's falls is overfitting)."""
    return [
        *((step, value, "raw") for step, value in losses),
        *((step, value, "smoothed") for step, value in smoothed_losses(losses)),
        *((step, value, "validation") for step, value in validation),
    ]


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """An exponential moving average with TensorBoard's debiasing, so the first points aren't pulled to 0."""
    smoothed, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**count))
    return smoothed


def eta_seconds(steps: Sequence[StepEvent]) -> float | None:
    """Time left from a smoothed step time: the first steps (warm-up, caches) don't skew it as an
    average over the whole run does; None until two steps have been timed."""
    if len(steps) < 2:
        return None
    durations = [b.elapsed_s - a.elapsed_s for a, b in zip(steps, steps[1:], strict=False) if b.step > a.step]
    if not durations:
        return None
    return smooth(durations)[-1] * (steps[-1].total - steps[-1].step)


def settings_text(config: TrainConfig) -> str:
    """A job's settings as 'option = value' lines, the run's config a user can compare with the form."""
    return settings_lines({k: v for k, v in dataclasses.asdict(config).items() if k != "outputs"})


def job_view(job: Job | None, jobs: Iterable[Job] = ()) -> JobView:
    """Status, progress, losses and samples of `job` (the queue's current one), with what waits after it."""
    if job is None:
        return JobView("No training job yet.", 0, 0, [], [], False)
    step = job.last(StepEvent)
    done, total = (step.step, step.total) if step else (0, job.config.steps)
    status = f"**Job {job.id} · {job.config.name}** · {_status_line(job, step)}"
    waiting = [j for j in jobs if j.status is JobStatus.QUEUED and j.id != job.id]
    if waiting:
        status += "  \nQueued after it: " + ", ".join(f"job {j.id} ({j.config.name})" for j in waiting)
    losses = [(e.step, e.loss) for e in job.events if isinstance(e, StepEvent)]
    validation = {e.step: e.loss for e in job.events if isinstance(e, ValidationEvent)}
    samples = [(path, f"step {e.step}") for e in job.events if isinstance(e, SampleEvent) for path in e.paths]
    active = not job.finished or bool(waiting)
    return JobView(
        status,
        done,
        total,
        losses,
        samples[::-1],
        active,
        settings_text(job.config),
        sorted(validation.items()),
    )


def _status_line(job: Job, step: StepEvent | None) -> str:
    if job.status is JobStatus.QUEUED:
        return "queued: it starts when the job before it ends."
    if job.status is JobStatus.FAILED:
        return f"failed: {job.error}"
    if job.status is JobStatus.CANCELLED:
        cancelled = job.last(CancelledEvent)
        said = f" {cancelled.message}" if cancelled and cancelled.message else ""
        return f"cancelled after {step.step if step else 0} steps.{said}"
    if job.status is JobStatus.DONE:
        adapter = job.result.adapter if job.result else "?"
        done = job.last(DoneEvent)
        took = done.time - job.submitted if done else 0.0
        return f"done in {_duration(took)}: saved `{adapter}`; it is in the Generate tab."
    elapsed = f"{_duration(time.time() - job.submitted)} elapsed"
    latest = next((e for e in reversed(job.events) if isinstance(e, (PhaseEvent, StepEvent))), None)
    if isinstance(latest, PhaseEvent) and (latest.phase != "samples" or latest.done < latest.total):
        return f"{_phase_line(latest)} · {elapsed}"
    if step is None:
        return f"{_phase_line(None)} · {elapsed}"
    eta = eta_seconds([e for e in job.events if isinstance(e, StepEvent)])
    left = f" · about {_duration(eta)} left" if eta is not None else ""
    return f"step {step.step}/{step.total} · loss {step.loss:.4f} · {elapsed}{left}"


def _phase_line(phase: PhaseEvent | None) -> str:
    counted = f" {phase.done}/{phase.total}" if phase and phase.total else ""
    match phase.phase if phase else "loading":
        case "loading":
            return "loading the base model…"
        case "class_images":
            return f"making class images for prior preservation{counted}…"
        case "caching":
            return "caching the images…"
        case "samples":
            return f"drawing samples{counted}…"
        case "saving":
            return "saving…"
        case "waiting_for_disk":
            return "can't save: the disk is full or read-only; free some space, saving is tried again…"
        case other:
            return f"{other}{counted}…"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"
