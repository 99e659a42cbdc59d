"""Training checkpoints: LoRA weights, optimizer and schedule state, RNG state and step.

Everything tensor-valued goes in safetensors and the rest in JSON, so resuming never unpickles.
Each checkpoint is written into a temporary folder and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdlora.files import atomic_replace_dir, fsync_dir

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainingState:
    step: int
    lora: dict[str, torch.Tensor]  # "unet.<peft key>" / "text_encoder.<peft key>"
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    rng: dict[str, torch.Tensor]
    ema: dict[str, Any] | None = None  # EMAModel.state_dict() when --ema is on


def save_checkpoint(folder: Path, state: TrainingState, keep: int, protect: int | None = None) -> Path:
    """Write `folder/step-N` atomically and prune all but the newest `keep` checkpoints and that of step
    `protect` (the one with the lowest validation loss)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{state.step:06d}"
    tmp = folder / f".step-{state.step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in state.lora.items()}, tmp / "lora.safetensors")
    opt_tensors, opt_json = _split_optimizer_state(state.optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file({k: v.cpu().contiguous() for k, v in state.rng.items()}, tmp / "rng.safetensors")
    info = {"step": state.step, "optimizer": opt_json, "lr_scheduler": state.lr_scheduler}
    if state.ema is not None:
        shadow = state.ema["shadow_params"]
        save_file(
            {str(i): t.detach().cpu().contiguous() for i, t in enumerate(shadow)}, tmp / "ema.safetensors"
        )
        info["ema"] = {k: v for k, v in state.ema.items() if k != "shadow_params"}
    (tmp / "state.json").write_text(json.dumps(info, indent=1))
    for file in tmp.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    fsync_dir(tmp)
    atomic_replace_dir(tmp, final)
    kept = folder / f"step-{protect:06d}" if protect is not None else None
    for old in list_checkpoints(folder)[:-keep]:
        if old != kept:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written `.tmp` folders are ignored)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path) -> TrainingState:
    info = json.loads((path / "state.json").read_text())
    return TrainingState(
        step=int(info["step"]),
        lora=load_file(path / "lora.safetensors"),
        optimizer=_join_optimizer_state(load_file(path / "optimizer.safetensors"), info["optimizer"]),
        lr_scheduler=info["lr_scheduler"],
        rng=load_file(path / "rng.safetensors"),
        ema=_load_ema(path, info.get("ema")),
    )


def _load_ema(path: Path, scalars: dict[str, Any] | None) -> dict[str, Any] | None:
    if scalars is None:
        return None
    shadow = load_file(path / "ema.safetensors")
    return {**scalars, "shadow_params": [shadow[str(i)] for i in range(len(shadow))]}


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state -> (tensors for safetensors, the JSON-able rest)."""
    tensors, scalars = {}, {}
    for param_id, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *rest["scalars"].items()]:
        param_id, key = flat.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}
