"""What a run's adapter is called and where it is written."""

from __future__ import annotations

from pathlib import Path

from sdlora.config import TrainConfig
from sdlora.files import safe_name
from sdlora.outputs import Outputs


def adapter_name(config: TrainConfig) -> str:
    """--name, else the stem of --out, else the data folder's name; always file-system safe."""
    if config.name:
        return safe_name(config.name)
    if config.out:
        return safe_name(Path(config.out).stem)
    return safe_name(Path(config.data_dir).resolve().name)


def adapter_file(config: TrainConfig) -> Path:
    """Where the finished adapter goes: --out, else OUTPUTS/adapters/NAME.safetensors."""
    return Path(config.out) if config.out else Outputs(config.outputs).adapter_file(adapter_name(config))
