"""Beyond one model and one process: SDXL bases through the same trainer, and data-parallel training."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from sdlora.adapters import read_adapter, read_lora, summarize, write_lora
from sdlora.generate import GenerationParams, Generator
from sdlora.train import read_events, train
from tests.conftest import train_config
from tests.tiny_models import save_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> str:
    return str(save_tiny_pipeline(tmp_path_factory.mktemp("bases") / "tiny-sdxl", sdxl=True))


def test_sdxl_trains_exports_imports_and_stacks(tiny_sdxl, blob_folder, tmp_path):
    first = train(
        train_config(
            blob_folder,
            tiny_sdxl,
            tmp_path / "out",
            steps=3,
            rank=4,
            alpha=6,
            name="xl_a",
            text_encoder=True,
            class_prompt="a photo of blob",
            num_class_images=2,
        )
    )
    second = train(
        train_config(blob_folder, tiny_sdxl, tmp_path / "out", steps=3, rank=2, name="xl_b", seed=1, lr=5e-3)
    )
    summary = summarize(first.adapter)
    assert summary["family"] == "sdxl" and summary["facts"]["family"] == "sdxl"
    assert set(summary["components"]) == {"unet", "text_encoder", "text_encoder_2"}

    kohya = write_lora(read_lora(first.adapter), tmp_path / "xl_kohya.safetensors", "kohya")
    keys = read_adapter(kohya)[0]
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    assert read_adapter(kohya)[1]["ss_base_model_version"] == "sdxl_base_v1-0"

    generator = Generator(tiny_sdxl)
    ours, theirs, other = (generator.load_adapter(p) for p in (first.adapter, kohya, second.adapter))
    params = GenerationParams("a sks blob", seed=2, steps=3, guidance=3.0)
    base = np.asarray(generator.generate(params), dtype=np.int16)
    a = np.asarray(generator.generate(params, {ours: 1.0}), dtype=np.int16)
    b = np.asarray(generator.generate(params, {theirs: 1.0}), dtype=np.int16)
    assert np.abs(a - base).mean() > 0.5 and np.abs(a - b).max() <= 1
    compared = generator.compare(params, {ours: 0.7, other: 0.5})
    assert [label for label, _ in compared] == ["base", "xl_a 0.7", "xl_b 0.5", "mix"]


def _torchrun(processes: int, data: Path, base: str, outputs: Path, *extra: str) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(29500 + os.getpid() % 1000),
        "-m",
        "sdlora",
        "train",
        str(data),
        "--prompt",
        "a sks blob",
        "--base",
        base,
        "--rank",
        "4",
        "--lr",
        "1e-3",
        "--outputs",
        str(outputs),
        "--name",
        "ddp",
        "--class-prompt",
        "a blob",
        "--num-class-images",
        "2",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_processes_match_one_at_equal_global_batch_and_resume(tiny_base, blob_folder, tmp_path):
    single = train(
        train_config(
            blob_folder,
            tiny_base,
            tmp_path / "one",
            steps=6,
            batch_size=2,
            name="ddp",
            prompt="a sks blob",
            lr=1e-3,
            class_prompt="a blob",
            num_class_images=2,
            class_dir=str(tmp_path / "class"),
        )
    )
    shutil.copytree(tmp_path / "class", tmp_path / "two" / "class_images" / "tiny-sd" / "a_blob-16px")
    _torchrun(
        2, blob_folder, tiny_base, tmp_path / "two", "--batch-size", "1", "--steps", "4", "--save-every", "2"
    )
    _torchrun(
        2,
        blob_folder,
        tiny_base,
        tmp_path / "two",
        "--batch-size",
        "1",
        "--steps",
        "6",
        "--save-every",
        "2",
        "--resume",
    )
    (run,) = list((tmp_path / "two" / "runs").iterdir())  # one run folder, written by the main process only
    events = read_events(run / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    a = load_file(single.adapter)
    b = load_file(tmp_path / "two" / "adapters" / "ddp.safetensors")
    assert a.keys() == b.keys()
    difference = max((a[k] - b[k]).abs().max().item() for k in a)
    assert difference < 1e-5, difference
