"""Generation timing: the base alone, three adapters stacked, one slider change, and a Stop.

The Generator writes a mix into the base's weights (W = W0 + sum w_i dW_i, from a pristine copy), so
a stacked image should cost what the base costs; what a mix costs is paid once, when it changes. The
three figures show both: s/image for the base and for 3 stacked adapters, and the time of one
`activate` call with one weight moved (what dragging a slider costs before the next image starts).
`time_stop` measures how long a Stop takes to end an image: the rest of one denoising step, then the
VAE decode of the unfinished latents.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from sdlora.config import TrainConfig
from sdlora.generate import GenerationParams, Generator
from sdlora.generate.generator import GenerationStopped
from sdlora.train import train

ADAPTER_WEIGHT = 0.5
SLIDER_MOVE = 0.05
STOP_MIN_STEPS = 20  # the least steps of the image a Stop is timed on


def train_adapters(
    base: str | None, data: Path, prompt: str, outputs: Path, rank: int = 8, count: int = 3
) -> list[Path]:
    """`count` real adapters on `base`, two steps each at a small size: only their shapes matter to the
    timing (every LoRA of a rank on a base is written into the same layers at the same cost)."""
    return [
        train(
            TrainConfig(
                data_dir=str(data),
                prompt=prompt,
                base=base,
                steps=2,
                rank=rank,
                resolution=64,
                outputs=str(outputs),
                name=f"timing{index}",
                seed=index,
            )
        ).adapter
        for index in range(count)
    ]


def _timed(action: Callable[[], object]) -> float:
    """Seconds for `action`, the GPU's queue drained before and after (kernels run asynchronously)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    action()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_generation(
    generator: Generator, adapters: list[Path], params: GenerationParams, images: int
) -> dict:
    """Median s/image of the base and of all `adapters` stacked, of one slider change, and of a Stop.

    Base and stacked images alternate, so a machine's drift in speed (shared CPUs, GPU clocks) falls
    on both alike; the mix is set outside the timed image, as it is when a user generates again.
    """
    names = [generator.load_adapter(path) for path in adapters]
    mix = {name: ADAPTER_WEIGHT for name in names}
    moved = {**mix, names[0]: ADAPTER_WEIGHT + SLIDER_MOVE}
    generator.generate(params)  # warm-up: kernels, caches, the scheduler
    generator.generate(params, mix)
    base, stacked, slider = [], [], []
    for _ in range(images):
        generator.activate({})
        base.append(_timed(lambda: generator.generate(params)))
        generator.activate(mix)
        stacked.append(_timed(lambda: generator.generate(params, mix)))
        slider.append(_timed(lambda: generator.activate(moved)))
    base_s, stacked_s, slider_s = (statistics.median(times) for times in (base, stacked, slider))
    generator.activate({})
    step_s = base_s / params.steps
    # Pressed in the third step of a longer image, so that no image ends before the press.
    longer = replace(params, steps=max(STOP_MIN_STEPS, 4 * params.steps))
    stop = time_stop(generator, longer, after_s=2.5 * step_s, repeats=min(images, 3))
    return {
        "resolution": params.width,
        "steps": params.steps,
        "images": images,
        "adapters": len(names),
        "base_s_per_image": round(base_s, 4),
        "stacked_s_per_image": round(stacked_s, 4),
        "stacked_overhead": round(stacked_s / base_s - 1, 4),
        "slider_change_s": round(slider_s, 4),
        "slider_change_vs_image": round(slider_s / base_s, 4),
        "step_s": round(step_s, 4),
        **stop,
    }


def time_stop(generator: Generator, params: GenerationParams, after_s: float, repeats: int = 3) -> dict:
    """Median seconds from `Generator.stop` being set (`after_s` into an image of `params`) to the
    generation ending with GenerationStopped, and the longest."""
    latencies = []
    for _ in range(repeats):
        stopped_at: list[float] = []

        def press(record: list[float]) -> None:
            time.sleep(after_s)
            record.append(time.perf_counter())
            generator.stop.set()

        presser = threading.Thread(target=press, args=(stopped_at,))
        presser.start()
        try:
            generator.generate(params)
        except GenerationStopped:
            latencies.append(time.perf_counter() - stopped_at[0])
        presser.join()
        generator.stop.clear()
    if not latencies:
        raise RuntimeError(f"the image finished before {after_s} s: give it more steps")
    return {"stop_s": round(statistics.median(latencies), 4), "stop_max_s": round(max(latencies), 4)}


def bench_generation(
    base: str | None,
    data: Path,
    prompt: str,
    work: Path,
    resolution: int,
    steps: int = 20,
    images: int = 5,
    rank: int = 8,
) -> dict:
    """Train three adapters on `base`, then time generation with them (fp16 on a GPU, fp32 on a CPU)."""
    adapters = train_adapters(base, data, prompt, work / "generation", rank=rank)
    params = GenerationParams(prompt, seed=0, steps=steps, width=resolution, height=resolution)
    figures = time_generation(Generator(base), adapters, params, images)
    return {"dtype": "fp16" if torch.cuda.is_available() else "fp32", **figures}
