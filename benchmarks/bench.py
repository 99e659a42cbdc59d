"""Training and generation throughput of sdlora, side by side with diffusers' reference DreamBooth LoRA script.

    python benchmarks/bench.py                        # the demo model on this machine
    python benchmarks/bench.py --reference ~/diffusers/examples/dreambooth/train_dreambooth_lora.py
    python benchmarks/bench.py --arch sd15 --batch-size 8 --variant "" --variant=--compile   # on a GPU
    python benchmarks/bench.py --base /models/sd15 --resolution 512 --batch-size 8 --precision bf16

Each trainer runs in its own process on the same base, data and settings; the figures are the
steady-state step time (median, first steps excluded), images/s and the peak memory of the process
(RSS; on a GPU also the device memory it took, polled with nvidia-smi, and sdlora's own
`torch.cuda.max_memory_allocated`). The U-Net work of one LoRA step is counted with PyTorch's
FlopCounterMode, which gives the TFLOP/s reached and, on a GPU, the share of its bf16 peak.
`--arch sd15|sdxl` builds full-size SD 1.5 or SDXL with random weights from their configs (no download).
Generation is timed for the base alone, with 3 stacked adapters, and for one slider change (one
`Generator.activate` call with a weight moved): see benchmarks/generation.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python benchmarks/bench.py` imports sdlora and benchmarks from this checkout
WARMUP_STEPS = 3
# Dense bf16 tensor throughput in TFLOP/s from the vendors' data sheets, matched against the device
# name in this order (so "H100 PCIe" wins over "H100").
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 PCIe": 756.5,
    "H100 NVL": 835.5,
    "H100": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.2,
}


def run_sdlora(args: argparse.Namespace, work: Path, variant: str = "") -> dict:
    """sdlora's trainer in a child process, with a variant's extra flags; step times from its event stream."""
    from sdlora.train import read_events
    from sdlora.train.events import DoneEvent, StartEvent, StepEvent

    outputs = work / f"sdlora-{len(list(work.glob('sdlora-*')))}"
    command = [
        sys.executable,
        "-m",
        "sdlora",
        "train",
        str(args.data),
        "--prompt",
        args.prompt,
        "--steps",
        str(args.steps),
        "--rank",
        str(args.rank),
        "--batch-size",
        str(args.batch_size),
        "--resolution",
        str(args.resolution),
        "--lr",
        "1e-4",
        "--mixed-precision",
        args.precision,
        "--outputs",
        str(outputs),
        "--name",
        "bench",
        "--seed",
        "0",
    ]
    if args.base:
        command += ["--base", args.base]
    if args.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    command += shlex.split(variant)
    wall, peak, gpu = _run("sdlora", command, work)
    events = read_events(next((outputs / "runs").glob("bench-*")) / "events.jsonl")
    stamps = [e.elapsed_s for e in events if isinstance(e, StepEvent)]
    figures = _figures(f"sdlora {variant}".strip(), _steady_step(stamps), args.batch_size, wall, peak, gpu)
    if isinstance(events[-1], DoneEvent) and events[-1].peak_gpu_memory_mib:
        figures["peak_allocated_mib"] = round(events[-1].peak_gpu_memory_mib)
    start = next(e for e in events if isinstance(e, StartEvent))
    if start.compile_gradient_error is not None:  # whether --compile was used, or refused by its check
        figures["compiled"] = start.compiled
        figures["compile_gradient_error"] = start.compile_gradient_error
    return figures


def run_reference(args: argparse.Namespace, work: Path) -> dict:
    """diffusers' train_dreambooth_lora.py with the same settings, timed per step by step_timer.py."""
    from sdlora.data import list_images

    images = work / "reference_data"  # it opens every file in the folder as an image: no captions
    images.mkdir()
    for path in list_images(args.data):
        shutil.copy(path, images / path.name)
    times = work / "reference_steps.json"
    command = [
        args.reference_python,
        str(ROOT / "benchmarks" / "step_timer.py"),
        str(times),
        str(args.reference),
        "--pretrained_model_name_or_path",
        args.base_path,
        "--instance_data_dir",
        str(images),
        "--instance_prompt",
        args.prompt,
        "--lr_warmup_steps",
        "0",
        "--resolution",
        str(args.resolution),
        "--train_batch_size",
        str(args.batch_size),
        "--rank",
        str(args.rank),
        "--max_train_steps",
        str(args.steps),
        "--learning_rate",
        "1e-4",
        "--mixed_precision",
        args.precision,
        "--output_dir",
        str(work / "reference"),
        "--seed",
        "0",
        "--checkpointing_steps",
        "1000000",
        "--dataloader_num_workers",
        "0",
    ]
    if args.gradient_checkpointing:
        command.append("--gradient_checkpointing")
    wall, peak, gpu = _run("the reference script", command, work)
    stamps = json.loads(times.read_text())
    return _figures("reference", _steady_step(stamps), args.batch_size, wall, peak, gpu)


def _steady_step(stamps: list[float]) -> float:
    """The median time between finished steps, the first WARMUP_STEPS left out (compilation, caches)."""
    return statistics.median([b - a for a, b in zip(stamps, stamps[1:], strict=False)][WARMUP_STEPS:])


def _run(name: str, command: list[str], work: Path) -> tuple[float, float, int | None]:
    """Run one trainer: its wall time, its own peak RSS (from wait4, not the max over all children) and,
    on a GPU, the most device memory in use while it ran above what was in use before it started."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    watch = GpuMemoryWatch() if shutil.which("nvidia-smi") else None
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
        )
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        log.seek(0)
        output = log.read()
    gpu = watch.stop() if watch else None
    if process.returncode != 0:
        how = (
            "was killed (out of memory?)" if process.returncode == -9 else f"exited with {process.returncode}"
        )
        raise TrainerFailed(f"{name} {how}", output[-3000:])
    peak = usage.ru_maxrss / 1024  # KiB -> MiB
    return wall, peak, gpu


class TrainerFailed(RuntimeError):
    """One trainer's run failed; the benchmark reports it beside the figures it did get."""

    def __init__(self, summary: str, output: str):
        super().__init__(f"{summary}:\n{output}")
        self.summary = summary


class GpuMemoryWatch:
    """Polls GPU 0's used memory with nvidia-smi: the same yardstick for both trainers, whatever their
    allocator does (the reference reports none)."""

    def __init__(self, every_s: float = 0.2):
        self.baseline = self.peak = self._used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(every_s,), daemon=True)
        self._thread.start()

    def _used(self) -> int:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True,
            text=True,
        )
        return int(result.stdout.strip() or 0)

    def _poll(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.peak = max(self.peak, self._used())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.baseline


def _figures(name: str, step_s: float, batch: int, wall: float, peak_mib: float, gpu_mib: int | None) -> dict:
    figures = {
        "trainer": name,
        "step_s": round(step_s, 4),
        "images_per_s": round(batch / step_s, 2),
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(peak_mib),
    }
    if gpu_mib is not None:
        figures["peak_gpu_mib"] = gpu_mib
    return figures


def add_flop_figures(row: dict, tflop_per_image: float, peak_tflops: float | None) -> None:
    """TFLOP/s of U-Net work reached and, with a known peak, the share of it."""
    reached = row["images_per_s"] * tflop_per_image
    row["unet_tflop_per_s"] = float(f"{reached:.3g}")  # 3 significant figures: tiny models too
    if peak_tflops:
        row["share_of_bf16_peak"] = f"{reached / peak_tflops:.1%}"


def peak_bf16_tflops(device_name: str) -> float | None:
    return next((peak for name, peak in PEAK_BF16_TFLOPS.items() if name in device_name), None)


def ratio_row(ours: dict, reference: dict) -> dict:
    """sdlora over the reference on the same work: speed (above 1 is faster) and peak memory (below 1 is less)."""
    ratio = {
        "trainer": "ratio sdlora/reference",
        "images_per_s": round(ours["images_per_s"] / reference["images_per_s"], 2),
        "peak_rss": round(ours["peak_rss_mib"] / reference["peak_rss_mib"], 2),
    }
    if "peak_gpu_mib" in ours and "peak_gpu_mib" in reference:
        ratio["peak_gpu"] = round(ours["peak_gpu_mib"] / max(reference["peak_gpu_mib"], 1), 2)
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default=None, help="Base model (default: the bundled demo model).")
    parser.add_argument(
        "--arch",
        choices=("sd15", "sdxl"),
        help="Instead of --base: full-size SD 1.5 or SDXL with random weights, built once.",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=ROOT / "outputs" / "bench_models",
        help="Where --arch models are built and kept.",
    )
    parser.add_argument("--data", type=Path, default=ROOT / "training_data" / "sks_star")
    parser.add_argument("--prompt", default="a purple sks shape")
    parser.add_argument("--resolution", type=int, help="Default: 512 for sd15, 1024 for sdxl, else 32.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--precision", default="auto", choices=("auto", "no", "fp16", "bf16"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--variant",
        action="append",
        help="Extra sdlora train flags for one more sdlora row, e.g. --variant=--compile or "
        "--variant='--optimizer adamw8bit'; repeat for several (\"\" is the plain run).",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="The GPU's dense bf16 peak, when its name is not in the built-in table.",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        help="Path to diffusers' examples/dreambooth/train_dreambooth_lora.py "
        "(train_dreambooth_lora_sdxl.py for an SDXL base).",
    )
    parser.add_argument(
        "--reference-python",
        default=sys.executable,
        help="Interpreter for the reference script (it needs torchvision, which sdlora does not).",
    )
    parser.add_argument("--gen-steps", type=int, default=20)
    parser.add_argument("--gen-images", type=int, default=5, help="Timed images each, base and stacked.")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()

    import torch
    from diffusers import UNet2DConditionModel

    from benchmarks.architectures import ARCHITECTURES, TEXT_TOKENS, build_random_base, lora_step_tflops
    from benchmarks.generation import bench_generation
    from sdlora.models import resolve_base

    if args.arch:
        args.base = str(build_random_base(args.arch, args.models_dir / args.arch))
    args.resolution = args.resolution or (ARCHITECTURES[args.arch][1] if args.arch else 32)
    args.base_path = resolve_base(args.base)
    if args.precision == "auto":  # resolved here so that both trainers get the same one
        args.precision = (
            ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if torch.cuda.is_available() else "no"
        )
    tokenizer = json.loads((Path(args.base_path) / "tokenizer" / "tokenizer_config.json").read_text())
    tflop = lora_step_tflops(
        UNet2DConditionModel.load_config(args.base_path, subfolder="unet"),
        args.resolution,
        rank=args.rank,
        text_tokens=tokenizer.get("model_max_length", TEXT_TOKENS),
    )
    peak = args.peak_tflops or (
        peak_bf16_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {
            "machine": _machine(),
            "settings": {k: str(v) for k, v in vars(args).items()},
            "unet_tflop_per_image": round(tflop, 6),
            "peak_bf16_tflops": peak,
        }
        variants = [] if args.skip_training else args.variant or [""]
        training = [run_sdlora(args, work, variant) for variant in variants]
        if args.reference and not args.skip_training:
            try:
                training.append(run_reference(args, work))
            except TrainerFailed as failure:
                print(failure, file=sys.stderr)
                training.append({"trainer": "reference", "failed": failure.summary})
        for row in training:
            if "images_per_s" in row:
                add_flop_figures(row, tflop, peak)
        if args.reference and "images_per_s" in training[-1]:
            training.append(ratio_row(training[0], training[-1]))
        results["training"] = training
        if not args.skip_generation:
            results["generation"] = bench_generation(
                args.base,
                args.data,
                args.prompt,
                work,
                args.resolution,
                steps=args.gen_steps,
                images=args.gen_images,
                rank=args.rank,
            )
    print(json.dumps(results, indent=2))


def _machine() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU (torch {torch.__version__})"


if __name__ == "__main__":
    main()
