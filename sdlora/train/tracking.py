"""--log-with tensorboard: the run's numbers and sample images mirrored into accelerate's trackers, in the
run folder (its events.out.tfevents.* files), so `tensorboard --logdir OUTPUTS/runs` lists the runs by
folder name and compares them.

The tracker is fed from the run's events (it is one more event handler), so TensorBoard shows exactly
what events.jsonl records: the step loss, learning rate and gradient norm, the validation loss, and the
samples.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from PIL import Image

from sdlora.config import TrainConfig
from sdlora.train.events import Event, EventHandler, SampleEvent, StepEvent, ValidationEvent
from sdlora.train.result import TrainingError

# --log-with value -> (the package it needs, what to install)
PACKAGES = {"tensorboard": ("tensorboard", "pip install 'sdlora[log]'")}


def check_tracker(log_with: str) -> None:
    """Fail before any model loads when the tracker's package is missing, saying what to install."""
    if log_with == "none":
        return
    package, install = PACKAGES[log_with]
    if importlib.util.find_spec(package) is None:
        raise TrainingError(f"--log-with {log_with} needs {package}: {install}")


def tracker_options(config: TrainConfig, runs: Path) -> dict[str, Any]:
    """Accelerator's arguments for --log-with: the tracker and where its run folders are."""
    if config.log_with == "none":
        return {}
    return {"log_with": config.log_with, "project_config": ProjectConfiguration(project_dir=str(runs))}


class Tracking:
    """Starts accelerate's tracker for the run and logs each event it is handed. The accelerator's
    logging directory is the folder of run folders (`tracker_options`), the tracker's name the run's."""

    def __init__(self, accelerator: Accelerator, run: Path, config: TrainConfig):
        self.accelerator = accelerator
        accelerator.init_trackers(run.name, config=hyperparameters(config))

    def __call__(self, event: Event) -> None:
        if isinstance(event, StepEvent):
            values = {"train/loss": event.loss, "train/lr": event.lr}
            if event.grad_norm is not None:
                values["train/grad_norm"] = event.grad_norm
            self.accelerator.log(values, step=event.step)
        elif isinstance(event, ValidationEvent):
            self.accelerator.log({"validation/loss": event.loss}, step=event.step)
        elif isinstance(event, SampleEvent) and event.paths:
            images = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in event.paths])
            for tracker in self.accelerator.trackers:
                tracker.log_images({"samples": images}, step=event.step, dataformats="NHWC")

    def finish(self) -> None:
        for tracker in self.accelerator.trackers:
            tracker.finish()


def hyperparameters(config: TrainConfig) -> dict[str, bool | str | float | int | None]:
    """The options as TensorBoard's hparams take them (lists become text)."""
    values = dataclasses.asdict(config)
    return {
        k: v if v is None or isinstance(v, (bool, str, float, int)) else str(v) for k, v in values.items()
    }


def with_tracking(handler: EventHandler | None, tracking: Tracking | None) -> EventHandler | None:
    """One handler calling the caller's and then the tracker."""
    handlers: list[Callable[[Event], None]] = [h for h in (handler, tracking) if h is not None]
    if len(handlers) < 2:
        return handlers[0] if handlers else None

    def both(event: Event) -> None:
        for h in handlers:
            h(event)

    return both
