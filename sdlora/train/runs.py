"""Run folders: each training run keeps its resolved config, events, samples and checkpoints together."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from sdlora.config import ConfigError, TrainConfig
from sdlora.files import atomic_write_text
from sdlora.outputs import Outputs
from sdlora.train.checkpoint import list_checkpoints


@dataclass(frozen=True)
class RunFolder:
    path: Path

    @property
    def events(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def cancel_file(self) -> Path:
        """Creating this file asks a running training (in any process) to stop after its step."""
        return self.path / "CANCEL"

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    def latest_checkpoint(self) -> Path | None:
        found = list_checkpoints(self.checkpoints)
        return found[-1] if found else None

    def write_config(self, config: TrainConfig, **resolved) -> None:
        atomic_write_text(self.config, json.dumps({**dataclasses.asdict(config), **resolved}, indent=2))


def new_run(outputs: Outputs, name: str) -> RunFolder:
    return RunFolder(outputs.new_run_dir(name))


def find_run_to_resume(outputs: Outputs, name: str, resume: str) -> RunFolder:
    """`resume` is 'latest' (the newest run of this adapter name with a checkpoint) or a run folder."""
    if resume != "latest":
        run = RunFolder(Path(resume))
        if run.latest_checkpoint() is None:
            raise ConfigError(f"--resume {resume}: no checkpoint in that run folder.")
        return run
    for path in outputs.run_dirs(name):
        if RunFolder(path).latest_checkpoint() is not None:
            return RunFolder(path)
    raise ConfigError(f"--resume latest: no run of {name!r} with a checkpoint under {outputs.runs}.")
