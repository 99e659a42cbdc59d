"""Shared fixtures: a tiny random base saved as a diffusers folder, small image folders, training configs,
and readers of what a training run wrote."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network anywhere in the tests
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from sdlora.adapters import AdapterFacts  # noqa: E402
from sdlora.train import train  # noqa: E402
from tests.tiny_models import save_tiny_pipeline  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    """A random SD-1.x-shaped pipeline (16 px) saved as a diffusers folder: every real loading path, in seconds."""
    return str(save_tiny_pipeline(tmp_path_factory.mktemp("bases") / "tiny-sd"))


@pytest.fixture(scope="session")
def tiny_vpred_base(tmp_path_factory) -> str:
    """The same with a v-prediction scheduler, as SD 2.x uses."""
    return str(
        save_tiny_pipeline(tmp_path_factory.mktemp("bases") / "tiny-sd-v", prediction_type="v_prediction")
    )


def draw_blob(
    path: Path, size: tuple[int, int], colour: tuple[int, int, int], caption: str | None = None
) -> Path:
    image = Image.new("RGB", size, "white")
    w, h = size
    ImageDraw.Draw(image).ellipse((w * 0.2, h * 0.2, w * 0.8, h * 0.8), fill=colour)
    image.save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


@pytest.fixture
def blob_folder(tmp_path) -> Path:
    """Four small images, one wide, one captioned."""
    folder = tmp_path / "blobs"
    folder.mkdir()
    draw_blob(folder / "a.png", (32, 32), (200, 0, 200), caption="a sks blob on a white background")
    draw_blob(folder / "b.png", (32, 32), (180, 0, 220))
    draw_blob(folder / "c.jpg", (48, 24), (220, 0, 180))
    draw_blob(folder / "d.png", (24, 24), (190, 10, 200))
    return folder


def train_config(data_dir: Path, base: str, outputs: Path, **overrides):
    """A quick CPU training config on the tiny base."""
    from sdlora.config import TrainConfig

    values = dict(
        data_dir=str(data_dir),
        prompt="a photo of sks blob",
        base=base,
        steps=4,
        rank=4,
        lr=1e-3,
        outputs=str(outputs),
    )
    values.update(overrides)
    return TrainConfig(**values)


def step_losses(result) -> list[float]:
    """The loss of every step of a finished run, from its event log."""
    from sdlora.train import read_events

    return [e["loss"] for e in read_events(result.run / "events.jsonl") if e["event"] == "step"]


def adapter_learned(path) -> torch.Tensor:
    """All LoRA up (B) weights of an adapter file, any layout: they start at zero, so they hold what
    training learned."""
    weights = load_file(path)
    return torch.cat([weights[k].flatten() for k in sorted(weights) if "lora_B" in k or "lora_up" in k])


def diffusers_mix(base: str, weights: list[tuple[Path, float]]):
    """An independent reference: a fresh pipeline with the adapter files loaded by diffusers' own
    `load_lora_weights` and mixed with `set_adapters` (LoRA applied on the fly, base untouched)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    names = []
    for index, (path, _) in enumerate(weights):
        pipe.load_lora_weights(str(path), adapter_name=f"reference{index}")
        names.append(f"reference{index}")
    pipe.set_adapters(names, adapter_weights=[w for _, w in weights])
    return pipe


@pytest.fixture(scope="session")
def two_adapters(tiny_base, tmp_path_factory) -> tuple[str, str]:
    """Two adapters trained on different data with a high learning rate, so each visibly moves the output."""
    root = tmp_path_factory.mktemp("adapters")
    paths = []
    for name, colour in (("purple", (200, 0, 200)), ("green", (0, 200, 0))):
        folder = root / name
        folder.mkdir()
        for i in range(3):
            draw_blob(folder / f"{i}.png", (16, 16), colour)
        result = train(
            train_config(folder, tiny_base, root / "out", steps=6, lr=5e-3, name=name, seed=len(paths))
        )
        paths.append(str(result.adapter))
    return paths[0], paths[1]


def fake_adapter(path: Path, facts: AdapterFacts | None = None, **metadata: str) -> Path:
    """A small .safetensors file with sdlora's header facts (or another tool's metadata)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt", **(facts.to_metadata() if facts else {}), **metadata}
    save_file({"unet.x.lora_A.weight": torch.zeros(4, 8)}, str(path), metadata=header)
    return path


FACTS = AdapterFacts(
    name="star",
    base_model="/models/demo",
    family="sd1",
    rank=4,
    alpha=2.0,
    targets="all",
    trigger_words="sks",
    steps=30,
    created="2026-01-02T03:04:05+00:00",
)
