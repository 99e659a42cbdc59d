"""Training on several GPUs from inside a program (the app's queue): `train`'s contract, run under torchrun.

The CLI user runs `accelerate launch -m sdlora train ...` or `torchrun ...` directly; this module does
the same for a caller that holds a job: it starts the processes, follows the run's event stream, and
turns a cancel request into the run folder's CANCEL file, which every process sees at the same step.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from sdlora.config import TrainConfig, dump_toml
from sdlora.outputs import Outputs
from sdlora.train.events import CancelledEvent, DoneEvent, Event, EventFollower, EventHandler
from sdlora.train.naming import adapter_file, adapter_name
from sdlora.train.result import TrainingError, TrainResult
from sdlora.train.runs import RunFolder, find_run_to_resume

POLL_SECONDS = 0.2


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def train_distributed(
    config: TrainConfig,
    processes: int,
    *,
    on_event: EventHandler | None = None,
    cancel: threading.Event | None = None,
) -> TrainResult:
    """Train with `processes` data-parallel processes (one per GPU; gloo on a CPU)."""
    config.validate()
    outputs, name = Outputs(config.outputs), adapter_name(config)
    existing = set(outputs.run_dirs(name))
    # The run the processes will use: the one `train` resumes (the same lookup), else the one they make.
    run = find_run_to_resume(outputs, name, config.resume) if config.resume else None
    follower = EventFollower(run.events, skip_existing=True) if run else None  # a resumed run's old events
    last: Event | None = None
    with tempfile.TemporaryDirectory() as tmp:
        job_file, log_file = Path(tmp) / "job.toml", Path(tmp) / "log.txt"
        job_file.write_text(dump_toml(config))
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "sdlora",
            "train",
            "--config",
            str(job_file),
        ]
        with open(log_file, "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            while True:
                finished = process.poll() is not None
                if run is None:
                    new = [path for path in outputs.run_dirs(name) if path not in existing]  # newest first
                    run = RunFolder(new[0]) if new else None
                    follower = EventFollower(run.events) if run else None
                if run is not None:
                    for event in follower.new():
                        last = event
                        if on_event:
                            on_event(event)
                    if cancel is not None and cancel.is_set():
                        run.cancel_file.touch()
                if finished:
                    break
                time.sleep(POLL_SECONDS)
        if process.returncode != 0:
            raise TrainingError(
                f"The {processes}-process training failed (exit {process.returncode}):\n"
                f"{_failure_excerpt(log_file.read_text(errors='replace'))}"
            )
    if isinstance(last, DoneEvent):
        return TrainResult(adapter_file(config), run.path, last.step, last.loss, last.elapsed_s)
    step = last.step if isinstance(last, CancelledEvent) else 0
    return TrainResult(
        adapter_file(config), run.path, step, float("nan"), 0.0, cancelled=isinstance(last, CancelledEvent)
    )


def _failure_excerpt(log: str, size: int = 2000) -> str:
    """The first process's error (where the cause is) and the end of the log (torchrun's summary)."""
    first = log.find("Traceback")
    if first == -1 or first >= len(log) - size:
        return log[-size:]
    return f"{log[first : first + size]}\n...\n{log[-size:]}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
