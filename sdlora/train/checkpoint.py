"""Training checkpoints: LoRA weights, optimizer and schedule state, RNG state and step.

Everything tensor-valued goes in safetensors and the rest in JSON, so resuming never unpickles.
Each checkpoint is written into a temporary folder and renamed into place when complete (`atomic_folder`); a
write that fails (a full or read-only disk) removes the temporary folder and raises `DiskError` naming the
last good one.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from sdlora.files import atomic_folder

_STEP_DIR = re.compile(r"^step-(\d+)$")
# A checkpoint is complete only with all of these; state.json is written last.
CHECKPOINT_FILES = ("lora.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


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
    `protect` (the one with the lowest validation loss).

    On a full or read-only disk nothing half-written is left and `DiskError` says which checkpoint is the
    newest complete one."""
    final = folder / f"step-{state.step:06d}"
    with atomic_folder(final, _kept(folder)) as tmp:
        _write_state(tmp, state)
    kept = folder / f"step-{protect:06d}" if protect is not None else None
    for old in list_checkpoints(folder)[:-keep]:
        if old != kept:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_state(tmp: Path, state: TrainingState) -> None:
    # Serialised in memory and written by Python (the LoRA and its optimizer state are small), so a full
    # disk is an OSError with its errno rather than safetensors' own error type.
    opt_tensors, opt_json = _split_optimizer_state(state.optimizer)
    tensors = {
        "lora.safetensors": {k: v.detach().cpu().contiguous() for k, v in state.lora.items()},
        "optimizer.safetensors": opt_tensors,
        "rng.safetensors": {k: v.cpu().contiguous() for k, v in state.rng.items()},
    }
    info = {"step": state.step, "optimizer": opt_json, "lr_scheduler": state.lr_scheduler}
    if state.ema is not None:
        shadow = state.ema["shadow_params"]
        tensors["ema.safetensors"] = {str(i): t.detach().cpu().contiguous() for i, t in enumerate(shadow)}
        info["ema"] = {k: v for k, v in state.ema.items() if k != "shadow_params"}
    for name, values in tensors.items():
        (tmp / name).write_bytes(save(values))
    (tmp / "state.json").write_text(json.dumps(info, indent=1))


def _kept(folder: Path) -> str:
    """What a failed checkpoint leaves to resume from, for the error message."""
    complete = list_checkpoints(folder)
    if complete:
        return (
            f"The checkpoint was not written; the last good one is {complete[-1]} (continue with --resume)."
        )
    return "The checkpoint was not written; there is no earlier one."


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first: half-written `.tmp` folders and folders missing a file (copied
    in part, or left by an older version) are ignored, so resume never picks one up."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if _complete(p)]


def _complete(path: Path) -> bool:
    try:
        return all((path / name).stat().st_size > 0 for name in CHECKPOINT_FILES)
    except OSError:
        return False


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
