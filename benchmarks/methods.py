"""The training methods side by side (issue 19's closing table): each trains the same images for the same
steps on the same base with the same seed, and the table gives

- the validation loss (fixed noise and timesteps, on a held-out quarter of the images) at the first
  measurement and at the last, and the last against plain LoRA's (lower is better);
- the step time relative to plain LoRA: the process's CPU time per step (`time.process_time` at each
  step event; the median, the first steps and those after a validation left out) with torch on one
  thread, so that neither other work on a shared machine nor idle threads spinning count in it;
- the adapter file's size;
- whether the file loads in sdlora (and changes the U-Net's output) and in diffusers' `load_lora_weights`
  (and then whether diffusers' effect on the U-Net matches sdlora's, within 1%).

    python -m benchmarks.methods                          # the demo model, training_data/sks_star
    python -m benchmarks.methods --steps 60 --only lora,loha --out docs/methods.json

Runs sequentially in this process (each run resets accelerate's state); without CUDA the CUDA-only
rows (8-bit AdamW, an NF4 base) are listed as not run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WARMUP_STEPS = 3
MATCH = 0.01  # diffusers' effect within 1% of sdlora's counts as the same adapter

# row name -> (TrainConfig options over the shared recipe, needs CUDA)
METHODS: dict[str, tuple[dict, bool]] = {
    "lora": ({}, False),
    "locon": ({"network": "locon"}, False),
    "loha (+convs)": ({"network": "loha"}, False),
    "lokr (+convs)": ({"network": "lokr"}, False),
    "dora": ({"dora": True}, False),
    "rslora": ({"rslora": True}, False),
    "lora+ (ratio 16)": ({"loraplus_ratio": 16.0}, False),
    "prodigy": ({"optimizer": "prodigy", "lr": 1.0}, False),
    "adafactor": ({"optimizer": "adafactor"}, False),
    "schedule-free adamw": ({"optimizer": "adamw-schedulefree"}, False),
    "ema (decay 0.95)": ({"ema": True, "ema_decay": 0.95}, False),
    "int8 base (torchao)": ({"quantize_base": "int8"}, False),
    "nf4 base (bitsandbytes)": ({"quantize_base": "nf4"}, True),
    "adamw 8-bit": ({"optimizer": "adamw8bit"}, True),
}


def recipe(args: argparse.Namespace, outputs: Path, name: str, options: dict):
    """The shared settings: the demo preset's recipe (rank 4, batch 4, lr 1e-3, min-SNR 5)."""
    from sdlora.config import TrainConfig

    values = dict(
        data_dir=str(args.data),
        prompt=args.prompt,
        base=args.base,
        name=name,
        steps=args.steps,
        rank=4,
        alpha=4.0,
        lr=1e-3,
        batch_size=4,
        snr_gamma=5.0,
        validation_split=0.25,
        validate_every=args.validate_every,
        outputs=str(outputs),
        seed=0,
    )
    return TrainConfig(**{**values, **options})


def step_time(clock: dict[int, float], events: list[dict]) -> float:
    """CPU seconds per step (`clock`: step -> process time at its event): the median, leaving out the
    warm-up steps and each step that followed a validation."""
    validated = {e["step"] for e in events if e["event"] == "validation"}
    gaps = [
        clock[s] - clock[s - 1]
        for s in clock
        if s - 1 in clock and s > WARMUP_STEPS and s - 1 not in validated
    ]
    return statistics.median(gaps)


def unet_output(unet, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    size, width = unet.config.sample_size, unet.config.cross_attention_dim
    latents = torch.randn(2, unet.config.in_channels, size, size, generator=g)
    text = torch.randn(2, 8, width, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 500]), encoder_hidden_states=text).sample


def loads(base: str, adapter: Path, plain) -> tuple[str, str]:
    """(sdlora, diffusers): whether each loads the file and moves the U-Net, diffusers compared to sdlora."""
    from diffusers import DiffusionPipeline

    from sdlora.generate import Generator

    generator = Generator(base, device="cpu")
    generator.activate({generator.load_adapter(adapter): 1.0})
    ours = unet_output(generator.pipe.unet) - plain
    sdlora = "yes" if ours.abs().max() > 0 else "no effect"
    pipe = DiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    try:
        pipe.load_lora_weights(str(adapter))
    except Exception as error:  # noqa: BLE001 - the table records what diffusers says
        return sdlora, f"no ({type(error).__name__})"
    theirs = unet_output(pipe.unet) - plain
    if theirs.abs().max() == 0:
        return sdlora, "no (keys ignored)"
    difference = float((theirs - ours).abs().max() / ours.abs().max())
    return sdlora, "yes" if difference < MATCH else f"differs ({difference:.0%})"


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    from sdlora.models import load_base, resolve_base
    from sdlora.train import read_events, train
    from sdlora.train.events import StepEvent

    torch.set_num_threads(1)  # CPU time then measures the work, not threads waiting for each other
    args.base = resolve_base(args.base)
    plain = unet_output(load_base(args.base).unet)
    wanted = args.only.split(",") if args.only else list(METHODS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in wanted:
            options, needs_cuda = METHODS[name]
            if needs_cuda and not torch.cuda.is_available():
                rows.append({"method": name, "skipped": "needs CUDA"})
                continue
            slug = "".join(c if c.isalnum() else "-" for c in name)
            clock: dict[int, float] = {}

            def timed(event, clock=clock) -> None:
                if isinstance(event, StepEvent):
                    clock[event.step] = time.process_time()

            result = train(recipe(args, Path(tmp), slug, options), on_event=timed)
            events = read_events(result.run / "events.jsonl")
            validation = [(e["step"], e["loss"]) for e in events if e["event"] == "validation"]
            sdlora, diffusers = loads(args.base, result.adapter, plain)
            rows.append(
                {
                    "method": name,
                    "validation_first": validation[0],
                    "validation_last": validation[-1],
                    "step_cpu_s": round(step_time(clock, events), 4),
                    "file_kib": round(result.adapter.stat().st_size / 1024, 1),
                    "loads_sdlora": sdlora,
                    "loads_diffusers": diffusers,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    reference = next((r["step_cpu_s"] for r in rows if r["method"] == "lora" and "step_cpu_s" in r), None)
    for row in rows:
        if reference and "step_cpu_s" in row:
            row["step_time_vs_lora"] = round(row["step_cpu_s"] / reference, 2)
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"{args.steps} steps on {Path(args.base).name} ({args.data.name}, rank 4, batch 4, lr 1e-3, min-SNR 5, "
        f"seed 0); {platform.machine()}, torch {__import__('torch').__version__}",
        "",
        "| method | validation loss (step) first → last | last vs LoRA's | step CPU time vs LoRA | file KiB "
        "| loads in sdlora | loads in diffusers |",
        "|---|---|---|---|---|---|---|",
    ]
    plain = next(
        (r["validation_last"][1] for r in rows if r["method"] == "lora" and "skipped" not in r), None
    )
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['method']} | not run: {row['skipped']} | | | | | |")
            continue
        (s0, l0), (s1, l1) = row["validation_first"], row["validation_last"]
        versus = f"{(l1 - plain) / plain:+.1%}" if plain else ""
        lines.append(
            f"| {row['method']} | {l0:.4f} ({s0}) → {l1:.4f} ({s1}) | {versus} "
            f"| {row.get('step_time_vs_lora', '')}× | {row['file_kib']} | {row['loads_sdlora']} "
            f"| {row['loads_diffusers']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default=None, help="Base model (default: the bundled demo model).")
    parser.add_argument("--data", type=Path, default=ROOT / "training_data" / "sks_star")
    parser.add_argument("--prompt", default="a purple sks shape")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--validate-every", type=int, default=5)
    parser.add_argument("--only", help=f"Comma-separated rows, of: {', '.join(METHODS)}.")
    parser.add_argument("--out", type=Path, help="Also write the rows as JSON here.")
    args = parser.parse_args()
    rows = run(args)
    print(table(rows, args))
    if args.out:
        args.out.write_text(json.dumps({"steps": args.steps, "base": str(args.base), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
