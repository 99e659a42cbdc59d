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
    events = []
    path = Path(path)
    if not path.is_file():
        return events
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
