"""Run folders: each training run keeps its resolved config, events, samples and checkpoints together."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from sdlora.config import ConfigError, TrainConfig
from sdlora.files import atomic_write_text
from sdlora.outputs import Outputs
from sdlora.train.checkpoint import list_checkpoints
from sdlora.train.events import (
    CancelledEvent,
    DoneEvent,
    ErrorEvent,
    SampleEvent,
    StartEvent,
    StepEvent,
    ValidationEvent,
    read_events,
)


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
    def owner_file(self) -> Path:
        """Present while a process trains the run: its pid and host (see `run_info`)."""
        return self.path / "RUNNING"

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


class RunState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # its process died (a killed server, a crash) without saying how it ended


RESUMABLE = (RunState.CANCELLED, RunState.FAILED, RunState.INTERRUPTED)
_ENDINGS = {DoneEvent: RunState.DONE, CancelledEvent: RunState.CANCELLED, ErrorEvent: RunState.FAILED}


@dataclass(frozen=True)
class RunInfo:
    """What a run folder says about its run: read from disk alone, so it holds after a server restart."""

    folder: RunFolder
    name: str
    state: RunState
    step: int
    total: int
    settings: dict[str, Any]
    losses: list[tuple[int, float]]
    samples: dict[int, list[Path]]  # step -> sample images, one per sample prompt
    checkpoints: list[Path]
    adapter: Path | None
    error: str | None
    validation_losses: list[tuple[int, float]] = field(default_factory=list)

    @property
    def resumable(self) -> bool:
        return self.state in RESUMABLE and bool(self.checkpoints)

    @property
    def best_checkpoint(self) -> Path | None:
        """Of the checkpoints on disk, the one whose step had the lowest validation loss (the earliest of
        equals, as the trainer picks it); None without validation."""
        validation = dict(self.validation_losses)
        measured = [
            (validation[step], step, path) for path in self.checkpoints if (step := _step(path)) in validation
        ]
        return min(measured)[2] if measured else None


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step-"))


# Runs this process stopped whose marker it could not remove (a read-only disk): its pid lives on in the
# marker (the app's server), so readers here must not take them for running.
_STOPPED_HERE: set[Path] = set()


def mark_running(run: RunFolder) -> None:
    """Say which process trains the run, so a reader can tell a live run from one whose process died."""
    atomic_write_text(run.owner_file, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    _STOPPED_HERE.discard(run.path)


def mark_stopped(run: RunFolder) -> None:
    try:
        run.owner_file.unlink(missing_ok=True)
    except OSError:
        _STOPPED_HERE.add(run.path)  # another process sees the marker's pid die with this one


def _owner_alive(run: RunFolder) -> bool:
    if run.path in _STOPPED_HERE:
        return False
    try:
        owner = json.loads(run.owner_file.read_text())
    except (OSError, ValueError):
        return False
    if owner.get("host") != socket.gethostname():
        return True  # another machine's process (a shared disk): trust the marker
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, KeyError, ValueError, TypeError):
        return True
    return True


def run_info(folder: Path) -> RunInfo:
    """The state and record of one run folder.

    A run is running while its process lives; otherwise the last ending event after its last start
    says done, cancelled or failed, and a run with none was interrupted."""
    run = RunFolder(Path(folder))
    events = read_events(run.events)
    try:
        settings = json.loads(run.config.read_text())
    except (OSError, ValueError):
        settings = {}
    state = RunState.INTERRUPTED
    error = None
    for event in events:
        if isinstance(event, StartEvent):
            state, error = RunState.INTERRUPTED, None
        elif type(event) in _ENDINGS:
            state = _ENDINGS[type(event)]
            error = event.message if isinstance(event, ErrorEvent) else None
    if _owner_alive(run):
        state = RunState.RUNNING
    steps = [e for e in events if isinstance(e, StepEvent)]
    losses = {e.step: e.loss for e in steps}  # a resumed run redoes steps after its checkpoint: keep the last
    validation = {e.step: e.loss for e in events if isinstance(e, ValidationEvent)}
    samples: dict[int, list[Path]] = {}
    for event in events:
        if isinstance(event, SampleEvent):
            samples[event.step] = [Path(p) for p in event.paths if Path(p).is_file()]
    done = next((e for e in reversed(events) if isinstance(e, DoneEvent)), None)
    return RunInfo(
        folder=run,
        name=str(settings.get("name") or run.path.name),
        state=state,
        step=steps[-1].step if steps else 0,
        total=int(settings.get("steps") or (steps[-1].total if steps else 0)),
        settings=settings,
        losses=sorted(losses.items()),
        samples=dict(sorted(samples.items())),
        checkpoints=list_checkpoints(run.checkpoints),
        adapter=Path(done.adapter) if done and state is RunState.DONE else None,
        error=error,
        validation_losses=sorted(validation.items()),
    )


def list_runs(outputs: Outputs) -> list[RunInfo]:
    """Every run under outputs/runs, newest first (by the time in its folder's name, whatever the adapter)."""
    return [run_info(path) for path in sorted(outputs.run_dirs(), key=_started, reverse=True)]


def _started(path: Path) -> tuple[str, int]:
    match = re.search(r"-(\d{8}-\d{6})(?:-(\d+))?$", path.name)
    return (match.group(1), int(match.group(2) or 1)) if match else ("", 0)


def run_config(run: RunFolder) -> TrainConfig:
    """The config a run was started with, set to resume it from its newest checkpoint."""
    try:
        saved = json.loads(run.config.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{run.path.name} has no readable config.json, so it can't be resumed.") from error
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{key: value for key, value in saved.items() if key in names})
    return dataclasses.replace(config, resume=str(run.path))


def checkpoint_adapter(run: RunFolder, checkpoint: Path, outputs: Outputs, name: str | None = None) -> Path:
    """Write a checkpoint's adapter weights as a kohya adapter under outputs/adapters, named after the run
    and step unless `name` is given (made unique); an earlier checkpoint (the best validation loss's) may
    be the better adapter.

    The weights go back into the layers the run trained (its base, network type and options) and are
    written from there as a finished run's are, so LoCon's, LoHa's, LoKr's, DoRA's and rsLoRA's files
    (and the EMA's average) come out as the trainer writes them."""
    # imported here: listing runs needs no torch
    from sdlora.adapters import AdapterFacts, LoraFile, trigger_words, write_lora
    from sdlora.adapters.from_peft import modules_from_peft_model
    from sdlora.adapters.library import unique_name
    from sdlora.train.checkpoint import load_checkpoint
    from sdlora.train.networks import checkpoint_parts
    from sdlora.train.optimizers import param_groups

    info = run_info(run.path)
    if Path(checkpoint) not in info.checkpoints:
        raise ConfigError(f"{Path(checkpoint).name} is not a checkpoint of {run.path.name}.")
    config = run_config(run)
    state = load_checkpoint(Path(checkpoint))
    parts = checkpoint_parts(config, state.lora)
    if state.ema is not None:  # the run sampled, validated and saved with the average: so does this adapter
        params = [p for group in param_groups(config, parts) for p in group["params"]]
        for param, average in zip(params, state.ema["shadow_params"], strict=True):
            param.data.copy_(average)
    modules = {
        f"{part}.{module_name}": module
        for part, model in parts.items()
        for module_name, module in modules_from_peft_model(model).items()
    }
    settings = info.settings
    facts = AdapterFacts(
        name=unique_name(outputs, name or f"{info.name}_step{state.step}"),
        base_model=str(config.base or ""),
        family=str(settings.get("family") or ""),
        rank=config.rank,
        alpha=config.lora_alpha,
        targets=config.targets,
        instance_prompt=config.prompt or "",
        class_prompt=config.class_prompt or "",
        trigger_words=trigger_words(config.prompt or "", config.class_prompt),
        steps=state.step,
        resolution=int(settings.get("resolution") or 0),
        learning_rate=config.lr,
        text_encoder=config.text_encoder,
        seed=config.seed,
        network=config.network,
        dora=config.dora,
        rslora=config.rslora,
    )
    return write_lora(LoraFile(modules, facts.to_metadata()), outputs.adapter_file(facts.name), "kohya")


def sample_grid(info: RunInfo) -> tuple[list[tuple[Path, str]], int]:
    """The run's samples as a grid to compare checkpoints: one column per sampled step and one row per
    sample prompt (the same prompts and seed each time, so a row shows what training changed); returns
    (cells row by row, columns)."""
    prompts = list(info.settings.get("sample_prompt") or [])
    steps = list(info.samples)
    rows = max([len(paths) for paths in info.samples.values()] + [0])
    cells = [
        (
            info.samples[step][row],
            f"step {step} · {prompts[row] if row < len(prompts) else f'prompt {row + 1}'}",
        )
        for row in range(rows)
        for step in steps
        if row < len(info.samples[step])
    ]
    return cells, max(len(steps), 1)


def run_summary(info: RunInfo) -> str:
    """One line on a run: its name, state, progress and what it left."""
    parts = [f"{info.name}: {info.state}", f"step {info.step}/{info.total}"]
    if info.checkpoints:
        parts.append(f"{len(info.checkpoints)} checkpoint(s)")
    best = info.best_checkpoint
    if best is not None:
        loss = dict(info.validation_losses)[_step(best)]
        parts.append(f"best: {best.name} (validation loss {loss:.4f})")
    if info.adapter:
        parts.append(f"adapter {info.adapter.name}")
    if info.error:
        parts.append(info.error)
    return " · ".join(parts)


RUN_COLUMNS = ["run", "state", "step", "checkpoints", "best checkpoint", "adapter"]


def run_row(info: RunInfo) -> list[str]:
    """A run as a row of the Runs table (`RUN_COLUMNS`)."""
    adapter = info.adapter.name if info.adapter else ""
    return [
        info.folder.path.name,
        str(info.state),
        f"{info.step}/{info.total}",
        str(len(info.checkpoints)),
        info.best_checkpoint.name if info.best_checkpoint else "",
        adapter,
    ]


def settings_lines(settings: dict[str, Any]) -> str:
    """A run's settings as 'option = value' lines (empty values left out)."""
    return "\n".join(f"{key} = {value}" for key, value in settings.items() if value not in (None, [], ""))
