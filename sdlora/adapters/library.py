"""The adapter library: the .safetensors files under ``outputs/adapters``, trained here or imported.

The app's Adapters tab and `sdlora adapters` both work through these functions. Adapters are known by their
file stem. Every path is built from a `safe_name` inside the adapters folder and checked to stay there, so
no name typed into the page or the command line can read or write anything outside outputs/.
A preview image travels with an adapter as a same-stem ``.png`` beside it once it has been renamed;
until then it is found in the run folder that trained it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sdlora.adapters.files import AdapterError, AdapterFacts, read_metadata
from sdlora.files import atomic_copy, disk_errors, safe_name
from sdlora.models import base_label
from sdlora.outputs import ADAPTER_SUFFIX, Outputs

PREVIEW_SUFFIX = ".png"


@dataclass
class AdapterInfo:
    """What the library table shows about one adapter file."""

    name: str
    path: Path
    base: str = ""
    rank: str = ""
    alpha: str = ""
    trigger_words: str = ""
    steps: str = ""
    created: str = ""
    sample: Path | None = None

    def row(self) -> list[str]:
        return [self.name, self.base, self.rank, self.alpha, self.trigger_words, self.steps, self.created]


COLUMNS = ["name", "base", "rank", "alpha", "trigger words", "steps", "created"]


def adapter_path(outputs: Outputs, name: str) -> Path:
    """The file of the adapter called `name`; AdapterError if there is none (or the name is not a plain name)."""
    path = outputs.adapter_file(name)
    if not name or safe_name(name) != name or not path.is_file():
        raise AdapterError(f"No adapter called {name!r} in {outputs.adapters}.")
    return path


def adapter_names(outputs: Outputs) -> list[str]:
    folder = outputs.adapters
    return sorted(p.stem for p in folder.glob("*" + ADAPTER_SUFFIX) if p.is_file()) if folder.is_dir() else []


def list_adapters(outputs: Outputs) -> list[AdapterInfo]:
    runs = runs_by_adapter(outputs)  # read once for the whole table, not once per adapter
    return [describe(adapter_path(outputs, name), outputs, runs) for name in adapter_names(outputs)]


def describe(path: Path, outputs: Outputs, runs: dict[Path, list[Path]] | None = None) -> AdapterInfo:
    """The facts sdlora wrote into the file's header; for files from other tools, what their header says."""
    info = AdapterInfo(path.stem, path, sample=find_sample(path, outputs, runs))
    try:
        metadata = read_metadata(path)
    except AdapterError:
        info.base = "(unreadable file)"
        return info
    facts = AdapterFacts.from_metadata(metadata)
    if facts is not None:
        info.base = base_label(facts.base_model)
        info.rank, info.alpha, info.steps = str(facts.rank), f"{facts.alpha:g}", str(facts.steps)
        info.trigger_words, info.created = facts.trigger_words, facts.created.replace("T", " ")[:16]
        return info
    # Not trained by sdlora: diffusers' LoRA config header, or kohya's training keys.
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        config = {}
    info.rank = str(config.get("unet.r", metadata.get("ss_network_dim", "")))
    info.alpha = str(config.get("unet.lora_alpha", metadata.get("ss_network_alpha", "")))
    info.base = metadata.get("ss_sd_model_name", "")
    info.trigger_words = metadata.get("modelspec.trigger_phrase", "")
    return info


def find_sample(path: Path, outputs: Outputs, runs: dict[Path, list[Path]] | None = None) -> Path | None:
    """The adapter's preview: its same-stem .png, else the newest sample of the run that wrote the file."""
    preview = path.with_suffix(PREVIEW_SUFFIX)
    if preview.is_file():
        return preview
    runs = runs_by_adapter(outputs) if runs is None else runs
    for run in runs.get(path.resolve(), []):
        samples = sorted((run / "samples").glob("*.png"))
        if samples:
            return samples[-1]
    return None


def runs_by_adapter(outputs: Outputs) -> dict[Path, list[Path]]:
    """Run folders by the adapter file they wrote (resolved), newest first."""
    runs: dict[Path, list[Path]] = {}
    for config_path in sorted(outputs.runs.glob("*/config.json"), reverse=True):
        try:
            written = json.loads(config_path.read_text(encoding="utf-8")).get("adapter")
        except (OSError, json.JSONDecodeError):
            continue
        if written:
            runs.setdefault(Path(written).resolve(), []).append(config_path.parent)
    return runs


def unique_name(outputs: Outputs, wanted: str, taken: Iterable[str] = ()) -> str:
    """`wanted` made safe, with a _2, _3... suffix if an adapter (or a name in `taken`) already has it."""
    name = base = safe_name(wanted)
    used = set(taken) | set(adapter_names(outputs))
    suffix = 1
    while name in used:
        suffix += 1
        name = f"{base}_{suffix}"
    return name


def import_adapter(upload: str | Path, outputs: Outputs) -> Path:
    """Copy an uploaded .safetensors adapter into the library under a free name; other files are refused."""
    upload = Path(upload)
    shown = upload.name
    if upload.suffix.lower() != ADAPTER_SUFFIX:
        raise AdapterError(
            f"{shown}: only .safetensors adapter files can be imported "
            "(.ckpt, .pt and .bin files are pickles, which can run code when loaded)."
        )
    read_metadata(upload)  # a clear error for a renamed or damaged file
    name = unique_name(outputs, Path(shown).stem)
    return atomic_copy(upload, outputs.adapter_file(name))


def rename_adapter(outputs: Outputs, name: str, new_name: str) -> Path:
    """Rename an adapter (and its preview); the new name is made safe and must be free."""
    path = adapter_path(outputs, name)
    new = safe_name(new_name, default="")
    if not new:
        raise AdapterError("Give the adapter a new name (letters, digits, '.', '_' or '-').")
    if new == name:
        return path
    target = outputs.adapter_file(new)
    if target.exists():
        raise AdapterError(f"There is already an adapter called {new!r}.")
    sample = find_sample(path, outputs)
    with disk_errors(outputs.adapters, f"{name!r} keeps its name."):
        path.rename(target)
    if sample is not None:
        preview = target.with_suffix(PREVIEW_SUFFIX)
        with disk_errors(outputs.adapters, f"The adapter is renamed to {new!r}, without its preview image."):
            if sample == path.with_suffix(PREVIEW_SUFFIX):
                sample.rename(preview)
            else:
                atomic_copy(sample, preview)
    return target


def delete_adapter(outputs: Outputs, name: str) -> None:
    """Delete an adapter file and its preview (the run folder that trained it is kept)."""
    path = adapter_path(outputs, name)
    with disk_errors(outputs.adapters, f"{name!r} was not deleted."):
        path.unlink()
        path.with_suffix(PREVIEW_SUFFIX).unlink(missing_ok=True)
