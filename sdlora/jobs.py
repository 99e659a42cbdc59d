"""A training queue that both faces submit to: one job runs at a time in the background, the rest wait.

A job's state lives here, not in a browser session, so a reloaded page (or a second one) sees the
running job, its events and its result.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from sdlora.config import ConfigError, TrainConfig
from sdlora.train import TrainResult, train
from sdlora.train.events import Event, StartEvent
from sdlora.train.launch import train_distributed
from sdlora.train.runs import RunFolder


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
        start = self.last(StartEvent.kind)
        return Path(start.run) if start else None

    def last(self, kind: str) -> Event | None:
        """The newest event of a kind ('step', 'sample', ...), or None."""
        return next((e for e in reversed(self.events) if e.kind == kind), None)


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
        return self.submit(dataclasses.replace(job.config, resume=str(job.run_dir)), job.processes)

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
                job.error = f"{type(error).__name__}: {error}"
                job.status = JobStatus.FAILED
