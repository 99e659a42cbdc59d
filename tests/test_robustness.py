"""Never lose a run or an adapter: odd files, kills mid-run, full disks, NaNs and memory errors."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.adapters import AdapterError, read_adapter, read_lora, write_lora
from sdlora.data import scan_folder
from sdlora.train import TrainingError, read_events, train
from sdlora.train.checkpoint import list_checkpoints, load_checkpoint
from tests.conftest import draw_blob, train_config

ROOT = Path(__file__).resolve().parents[1]


def bad_image_corpus(folder: Path) -> tuple[set[str], set[str]]:
    """Writes every kind of odd file; returns (names that must be used, names that must be skipped)."""
    folder.mkdir()
    good = draw_blob(folder / "good.png", (32, 32), (200, 0, 0))
    (folder / "truncated.png").write_bytes(good.read_bytes()[:50])
    (folder / "empty.png").write_bytes(b"")
    (folder / "page.png").write_text("<!doctype html><html><body>404</body></html>")
    (folder / "dangling.jpg").symlink_to(folder / "missing-target.jpg")
    Image.new("1", (12000, 12000)).save(folder / "bomb.png")  # 144 Mpx in a few kB
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    frames[0].save(folder / "animated.webp", save_all=True, append_images=frames[1:], duration=100)
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(folder / "sixteen-bit.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255])
    palette.save(folder / "palette-alpha.png", transparency=0)
    Image.new("RGB", (400, 50), "green").save(folder / "wide.png")
    Image.new("RGB", (1000, 10), "green").save(
        folder / "very-wide.png"
    )  # 100:1: huge once fitted to a bucket
    Image.new("RGB", (4, 4), "blue").save(folder / "tiny.bmp")
    for name in ("猫.png", "кошка.jpeg", "gato é.webp"):
        draw_blob(folder / name, (24, 24), (0, 0, 200))
    (folder / "notes.txt").write_text("not an image, not a caption of one")
    used = {
        "good.png",
        "animated.webp",
        "sixteen-bit.png",
        "cmyk.jpg",
        "palette-alpha.png",
        "wide.png",
        "tiny.bmp",
        "猫.png",
        "кошка.jpeg",
        "gato é.webp",
    }
    skipped = {"truncated.png", "empty.png", "page.png", "dangling.jpg", "bomb.png", "very-wide.png"}
    return used, skipped


def test_odd_files_are_used_or_skipped_by_name(tmp_path, caplog):
    used, skipped = bad_image_corpus(tmp_path / "odd")
    with caplog.at_level(logging.WARNING):
        items = scan_folder(tmp_path / "odd", "a thing")
    assert {i.path.name for i in items} == used
    for name in skipped:
        assert name in caplog.text, f"no message names {name}"
    assert "decompression bomb" in caplog.text or "too large" in caplog.text


def test_training_on_odd_files_works(tiny_base, tmp_path):
    used, _ = bad_image_corpus(tmp_path / "odd")
    result = train(train_config(tmp_path / "odd", tiny_base, tmp_path / "out", steps=2))
    start = [e for e in read_events(result.run / "events.jsonl") if e["event"] == "start"][0]
    assert start["images"] == len(used)


def test_full_disk_keeps_the_previous_adapter(tiny_base, blob_folder, tmp_path, monkeypatch):
    result = train(train_config(blob_folder, tiny_base, tmp_path / "out", steps=1))
    before = result.adapter.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("sdlora.files.os.fsync", no_space)
    with pytest.raises(OSError, match="adapters is full. Free some space"):
        write_lora(read_lora(result.adapter), result.adapter, "kohya")
    assert result.adapter.read_bytes() == before
    assert [p.name for p in result.adapter.parent.iterdir()] == [result.adapter.name]  # no temp file left


def test_nan_loss_stops_with_the_last_good_checkpoint(tiny_base, blob_folder, tmp_path, monkeypatch):
    import sdlora.train.trainer as trainer

    real = trainer.diffusion_loss
    calls = {"n": 0}

    def poisoned(ctx, instance, prior):
        calls["n"] += 1
        loss = real(ctx, instance, prior)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(trainer, "diffusion_loss", poisoned)
    with pytest.raises(TrainingError, match="loss became nan at step 3.*step-000002"):
        train(train_config(blob_folder, tiny_base, tmp_path / "out", steps=5, save_every=2))
    assert not (tmp_path / "out" / "adapters").exists()


def test_out_of_memory_says_what_to_change(tiny_base, blob_folder, tmp_path, monkeypatch):
    import sdlora.train.trainer as trainer

    def out_of_memory(ctx, instance, prior):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "diffusion_loss", out_of_memory)
    with pytest.raises(TrainingError, match="--gradient-checkpointing"):
        train(train_config(blob_folder, tiny_base, tmp_path / "out", steps=2))


def test_malformed_and_pickled_adapters_are_refused(tmp_path):
    header = tmp_path / "header.safetensors"
    header.write_bytes(
        (200).to_bytes(8, "little") + b'{"a": {"dtype": "F32", "shape": [9999999]}' + b" " * 200
    )
    with pytest.raises(AdapterError, match="header.safetensors"):
        read_lora(header)
    for name in ("lora.ckpt", "lora.pt", "lora.bin"):
        (tmp_path / name).write_bytes(b"\x80\x04K\x01.")
        with pytest.raises(AdapterError, match="only .safetensors"):
            read_lora(tmp_path / name)


def test_adapter_names_cannot_escape_outputs(tiny_base, blob_folder, tmp_path):
    result = train(
        train_config(blob_folder, tiny_base, tmp_path / "out", steps=1, name="../../etc/evil name")
    )
    assert result.adapter.parent == tmp_path / "out" / "adapters"
    assert result.adapter.name == "etc_evil_name.safetensors"
    assert result.run.parent == tmp_path / "out" / "runs"


def _cli_train(data: Path, base: str, outputs: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sdlora",
        "train",
        str(data),
        "--prompt",
        "a sks blob",
        "--base",
        base,
        "--steps",
        str(steps),
        "--save-every",
        "3",
        "--keep-checkpoints",
        "2",
        "--rank",
        "4",
        "--lr",
        "1e-3",
        "--outputs",
        str(outputs),
        "--name",
        "killed",
        "--dropout",
        "0.1",
    ]


def test_kill_9_mid_run_loses_nothing_and_resume_matches(tiny_base, blob_folder, tmp_path):
    """Killed at several points; every checkpoint left behind loads, no half adapter exists, and the
    resumed run ends with the same adapter as an uninterrupted one."""
    steps = 24
    outputs = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kill_points = [1, 7, 14]  # kill once the run has logged this many steps (or more)
    resumed_from = []
    for point in kill_points:
        args = _cli_train(blob_folder, tiny_base, outputs, steps)
        if list((outputs / "runs").glob("killed-*/checkpoints/step-*")):
            args.append("--resume")
        process = subprocess.Popen(
            args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            events = [
                e for run in (outputs / "runs").glob("killed-*") for e in read_events(run / "events.jsonl")
            ]
            if sum(e["event"] == "step" for e in events) >= point:
                break
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
        checkpoints = [
            c for run in (outputs / "runs").glob("killed-*") for c in list_checkpoints(run / "checkpoints")
        ]
        assert all(load_checkpoint(c).step % 3 == 0 for c in checkpoints)  # each one complete and loadable
        adapters = outputs / "adapters"
        assert not adapters.exists() or not list(adapters.iterdir()), "an adapter appeared before the end"
        resumed_from.append(max((load_checkpoint(c).step for c in checkpoints), default=0))

    finish = subprocess.run(
        _cli_train(blob_folder, tiny_base, outputs, steps) + ["--resume"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finish.returncode == 0, finish.stderr[-2000:]
    straight = subprocess.run(
        _cli_train(blob_folder, tiny_base, tmp_path / "straight", steps),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    a = read_adapter(outputs / "adapters" / "killed.safetensors")[0]
    b = read_adapter(tmp_path / "straight" / "adapters" / "killed.safetensors")[0]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    print(json.dumps({"kill_points_steps": kill_points, "resumed_from_checkpoint_step": resumed_from}))
