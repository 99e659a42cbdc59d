"""Training and generation throughput of sdlora, side by side with diffusers' reference DreamBooth LoRA script.

    python benchmarks/bench.py                        # the demo model on this machine
    python benchmarks/bench.py --reference ~/diffusers/examples/dreambooth/train_dreambooth_lora.py
    python benchmarks/bench.py --base /models/sd15 --resolution 512 --batch-size 8 --precision bf16

Each trainer runs in its own process on the same base, data and settings; the figures are the
steady-state step time (median, first steps excluded), images/s and the peak memory of the process
(RSS on the CPU, `torch.cuda.max_memory_allocated` on a GPU). Generation is timed for the base alone
and with 1 and 3 stacked adapters, folded into the weights (sdlora's default) and applied on the fly.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 3


def run_sdlora(args: argparse.Namespace, work: Path) -> dict:
    """sdlora's trainer in a child process; step times from its event stream."""
    outputs = work / "sdlora"
    command = [sys.executable, "-m", "sdlora", "train", str(args.data), "--prompt", args.prompt,
               "--steps", str(args.steps), "--rank", str(args.rank), "--batch-size", str(args.batch_size),
               "--resolution", str(args.resolution), "--lr", "1e-4", "--mixed-precision", args.precision,
               "--outputs", str(outputs), "--name", "bench", "--seed", "0"]
    if args.base:
        command += ["--base", args.base]
    if args.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    wall, peak = _run(command, work)
    events = [json.loads(line) for line in next((outputs / "runs").glob("bench-*")).joinpath("events.jsonl").open()]
    steps = [e for e in events if e["event"] == "step"]
    step_times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:], strict=False)][WARMUP_STEPS:]
    figures = _figures("sdlora", statistics.median(step_times), args.batch_size, wall, peak)
    if events[-1].get("peak_gpu_memory_mib"):
        figures["peak_gpu_mib"] = round(events[-1]["peak_gpu_memory_mib"])
    return figures


def run_reference(args: argparse.Namespace, work: Path) -> dict:
    """diffusers' train_dreambooth_lora.py with the same settings; step times from its tqdm bar."""
    from sdlora.data import list_images

    images = work / "reference_data"  # it opens every file in the folder as an image: no captions
    images.mkdir()
    for path in list_images(args.data):
        shutil.copy(path, images / path.name)
    command = [args.reference_python, str(args.reference), "--pretrained_model_name_or_path", args.base_path,
               "--instance_data_dir", str(images), "--instance_prompt", args.prompt, "--lr_warmup_steps", "0",
               "--resolution", str(args.resolution), "--train_batch_size", str(args.batch_size),
               "--rank", str(args.rank), "--max_train_steps", str(args.steps), "--learning_rate", "1e-4",
               "--mixed_precision", args.precision if args.precision != "auto" else "no",
               "--output_dir", str(work / "reference"), "--seed", "0", "--checkpointing_steps", "1000000",
               "--dataloader_num_workers", "0"]
    if args.gradient_checkpointing:
        command.append("--gradient_checkpointing")
    wall, peak, output = _run(command, work, capture=True)
    # tqdm prints "Steps:  40%|...| 8/20 [00:03<00:04, 2.61it/s, ...]" or "s/it"; keep the last rates.
    rates = re.findall(r"(\d+)/\d+ \[[^\]]*?([\d.]+)(it/s|s/it)", output)
    if not rates:
        raise RuntimeError(f"Could not read step rates from the reference script:\n{output[-3000:]}")
    per_step = [(1 / float(r) if unit == "it/s" else float(r)) for step, r, unit in rates
                if int(step) > WARMUP_STEPS]
    return _figures("reference", per_step[-1], args.batch_size, wall, peak)


def _run(command: list[str], work: Path, capture: bool = False):
    """Run one trainer; its wall time and its own peak RSS (from wait4, not the max over all children)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        log.seek(0)
        output = log.read()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{output[-3000:]}")
    peak = usage.ru_maxrss / 1024  # KiB -> MiB
    return (wall, peak, output) if capture else (wall, peak)


def _figures(name: str, step_s: float, batch: int, wall: float, peak_mib: float) -> dict:
    return {"trainer": name, "step_s": round(step_s, 4), "images_per_s": round(batch / step_s, 2),
            "wall_s": round(wall, 1), "peak_rss_mib": round(peak_mib)}


def bench_generation(args: argparse.Namespace, work: Path) -> list[dict]:
    """Images/s for the base alone and with 1 and 3 stacked adapters, fused and unfused."""
    import torch

    from sdlora.config import TrainConfig
    from sdlora.generate import GenerationParams, Generator
    from sdlora.train import train

    adapters = []
    for index in range(3):
        config = TrainConfig(data_dir=str(args.data), prompt=args.prompt, base=args.base, steps=2, rank=args.rank,
                             outputs=str(work / "gen"), name=f"a{index}", seed=index)
        adapters.append(train(config).adapter)
    params = GenerationParams(args.prompt, seed=0, steps=args.gen_steps, width=args.resolution,
                              height=args.resolution)
    rows = []
    for fuse in (True, False):
        generator = Generator(args.base, fuse=fuse)
        names = [generator.load_adapter(path) for path in adapters]
        for count in (0, 1, 3):
            weights = {name: 0.5 for name in names[:count]}
            generator.generate(params, weights)  # warm-up, and the fuse itself when the mix changed
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.gen_images):
                generator.generate(params, weights)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / args.gen_images
            rows.append({"adapters": count, "fused": fuse, "s_per_image": round(seconds, 4),
                         "images_per_s": round(1 / seconds, 2)})
    base = {r["fused"]: r["s_per_image"] for r in rows if r["adapters"] == 0}
    for row in rows:
        row["overhead_vs_base"] = f"{(row['s_per_image'] / base[row['fused']] - 1) * 100:+.1f}%"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="Base model (default: the bundled demo model).")
    parser.add_argument("--data", type=Path, default=ROOT / "training_data" / "sks_star")
    parser.add_argument("--prompt", default="a purple sks shape")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--precision", default="auto", choices=("auto", "no", "fp16", "bf16"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--reference", type=Path, help="Path to diffusers' examples/dreambooth/train_dreambooth_lora.py")
    parser.add_argument("--reference-python", default=sys.executable,
                        help="Interpreter for the reference script (it needs torchvision, which sdlora does not).")
    parser.add_argument("--gen-steps", type=int, default=20)
    parser.add_argument("--gen-images", type=int, default=5)
    parser.add_argument("--skip-generation", action="store_true")
    args = parser.parse_args()

    from sdlora.models import resolve_base

    args.base_path = resolve_base(args.base)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {"machine": _machine(), "settings": {k: str(v) for k, v in vars(args).items()}}
        training = [run_sdlora(args, work)]
        if args.reference:
            training.append(run_reference(args, work))
            training.append({"trainer": "ratio sdlora/reference",
                             "images_per_s": round(training[0]["images_per_s"] / training[1]["images_per_s"], 2)})
        results["training"] = training
        if not args.skip_generation:
            results["generation"] = bench_generation(args, work)
    print(json.dumps(results, indent=2))


def _machine() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU (torch {torch.__version__})"


if __name__ == "__main__":
    main()
