"""Run a training script with a clock on its "Steps" progress bar, so its step times are measured the
way sdlora's are (a timestamp per finished step) rather than read off tqdm's smoothed rate.

    python benchmarks/step_timer.py TIMES.json SCRIPT [SCRIPT ARGS...]
"""

from __future__ import annotations

import atexit
import json
import runpy
import sys
import time
from pathlib import Path

from tqdm import std

STEP_BAR = "Steps"  # the desc of the training loop's bar in diffusers' example scripts


def main() -> None:
    times_file, script = Path(sys.argv[1]), sys.argv[2]
    stamps: list[float] = []
    update = std.tqdm.update

    def timed_update(bar, n=1):
        if str(bar.desc).startswith(STEP_BAR):
            stamps.extend([time.perf_counter()] * n)
        return update(bar, n)

    std.tqdm.update = timed_update
    atexit.register(lambda: times_file.write_text(json.dumps(stamps)))
    sys.argv = sys.argv[2:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
