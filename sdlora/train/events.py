"""The run's event stream: typed events, written as JSON lines that the terminal, the UI and tests follow.

Each event is a small dataclass with one `kind`; on disk it is one JSON object per line,
`{"event": KIND, "time": ..., FIELD: ...}`, so run folders written before the events were typed
still read. An event also reads like that JSON object (`event["step"]`), for code written against it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sdlora.files import disk_problem


@dataclass(frozen=True, kw_only=True)
class Event(Mapping[str, Any]):
    """One thing that happened in a run. Subclasses declare their fields and a unique `kind`."""

    kind: ClassVar[str]
    time: float = field(default_factory=lambda: round(time.time(), 3))

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: `event` names the kind, then `time` and the fields."""
        return {"event": self.kind, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    # Read-only mapping over `to_dict()`, so `event["loss"]` and `event.get(...)` keep working.
    def __getitem__(self, key: str) -> Any:
        if key == "event":
            return self.kind
        if key in self._names():
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(("event", *self._names()))

    def __len__(self) -> int:
        return 1 + len(self._names())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


@dataclass(frozen=True, kw_only=True)
class StartEvent(Event):
    """The models are loaded and cached; the first step comes next. Also says what speed options took."""

    kind: ClassVar[str] = "start"
    run: str
    base: str
    steps: int
    start_step: int
    images: int
    class_images: int
    resolution: int
    buckets: list[str]
    mixed_precision: str
    attention: str
    tf32: bool
    channels_last: bool
    compiled: bool
    compile_gradient_error: float | None = None  # set when --compile checked the compiled U-Net


@dataclass(frozen=True, kw_only=True)
class PhaseEvent(Event):
    """Work other than steps, so a watcher can say what happens: loading, class_images, caching, samples,
    saving; `done` of `total` when it counts (class images, samples). The first, 'loading', names the run."""

    kind: ClassVar[str] = "phase"
    phase: str
    done: int = 0
    total: int = 0
    run: str = ""


@dataclass(frozen=True, kw_only=True)
class StepEvent(Event):
    kind: ClassVar[str] = "step"
    step: int
    total: int
    loss: float
    lr: float
    elapsed_s: float
    eta_s: float
    images_per_s: float
    grad_norm: float | None = None  # before clipping; measured when clipping or logging


@dataclass(frozen=True, kw_only=True)
class CheckpointEvent(Event):
    kind: ClassVar[str] = "checkpoint"
    step: int
    path: str


@dataclass(frozen=True, kw_only=True)
class ValidationEvent(Event):
    """The validation loss at `step` (fixed noise: comparable across steps), and the best step so far."""

    kind: ClassVar[str] = "validation"
    step: int
    loss: float
    best_step: int
    best_loss: float


@dataclass(frozen=True, kw_only=True)
class SampleEvent(Event):
    kind: ClassVar[str] = "sample"
    step: int
    paths: list[str]


@dataclass(frozen=True, kw_only=True)
class ClassImagesEvent(Event):
    kind: ClassVar[str] = "class_images"
    folder: str
    count: int
    generated: int


@dataclass(frozen=True, kw_only=True)
class WarningEvent(Event):
    kind: ClassVar[str] = "warning"
    message: str


@dataclass(frozen=True, kw_only=True)
class CancelledEvent(Event):
    kind: ClassVar[str] = "cancelled"
    step: int
    message: str = ""  # what was kept, when that is more than a checkpoint at `step`


@dataclass(frozen=True, kw_only=True)
class DoneEvent(Event):
    kind: ClassVar[str] = "done"
    step: int
    adapter: str
    loss: float
    elapsed_s: float
    peak_gpu_memory_mib: float | None = None  # CUDA only
    best_checkpoint: str | None = None  # the checkpoint with the lowest validation loss
    best_validation_loss: float | None = None


@dataclass(frozen=True, kw_only=True)
class ErrorEvent(Event):
    kind: ClassVar[str] = "error"
    message: str


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (
        StartEvent,
        PhaseEvent,
        StepEvent,
        CheckpointEvent,
        ValidationEvent,
        SampleEvent,
        ClassImagesEvent,
        WarningEvent,
        CancelledEvent,
        DoneEvent,
        ErrorEvent,
    )
}

EventHandler = Callable[[Event], None]


def parse_event(record: Mapping[str, Any]) -> Event | None:
    """The typed event of a JSON record; None for a kind this version doesn't know or a record missing fields.

    Keys the type doesn't declare are ignored, so logs written by a newer sdlora still read.
    """
    cls = EVENT_TYPES.get(record.get("event"))
    if cls is None:
        return None
    names = set(cls._names())
    try:
        return cls(**{key: value for key, value in record.items() if key in names})
    except TypeError:
        return None


class EventLog:
    """Appends one JSON object per line to `events.jsonl` (flushed each time) and calls an optional handler."""

    def __init__(self, path: Path, handler: EventHandler | None = None, enabled: bool = True):
        self.path = path
        self.handler = handler
        self.enabled = enabled

    def emit(self, event: Event) -> Event:
        if self.enabled:
            try:
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(event.to_dict()) + "\n")
            except OSError as error:
                # A full or read-only disk loses the record of this event, not the training: the handler
                # still gets it, and the save that meets the same disk says so in plain words.
                if disk_problem(error, self.path.parent) is None:
                    raise
            if self.handler:
                self.handler(event)
        return event


def read_events(path: str | Path) -> list[Event]:
    """All complete events so far (a line still being written is ignored)."""
    path = Path(path)
    return _parse(path.read_bytes()) if path.is_file() else []


class EventFollower:
    """The events appended to a log since the last call: follows a run written by another process
    without re-reading the whole file each time."""

    def __init__(self, path: Path, skip_existing: bool = False):
        self.path, self.offset = Path(path), 0
        if skip_existing:
            self.new()

    def new(self) -> list[Event]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data.rfind(b"\n") + 1  # a line still being written waits for the next call
        self.offset += complete
        return _parse(data[:complete])


def _parse(data: bytes) -> list[Event]:
    events = []
    for line in data.decode("utf-8").splitlines():
        try:
            event = parse_event(json.loads(line))
        except (json.JSONDecodeError, AttributeError):  # a torn line, or JSON that is not an object
            continue
        if event is not None:
            events.append(event)
    return events
