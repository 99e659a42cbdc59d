"""The benchmark's yardsticks: full-size architectures built from their configs, FLOPs counted per step,
and the script itself running end to end on the demo model, as the README says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from benchmarks.architectures import ARCHITECTURES, lora_step_tflops

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("arch", "parameters"), [("sd15", 859_520_964), ("sdxl", 2_567_463_684)])
def test_architectures_have_the_published_sizes(arch, parameters):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**ARCHITECTURES[arch][0])
    assert sum(p.numel() for p in unet.parameters()) == parameters


def test_a_lora_step_on_sd15_costs_about_1_7_tflop_per_image():
    config, resolution = ARCHITECTURES["sd15"]
    one = lora_step_tflops(dict(config), resolution)
    assert one == pytest.approx(1.7, rel=0.05)
    assert lora_step_tflops(dict(config), resolution, batch=4) == pytest.approx(4 * one, rel=1e-6)
    assert lora_step_tflops(dict(config), resolution, targets="cross") < one  # fewer LoRA layers, less work


def test_benchmark_runs_on_the_demo_model(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench.py"),
            "--steps",
            "6",
            "--skip-generation",
            "--variant",
            "",
            "--variant=--channels-last",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout)
    assert [row["trainer"] for row in figures["training"]] == ["sdlora", "sdlora --channels-last"]
    assert figures["unet_tflop_per_image"] > 0
    for row in figures["training"]:
        assert row["images_per_s"] > 0 and row["peak_rss_mib"] > 0 and row["unet_tflop_per_s"] > 0


def test_step_timer_times_only_the_training_bar(tmp_path):
    """The reference script is timed per finished step by its "Steps" bar; other bars (loading) don't count."""
    script = tmp_path / "trainer.py"
    script.write_text(
        "import sys, time\n"
        "from tqdm.auto import tqdm\n"
        "loading = tqdm(total=3, desc='Loading pipeline components')\n"
        "loading.update(3)\n"
        "steps = tqdm(total=5, desc='Steps')\n"
        "for _ in range(5):\n"
        "    time.sleep(0.02)\n"
        "    steps.update(1)\n"
        "assert sys.argv[1:] == ['--max_train_steps', '5']\n"
    )
    times = tmp_path / "times.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "step_timer.py"),
            str(times),
            str(script),
            "--max_train_steps",
            "5",
        ],
        check=True,
        capture_output=True,
    )
    stamps = json.loads(times.read_text())
    assert len(stamps) == 5
    assert all(0.015 < b - a < 1.0 for a, b in zip(stamps, stamps[1:], strict=False))


def test_gpu_check_runs_reduced_on_the_cpu(tmp_path):
    """`make gpu-check` without CUDA: every section on tiny models, the report written with its targets."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.gpu_check",
            "--out",
            str(tmp_path / "out"),
            "--reduced",
            "--models-dir",
            str(tmp_path / "models"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["mode"] == "reduced"
    assert {name: s["status"] for name, s in report["sections"].items()} == dict.fromkeys(
        ("tests", "sd15", "quantized", "sdxl", "generation"), "done"
    )
    if not torch.cuda.is_available():
        assert report["tests"]["passed"] == 0 and report["tests"]["skipped"] > 0  # collected, then skipped
    for arch in ("sd15", "sdxl"):
        rows = report[arch]["rows"]
        assert rows and all(row["images_per_s"] > 0 and row["unet_tflop_per_s"] > 0 for row in rows)
    assert [row["trainer"] for row in report["sd15"]["rows"]] == ["sdlora"]
    assert [row["quantize_base"] for row in report["quantized"]["rows"]] == ["none", "int8"]
    assert report["quantized"]["rows"][1]["weights_vs_first"] < 1
    generation = report["generation"]
    for key in ("base_s_per_image", "stacked_s_per_image", "slider_change_s", "stop_s"):
        assert generation[key] > 0
    assert generation["adapters"] == 3
    assert [t["status"] for t in report["targets"]] == ["n.a."] * 4 + [report["targets"][-1]["status"]]
    assert report["targets"][-1]["status"] in ("PASS", "FAIL")
    summary = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| target | measured | status |" in summary and summary in result.stdout
    assert "**Quantized base**" in summary


def test_quantized_memory_counts_the_int8_unet_smaller(tiny_base):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.quantized_memory", "--base", tiny_base, "--resolution", "16"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    none, int8 = json.loads(result.stdout.strip().splitlines()[-1])
    assert (none["quantize_base"], int8["quantize_base"]) == ("none", "int8")
    assert (
        none["quantized_linear_layers"] == 0 and int8["quantized_linear_layers"] == int8["linear_layers"] > 0
    )
    assert int8["unet_weights_mib"] < none["unet_weights_mib"] and int8["peak_mib"] > 0
    assert "| int8 |" in result.stdout


def test_methods_table_trains_each_row_and_says_where_it_loads(tiny_base, blob_folder, tmp_path):
    rows = "lora,loha (+convs),nf4 base (bitsandbytes)"
    command = [sys.executable, "-m", "benchmarks.methods", "--base", tiny_base, "--data", str(blob_folder)]
    command += ["--steps", "6", "--validate-every", "2", "--only", rows, "--out", str(tmp_path / "m.json")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lora, loha, nf4 = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert lora["validation_first"][0] == 2 and lora["validation_last"][0] == 6
    assert lora["step_time_vs_lora"] == 1.0 and loha["step_cpu_s"] > 0 and loha["file_kib"] > 0
    assert lora["loads_sdlora"] == loha["loads_sdlora"] == "yes" and lora["loads_diffusers"] == "yes"
    if not torch.cuda.is_available():
        assert nf4 == {"method": "nf4 base (bitsandbytes)", "skipped": "needs CUDA"}
    assert "| loha (+convs) |" in result.stdout
