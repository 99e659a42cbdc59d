"""Memory of the frozen U-Net with and without --quantize-base: its weights as loaded by sdlora, and the
peak of the process through loading and one LoRA training step.

    python -m benchmarks.quantized_memory                       # SD 1.5 architecture, random weights
    python -m benchmarks.quantized_memory --base DIR --kinds none,int8,nf4 --resolution 512

Each setting runs in its own process, so one's memory never counts in another's. The weights are
counted tensor by tensor (a quantized tensor by the storage it holds: int8 values and their scales);
the peak is the process's RSS on the CPU (`ru_maxrss`: the whole pipeline, the Python runtime and the
step's activations) or `torch.cuda.max_memory_allocated` on a GPU. The base is loaded through
`sdlora.models.load_base`, the LoRA added by `sdlora.train.networks.add_adapters`: the trainer's path.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tensor_bytes(tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's Int8Tensor, ...) by its inner tensors."""
    import torch

    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def measure(base: str, kind: str, resolution: int, rank: int) -> dict:
    """In this process: load the base (quantized as `kind`), add the LoRA, take one training step."""
    import torch

    from sdlora.config import TrainConfig
    from sdlora.models import load_base
    from sdlora.train.networks import add_adapters

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    pipe = load_base(base, dtype=dtype, quantize=kind)
    unet = pipe.unet
    weights = sum(tensor_bytes(t) for t in [*unet.parameters(), *unet.buffers()])
    linears = [m for m in unet.modules() if isinstance(m, torch.nn.Linear)]
    quantized = sum(1 for m in linears if type(m.weight) not in (torch.Tensor, torch.nn.Parameter))
    unet.requires_grad_(False)
    unet.to(device)
    add_adapters(TrainConfig(data_dir=".", rank=rank, quantize_base=kind), unet, {})
    latent = resolution // 8
    latents = torch.randn(1, unet.config.in_channels, latent, latent, device=device)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, device=device)
    with torch.autocast(device, dtype, enabled=cuda):
        out = unet(latents, torch.tensor([500], device=device), encoder_hidden_states=text).sample
    out.float().pow(2).mean().backward()
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "quantize_base": kind,
        "unet_weights_mib": round(weights / 2**20, 1),
        "peak_mib": round(peak),
        "peak_is": "cuda max_memory_allocated" if cuda else "process RSS",
        "linear_layers": len(linears),
        "quantized_linear_layers": quantized,
        "resolution": resolution,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base", help="A diffusers folder (default: the SD 1.5 architecture, random weights)."
    )
    parser.add_argument("--kinds", default="none,int8", help="Comma-separated --quantize-base values.")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one measurement, in its own process
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.base, args.child, args.resolution, args.rank)))
        return

    base = args.base
    if base is None:
        from benchmarks.architectures import build_random_base

        base = str(build_random_base("sd15", ROOT / "outputs" / "bench_models" / "sd15"))
    try:
        rows = compare(base, args.kinds.split(","), args.resolution, args.rank)
    except RuntimeError as error:
        raise SystemExit(str(error)) from None
    print(f"base: {base}, one LoRA step (rank {args.rank}) at {args.resolution} px")
    print("\n".join(table(rows)))
    print(json.dumps(rows))


def compare(base: str, kinds: list[str], resolution: int, rank: int) -> list[dict]:
    """One `measure` per kind, each in its own process; the first kind is the reference of the ratios."""
    rows = []
    for kind in kinds:
        command = [sys.executable, "-m", "benchmarks.quantized_memory", "--child", kind, "--base", base]
        command += ["--resolution", str(resolution), "--rank", str(rank)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise RuntimeError(f"--quantize-base {kind}: {done.stderr.strip().splitlines()[-1]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for row in rows:
        row["weights_vs_first"] = round(row["unet_weights_mib"] / rows[0]["unet_weights_mib"], 3)
        row["peak_vs_first"] = round(row["peak_mib"] / rows[0]["peak_mib"], 3)
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| --quantize-base | U-Net weights MiB | vs none | peak MiB | vs none | peak is |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['quantize_base']} | {row['unet_weights_mib']} | {row['weights_vs_first']:.2f}x | "
            f"{row['peak_mib']} | {row['peak_vs_first']:.2f}x | {row['peak_is']} |"
        )
    return lines


if __name__ == "__main__":
    main()
