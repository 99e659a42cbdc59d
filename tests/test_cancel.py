"""Cancel stops class-image generation and sampling between images (the app's Cancel, the CLI's Ctrl+C),
keeps what was made and leaves the run cancelled: resumable from its checkpoint, or restartable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from sdlora.jobs import JobQueue, JobStatus, job_view
from sdlora.train import read_events, train
from sdlora.train.runs import RunState, run_info
from tests.conftest import train_config


def _when(condition, then) -> threading.Thread:
    """Call `then()` from another thread, as a user's click would, once `condition()` holds."""

    def watch() -> None:
        while not condition():
            time.sleep(0.005)
        then()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png")) if folder.is_dir() else []


def _image_seconds(job, phase: str) -> tuple[float, float]:
    """The time an image took, typically and at most: the median and longest gaps between the phase's
    progress events (the machine may be busy, so one image can take longer than the others)."""
    times = [e.time for e in job.events if getattr(e, "phase", None) == phase]
    gaps = sorted(b - a for a, b in zip(times, times[1:], strict=False))
    return gaps[len(gaps) // 2], gaps[-1]


def test_cancel_during_class_images_stops_within_one_image_and_keeps_them(tiny_base, blob_folder, tmp_path):
    class_dir = tmp_path / "class"
    config = train_config(
        blob_folder,
        tiny_base,
        tmp_path / "out",
        steps=2,
        class_prompt="a photo of blob",
        class_dir=str(class_dir),
        num_class_images=200,
    )
    queue = JobQueue()
    job = queue.submit(config)
    asked: dict[str, float] = {}

    def cancel() -> None:
        made = _pngs(class_dir)
        time.sleep((made[-1].stat().st_mtime - made[-2].stat().st_mtime) / 2)  # half-way through an image
        asked["images"], asked["time"] = len(_pngs(class_dir)), time.time()
        queue.cancel(job.id)

    _when(lambda: len(_pngs(class_dir)) >= 3, cancel)
    queue.wait(job.id, timeout=300)

    assert job.status is JobStatus.CANCELLED and job.last("step") is None
    kept = len(_pngs(class_dir))
    latency = job.last("cancelled")["time"] - asked["time"]
    per_image, longest = _image_seconds(job, "class_images")
    print(f"class images: cancel latency {latency:.3f} s, one image {per_image:.3f} s, kept {kept} of 200")
    assert asked["images"] <= kept <= asked["images"] + 1  # the image being drawn is finished, no more
    assert latency <= longest + 0.5
    assert [p.with_suffix(".txt").is_file() for p in _pngs(class_dir)] == [True] * kept  # captions too
    assert not list(class_dir.glob(".*"))  # nothing half-written
    warning = job.last("warning")["message"]
    assert f"{kept} of 200 are kept in {class_dir}" in warning and "makes only the rest" in warning
    assert run_info(job.run_dir).state is RunState.CANCELLED
    assert "cancelled after 0 steps. Cancelled while making class images" in job_view(job).status

    # Started again, the run makes only the missing images.
    again = train(replace(config, num_class_images=kept + 2))
    made = [e for e in read_events(again.run / "events.jsonl") if e["event"] == "class_images"][0]
    assert made["generated"] == 2 and not again.cancelled and again.adapter.is_file()


def test_cancel_during_samples_stops_within_one_image_and_the_run_resumes(tiny_base, blob_folder, tmp_path):
    prompts = [f"a sks blob, view {n}" for n in range(16)]
    config = train_config(
        blob_folder, tiny_base, tmp_path / "out", steps=4, sample_every=2, sample_prompt=prompts
    )
    queue = JobQueue()
    job = queue.submit(config)
    samples = lambda: _pngs(job.run_dir / "samples") if job.run_dir else []  # noqa: E731
    asked: dict[str, float] = {}

    def cancel() -> None:
        asked["images"], asked["time"] = len(samples()), time.time()
        queue.cancel(job.id)

    _when(lambda: len(samples()) >= 3, cancel)
    queue.wait(job.id, timeout=300)

    assert job.status is JobStatus.CANCELLED and job.last("cancelled")["step"] == 2
    kept = len(samples())
    latency = job.last("cancelled")["time"] - asked["time"]
    per_image, longest = _image_seconds(job, "samples")
    print(f"samples: cancel latency {latency:.3f} s, one image {per_image:.3f} s, kept {kept} of 16")
    assert asked["images"] <= kept <= asked["images"] + 1
    assert latency <= longest + 0.5  # the checkpoint after the images is included
    assert [len(e["paths"]) for e in read_events(job.run_dir / "events.jsonl") if e["event"] == "sample"] == [
        kept
    ]
    info = run_info(job.run_dir)
    assert info.state is RunState.CANCELLED and info.resumable and info.checkpoints[-1].name == "step-000002"

    resumed = queue.resume(job.id)
    queue.wait(resumed.id, timeout=300)
    assert resumed.status is JobStatus.DONE and resumed.last("start")["start_step"] == 2
    assert resumed.result.adapter.is_file()


def test_a_cancel_at_the_last_step_still_writes_the_adapter(tiny_base, blob_folder, tmp_path):
    cancel = threading.Event()
    config = train_config(blob_folder, tiny_base, tmp_path / "out", steps=2)
    result = train(
        config, on_event=lambda e: e.kind == "step" and e.step == 2 and cancel.set(), cancel=cancel
    )
    assert not result.cancelled and result.adapter.is_file() and result.steps == 2


def test_ctrl_c_in_the_cli_stops_class_images_and_says_how_to_go_on(tiny_base, blob_folder, tmp_path):
    class_dir = tmp_path / "class"
    command = [
        sys.executable,
        "-m",
        "sdlora",
        "train",
        str(blob_folder),
        "--base",
        tiny_base,
        "--outputs",
        str(tmp_path / "out"),
        "--prompt",
        "a photo of sks blob",
        "--class-prompt",
        "a photo of blob",
        "--class-dir",
        str(class_dir),
        "--num-class-images",
        "200",
        "--steps",
        "2",
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": ""},
    )
    while len(_pngs(class_dir)) < 2 and process.poll() is None:
        time.sleep(0.01)
    asked = len(_pngs(class_dir))
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "Traceback" not in err and "press Ctrl+C again" in err
    assert "Cancelled while making class images" in err and "Cancelled after 0 steps" in out
    assert "run it again to start over" in out
    assert asked <= len(_pngs(class_dir)) <= asked + 1


def test_with_two_processes_a_cancel_during_class_images_stops_both(tiny_base, blob_folder, tmp_path):
    """The main process makes the class images and tells the other one it was cancelled (2 CPU processes)."""
    from sdlora.train.launch import train_distributed

    class_dir = tmp_path / "class"
    config = train_config(
        blob_folder,
        tiny_base,
        tmp_path / "out",
        steps=2,
        class_prompt="a photo of blob",
        class_dir=str(class_dir),
        num_class_images=200,
        name="two",
    )
    cancel = threading.Event()
    _when(lambda: len(_pngs(class_dir)) >= 2, cancel.set)
    result = train_distributed(config, 2, cancel=cancel)
    assert result.cancelled and result.steps == 0 and 2 <= len(_pngs(class_dir)) <= 3
    assert run_info(result.run).state is RunState.CANCELLED
