"""The run's event stream: JSON lines that the terminal, the UI and tests can all follow."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EventHandler = Callable[[dict[str, Any]], None]


class EventLog:
    """Appends one JSON object per line to `events.jsonl` (flushed each time) and calls an optional handler."""

    def __init__(self, path: Path, handler: EventHandler | None = None, enabled: bool = True):
        self.path = path
        self.handler = handler
        self.enabled = enabled

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            if self.handler:
                self.handler(record)
        return record


def read_events(path: str | Path) -> list[dict[str, Any]]:
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

    def new(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data.rfind(b"\n") + 1  # a line still being written waits for the next call
        self.offset += complete
        return _parse(data[:complete])


def _parse(data: bytes) -> list[dict[str, Any]]:
    events = []
    for line in data.decode("utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
