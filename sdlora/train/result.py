"""How a training ends: the result it returns, or the error that stopped it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdlora.errors import SdloraError


class TrainingError(SdloraError, RuntimeError):
    """Training stopped; the message says why and what to change."""


@dataclass
class TrainResult:
    adapter: Path
    run: Path
    steps: int
    final_loss: float
    elapsed_s: float
    cancelled: bool = False
    best_checkpoint: Path | None = None  # lowest validation loss, when validation ran


class CancelledBeforeTraining(Exception):  # noqa: N818 - a way to end, not a failure
    """A cancel asked before the first step (between class images): `train` ends the run as cancelled and
    warns with this message, which says what was kept."""
