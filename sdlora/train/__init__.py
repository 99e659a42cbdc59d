"""Training LoRA adapters: the loop, prior preservation, checkpoints, run folders and events."""

from sdlora.train.events import read_events
from sdlora.train.result import TrainingError, TrainResult
from sdlora.train.trainer import train

__all__ = ["TrainResult", "TrainingError", "read_events", "train"]
