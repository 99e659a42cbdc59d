"""Saves on a real full (1 MiB tmpfs) or read-only file system: a plain DiskError naming the folder and what
was kept, and nothing half-written left where a reader or --resume would find it.

Mounting needs root (CI runs as root in a container that allows it); elsewhere these tests are skipped,
except the ones that need no mount.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.adapters import read_adapter, summarize
from sdlora.adapters.library import import_adapter
from sdlora.cli import main
from sdlora.data.uploads import stage_upload
from sdlora.files import DiskError, atomic_write_bytes
from sdlora.generate.studio import Studio
from sdlora.outputs import Outputs
from sdlora.train import trainer
from sdlora.train.checkpoint import TrainingState, list_checkpoints, save_checkpoint
from sdlora.train.runs import RunState, checkpoint_adapter, run_info
from tests.conftest import draw_blob, train_config

MiB = 1024 * 1024
pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),  # pandas 3 in gradio
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


def _mount(folder: Path, options: str) -> bool:
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A real 1 MiB file system, unmounted afterwards."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if not _mount(folder, "size=1m"):
        pytest.skip("needs root and tmpfs mounts to make a real small file system")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def run_disk(tmp_path, monkeypatch) -> Iterator[Path]:
    """A real 8 MiB file system for a training run's outputs, with the final save's wait made short and
    the system's temporary folder (where an unsaved adapter goes) kept in the test's folder."""
    folder = tmp_path / "outputs"
    folder.mkdir()
    if not _mount(folder, "size=8m"):
        pytest.skip("needs root and tmpfs mounts to make a real small file system")
    monkeypatch.setattr(trainer, "SAVE_WAIT_S", 0.5)
    monkeypatch.setattr(trainer, "SAVE_RETRY_S", 0.05)
    (tmp_path / "system-tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "system-tmp"))
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _half_written(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def _fill(folder: Path, leave: int = 0) -> None:
    """Fill the file system holding `folder`, leaving about `leave` bytes free."""
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    (folder / "ballast").write_bytes(b"\0" * max(0, free - leave))


def _state(step: int, floats: int) -> TrainingState:
    return TrainingState(
        step=step,
        lora={"unet.w": torch.zeros(floats)},
        optimizer={"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
        lr_scheduler={"last_epoch": step},
        rng={"cpu": torch.zeros(4, dtype=torch.uint8)},
    )


def test_a_full_disk_is_a_plain_disk_error_and_leaves_no_partial_file(small_disk):
    with pytest.raises(DiskError, match=rf"Can't save: {small_disk} is full\. Free some space") as caught:
        atomic_write_bytes(small_disk / "big.bin", b"x" * 2 * MiB)
    assert "[Errno" not in str(caught.value) and caught.value.errno == 28
    assert list(small_disk.iterdir()) == []


def test_a_read_only_disk_says_so(small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(DiskError, match="is read-only. Make it writable"):
        atomic_write_bytes(small_disk / "a.txt", b"x")


def test_a_checkpoint_that_does_not_fit_is_cleaned_up_and_names_the_last_good_one(small_disk):
    folder = small_disk / "checkpoints"
    good = save_checkpoint(folder, _state(10, 1000), keep=3)
    with pytest.raises(DiskError, match=f"the last good one is {good}"):
        save_checkpoint(folder, _state(20, 400_000), keep=3)  # 1.6 MB of weights on a 1 MiB disk
    assert sorted(p.name for p in folder.iterdir()) == ["step-000010"]
    assert list_checkpoints(folder) == [good]


def test_images_that_do_not_fit_say_how_many_were_saved(small_disk):
    noise = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)  # ~480 KB as PNG
    images = [(f"image {n}", Image.fromarray(noise)) for n in range(3)]
    with pytest.raises(DiskError, match=r"is full.* [12] of 3 images were saved \(.*-0\.png"):
        Studio(Outputs(small_disk))._save(images)
    assert [p.name for p in (small_disk / "images").iterdir() if p.name.startswith(".")] == []


def test_an_upload_that_does_not_fit_keeps_nothing(small_disk, tmp_path):
    noise = np.random.default_rng(1).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    big = tmp_path / "big.png"
    Image.fromarray(noise).save(big)  # ~1.4 MB
    with pytest.raises(DiskError, match="uploads is full.*Nothing was kept from this upload"):
        stage_upload([big], Outputs(small_disk))
    assert list((small_disk / "uploads").iterdir()) == []


def test_an_import_that_does_not_fit_leaves_no_partial_adapter(small_disk, tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [400_000], "data_offsets": [0, 1_600_000]}}).encode()
    adapter = tmp_path / "big.safetensors"
    adapter.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 1_600_000)
    with pytest.raises(DiskError, match="adapters is full.*big.safetensors was not written"):
        import_adapter(adapter, Outputs(small_disk))
    assert list((small_disk / "adapters").iterdir()) == []


def test_the_app_shows_a_full_disk_as_a_plain_message(small_disk, tmp_path):
    from tests.test_server_security import call, file_data, upload
    from ui.app import launch

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = launch(port=port, outputs_dir=small_disk, block=False)
    try:
        _fill(small_disk, leave=64 * 1024)
        blob = draw_blob(tmp_path / "blob.png", (300, 300), (0, 0, 200)).read_bytes()
        noise = np.random.default_rng(2).integers(0, 255, (300, 300, 3), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / "noise.png")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            paths = [
                upload(client, "a.png", blob),
                upload(client, "noise.png", (tmp_path / "noise.png").read_bytes()),
            ]
            message = call(client, "staged", [[file_data(p) for p in paths]])[1]
        assert "is full" in message and "Nothing was kept" in message and "Errno" not in message
    finally:
        app.close()


def test_resume_ignores_a_checkpoint_folder_missing_a_file(tmp_path):
    folder = tmp_path / "checkpoints"
    good = save_checkpoint(folder, _state(10, 10), keep=3)
    newer = save_checkpoint(folder, _state(20, 10), keep=3)
    (newer / "state.json").unlink()  # as a copy cut short, or an older version's crash, would leave it
    (folder / ".step-000030.tmp").mkdir()
    assert list_checkpoints(folder) == [good]


def test_a_single_file_model_that_does_not_fit_leaves_no_partial_file(small_disk):
    from sdlora.models.single_file import save_single_file
    from tests.tiny_models import tiny_pipeline

    # safetensors writes the file itself and reports the full disk in its own error type.
    with pytest.raises(DiskError, match=rf"{small_disk} is full.*tiny.safetensors was not written"):
        save_single_file(tiny_pipeline(seed=3), small_disk / "tiny.safetensors", dtype=torch.float32)
    assert list(small_disk.iterdir()) == []


def test_finished_files_get_the_usual_permissions(tmp_path):
    """Written through a temporary file, but readable by others as any new file is (umask 022)."""
    old = os.umask(0o022)
    try:
        path = atomic_write_bytes(tmp_path / "a.bin", b"x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644 and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_a_full_disk_at_the_final_save_waits_and_saves_once_space_is_freed(run_disk, tiny_base, blob_folder):
    seen = []

    def user(event) -> None:
        seen.append(event)
        if event.kind == "phase" and event.phase == "saving":  # the final save: no checkpoints asked
            _fill(run_disk)
        if event.kind == "warning" and "is full" in event.message:
            (run_disk / "ballast").unlink()  # the user frees some space while the weights wait

    result = trainer.train(train_config(blob_folder, tiny_base, run_disk, steps=3), on_event=user)
    assert summarize(result.adapter)["facts"]["steps"] == 3 and not _half_written(run_disk)
    warning = next(e.message for e in seen if e.kind == "warning")
    assert f"{run_disk / 'adapters'} is full" in warning and "kept in memory" in warning
    assert [e.phase for e in seen if e.kind == "phase"][-1] == "waiting_for_disk" and seen[-1].kind == "done"


def test_a_disk_that_stays_full_keeps_the_last_checkpoint_and_a_copy_of_the_adapter(
    run_disk, tiny_base, blob_folder, tmp_path
):
    def user(event) -> None:
        if event.kind == "checkpoint" and event.step == 4:
            _fill(run_disk)

    config = train_config(blob_folder, tiny_base, run_disk, steps=4, save_every=2, name="full")
    with pytest.raises(DiskError) as caught:
        trainer.train(config, on_event=user)
    run = Outputs(run_disk).run_dirs("full")[0]
    message = str(caught.value)
    [rescue] = (tmp_path / "system-tmp").glob("sdlora-unsaved-*/full.safetensors")
    assert message.startswith(f"Can't save: {run_disk / 'adapters'} is full. Free some space and try again.")
    assert f"Kept: the checkpoint {run / 'checkpoints' / 'step-000004'}" in message
    assert f"--resume {run}" in message and f"the adapter, in {rescue}" in message and "Errno" not in message
    assert not (run_disk / "adapters" / "full.safetensors").exists() and not _half_written(run_disk)
    assert summarize(rescue)["facts"]["steps"] == 4

    # Space freed, the Runs tab's "Make an adapter of it" turns the last checkpoint into the same adapter.
    (run_disk / "ballast").unlink()
    info = run_info(run)
    assert info.state is RunState.FAILED and info.resumable
    saved, kept = (
        read_adapter(checkpoint_adapter(info.folder, info.checkpoints[-1], Outputs(run_disk)))[0],
        read_adapter(rescue)[0],
    )
    assert saved.keys() == kept.keys()
    for key in kept:
        torch.testing.assert_close(saved[key], kept[key])


def test_an_outputs_folder_turned_read_only_mid_run_ends_with_a_plain_message(
    run_disk, tiny_base, blob_folder, tmp_path, monkeypatch, capsys
):
    """Root ignores file modes (and the tests run as root), so the outputs folder is made read-only the
    way an administrator or a failing disk would: its file system is remounted read-only."""
    step = trainer.train_step

    def remount_at_step_2(s, number):
        if number == 2:
            subprocess.run(["mount", "-o", "remount,ro", str(run_disk)], check=True)
        return step(s, number)

    monkeypatch.setattr(trainer, "train_step", remount_at_step_2)
    with pytest.warns(UserWarning) as warned:  # what the terminal shows on the way
        code = main(
            [
                "train",
                str(blob_folder),
                "--base",
                tiny_base,
                "--outputs",
                str(run_disk),
                "--prompt",
                "a photo of sks blob",
                "--name",
                "ro",
                "--steps",
                "4",
                "--save-every",
                "2",
                "--sample-every",
                "2",
                "--sample-prompt",
                "a sks blob",
            ]
        )
    err = capsys.readouterr().err
    [rescue] = (tmp_path / "system-tmp").glob("sdlora-unsaved-*/ro.safetensors")
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        f"sdlora: error: Can't save: {run_disk / 'adapters'} is read-only. Make it writable"
    )
    assert f"Kept: the adapter, in {rescue}" in last and summarize(rescue)["facts"]["steps"] == 4
    said = " ".join(str(w.message) for w in warned)
    assert "samples of step 2 were skipped" in said and "Training goes on with the weights in memory" in said
    assert not _half_written(run_disk) and not (run_disk / "adapters").exists()
    # Its RUNNING marker could not be removed, but the run is not shown as running by this live process.
    run = Outputs(run_disk).run_dirs("ro")[0]
    assert (run / "RUNNING").is_file() and run_info(run).state is RunState.INTERRUPTED


def test_a_cancel_while_the_final_save_waits_gives_up_at_once_and_keeps_a_copy(
    run_disk, tiny_base, blob_folder, tmp_path, monkeypatch
):
    import threading
    import time

    monkeypatch.setattr(trainer, "SAVE_WAIT_S", 600.0)
    cancel, asked = threading.Event(), {}

    def user(event) -> None:
        if event.kind == "phase" and event.phase == "saving":
            _fill(run_disk)
        if event.kind == "phase" and event.phase == "waiting_for_disk":
            asked["time"] = time.monotonic()
            cancel.set()

    config = train_config(blob_folder, tiny_base, run_disk, steps=2, name="given-up")
    with pytest.raises(DiskError, match="is full.*Kept: the adapter, in") as caught:
        trainer.train(config, on_event=user, cancel=cancel)
    waited = time.monotonic() - asked["time"]
    print(f"gave up {waited:.2f} s after the cancel")
    assert waited < 2.0 and "the checkpoint" not in str(caught.value)  # none was asked for
    assert not _half_written(run_disk)


def test_a_fused_model_folder_that_does_not_fit_leaves_no_partial_folder(small_disk, tiny_base, two_adapters):
    from sdlora.generate.fuse import fuse_into_base

    with pytest.raises(DiskError, match=rf"{small_disk} is full.*fused was not written"):
        fuse_into_base(tiny_base, [(two_adapters[0], 1.0)], small_disk / "fused")
    assert list(small_disk.iterdir()) == []
