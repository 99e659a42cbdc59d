"""The `sdlora` command: a thin face over the library. Options come from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import threading
import types
import typing
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sdlora import __version__
from sdlora.compat import check_stack
from sdlora.config import (
    FILE_FORMATS,
    FORMATS,
    OUTPUTS_DIR,
    ConfigError,
    GenerateConfig,
    TrainConfig,
    build_config,
    load_toml,
    parse_size,
    parse_weights,
)
from sdlora.errors import SdloraError
from sdlora.outputs import Outputs
from sdlora.presets import PRESETS, preset_family, preset_name, preset_values


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argparse option per dataclass field; defaults are left out so TOML values can fill them."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kind = _base_type(hints[f.name])
        help_text = meta["help"] + (
            f" (default: {f.default})" if f.default not in (None, dataclasses.MISSING, False) else ""
        )
        if meta["positional"]:
            parser.add_argument(f.name, nargs="?", default=argparse.SUPPRESS, help=help_text)
            continue
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=meta["help"]
            )
        elif meta["repeat"]:
            parser.add_argument(flag, action="append", default=argparse.SUPPRESS, help=help_text)
        elif meta["const"] is not None:
            parser.add_argument(
                flag, nargs="?", const=meta["const"], default=argparse.SUPPRESS, help=help_text
            )
        else:
            parser.add_argument(
                flag,
                type=kind,
                choices=meta["choices"],
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=f.name.upper() if not meta["choices"] else None,
            )
    parser.add_argument(
        "--config",
        dest="config_file",
        metavar="FILE.toml",
        default=argparse.SUPPRESS,
        help="Read options from a TOML file (keys are the option names); flags override it.",
    )


def _base_type(hint: Any) -> type:
    """`int | None` -> int, `list[str]` -> str."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return _base_type(args[0])
    if typing.get_origin(hint) is list:
        return args[0]
    return hint


def given_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The options the user set: the --config TOML file's, with flags over them."""
    values: dict[str, Any] = {}
    given = vars(args)
    if "config_file" in given:
        values.update(load_toml(given["config_file"]))
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in given.items() if k in names})
    return values


def checked_config(cls: type, values: dict[str, Any]):
    config = build_config(cls, values)
    config.validate()
    return config


def config_from_args(cls: type, args: argparse.Namespace):
    return checked_config(cls, given_values(cls, args))


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A preset's settings under the user's own; a .zip as the data folder is unpacked into outputs/uploads."""
    values = given_values(TrainConfig, args)
    if args.preset:
        values = {**preset_values(args.preset, preset_family(values.get("base"))), **values}
        if PRESETS[args.preset].prior and not values.get("class_prompt"):
            print(
                f"The {args.preset} preset is meant with prior preservation: "
                "add --class-prompt (e.g. 'a photo of a dog').",
                file=sys.stderr,
            )
    data = values.get("data_dir")
    if not (data and str(data).lower().endswith(".zip") and Path(data).is_file()):
        return checked_config(TrainConfig, values)
    from sdlora.data.uploads import stage_upload

    staged = stage_upload([data], Outputs(values.get("outputs", OUTPUTS_DIR)))
    for reason in staged.skipped:
        print(f"Left out {reason}", file=sys.stderr)
    try:
        return checked_config(TrainConfig, {"name": staged.name, **values, "data_dir": str(staged.folder)})
    except SdloraError:
        shutil.rmtree(staged.folder, ignore_errors=True)
        raise


def cmd_train(args: argparse.Namespace) -> int:
    from sdlora.train import train
    from sdlora.train.runs import RunFolder

    config = train_config_from_args(args)
    if not config.base:
        _say_demo_model()
    cancel = threading.Event()
    with cancel_on_interrupt(cancel):
        result = train(config, cancel=cancel)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun / accelerate launch, the main process reports
    if result.cancelled:
        checkpoint = RunFolder(result.run).latest_checkpoint()
        then = f"continue with --resume {result.run}" if checkpoint else "run it again to start over"
        print(f"Cancelled after {result.steps} steps (run folder: {result.run}); {then}.")
        return 0  # stopped as asked, keeping what it made (the multi-process launcher counts on it)
    print(
        f"Adapter: {result.adapter}  (run folder: {result.run}, {result.steps} steps, "
        f"final loss {result.final_loss:.4f}, {result.elapsed_s:.1f} s)"
    )
    return 0


@contextmanager
def cancel_on_interrupt(cancel: threading.Event) -> Iterator[None]:
    """The first Ctrl+C sets `cancel`: training stops after its step, or between class or sample images,
    and keeps a checkpoint; a second Ctrl+C stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ask(signum: int, frame: types.FrameType | None) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        print("\nStopping after this step or image; press Ctrl+C again to quit at once.", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, ask)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_generate(args: argparse.Namespace) -> int:
    from sdlora.generate import GenerationParams, Generator, image_grid, save_png

    config: GenerateConfig = config_from_args(GenerateConfig, args)
    if not config.base:
        _say_demo_model()
    generator = Generator(config.base, adapter_dir=OUTPUTS_DIR / "adapters")
    weights = {generator.load_adapter(path): weight for path, weight in map(parse_lora_arg, config.lora)}
    for name in weights:
        for module, reason in generator.skipped(name)[:20]:
            print(f"note: {name.removeprefix('lora_')}: skipped {module} ({reason})", file=sys.stderr)
    width, height = parse_size(config.size) if config.size else (None, None)
    params = GenerationParams(
        config.prompt,
        config.negative_prompt,
        config.seed,
        config.steps,
        config.guidance,
        width,
        height,
        config.scheduler,
    )
    if config.sweep:
        if not weights:
            raise ConfigError("--sweep needs at least one --lora (the first one is swept).")
        image = image_grid(generator.sweep(params, next(iter(weights)), parse_weights(config.sweep), weights))
    elif config.compare:
        image = image_grid(generator.compare(params, weights))
    else:
        image = generator.generate(params, weights)
    out = Path(config.out) if config.out else OUTPUTS_DIR / "images" / f"{datetime.now():%Y%m%d-%H%M%S}.png"
    save_png(image, out)
    print(f"Image: {out}")
    return 0


def parse_lora_arg(text: str) -> tuple[str, float]:
    """'style.safetensors:0.7' -> ('style.safetensors', 0.7); the weight defaults to 1."""
    path, sep, weight = text.rpartition(":")
    if sep:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def cmd_inspect(args: argparse.Namespace) -> int:
    from sdlora.adapters import summarize

    pipe = None
    if args.base is not None:
        from sdlora.models import load_base

        pipe = load_base(args.base or None)
    summary = summarize(args.file, pipe)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"{summary['file']}: {summary['format']} layout, for {summary['family']}; {summary['modules']} modules, "
        f"{summary['parameters']:,} parameters, {summary['size_bytes'] / 1024:.1f} KiB"
    )
    print(f"  network types: {_counts(summary['types'])}; every tensor understood")
    for name, part in summary["components"].items():
        print(
            f"  {name}: {part['modules']} modules ({_counts(part['types'])}), rank {_counts(part['ranks'])}, "
            f"alpha {_counts(part['alphas'])}"
        )
    if args.modules:
        for name, part in summary["components"].items():
            for module, info in part["per_module"].items():
                alpha = "none" if info["alpha"] is None else f"{info['alpha']:g}"
                print(f"    {name}.{module}: {info['type']}, {info['sizes']}, alpha {alpha}")
    if summary["facts"]:
        print("Training facts:")
        for key, value in summary["facts"].items():
            print(f"  {key}: {value}")
    for key, value in summary["other_metadata"].items():
        print(f"  {key}: {value if len(value) < 200 else value[:200] + '…'}")
    fit = summary.get("compatibility")
    if fit:
        mapped = ", ".join(f"{k} {v}" for k, v in fit["mapped"].items())
        verdict = (
            "DOES NOT FIT" if not fit["ok"] else "fits, some modules skipped" if fit["unmapped"] else "fits"
        )
        print(
            f"Against the base ({fit['base_family']}): {verdict}; "
            f"modules mapped: {mapped}; not in the base: {len(fit['unmapped'])}"
        )
        for line in fit["unmapped"][:20]:
            print(f"  {'skipped' if fit['ok'] else 'does not fit'}: {line}")
        return 0 if fit["ok"] else 1
    return 0


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(value if len(counts) == 1 else f"{value} (x{n})" for value, n in counts.items())


def cmd_convert(args: argparse.Namespace) -> int:
    from sdlora.adapters import read_lora, write_lora

    lora = read_lora(args.input)
    out = write_lora(lora, args.output, args.to)
    print(f"{args.input} ({lora.format}, {len(lora.modules)} modules) -> {out} ({args.to})")
    return 0


PRECISIONS = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}  # torch dtypes, imported late


def cmd_merge(args: argparse.Namespace) -> int:
    from sdlora.adapters import read_lora, write_lora
    from sdlora.adapters.merge import merge_loras
    from sdlora.generate import fuse_into_base

    adapters = [parse_lora_arg(text) for text in args.adapters]
    if args.into_model:
        import torch

        out = fuse_into_base(args.base, adapters, args.out, dtype=getattr(torch, PRECISIONS[args.precision]))
        kind = "single file" if out.suffix == ".safetensors" else "diffusers folder"
        print(f"Full model with {len(adapters)} adapter(s) fused: {out} ({kind})")
        return 0
    if not args.out.endswith(".safetensors"):
        raise ConfigError("--out must be a .safetensors file when merging LoRAs (or pass --into-model).")
    merged, report = merge_loras([(read_lora(path), weight) for path, weight in adapters], rank=args.rank)
    write_lora(merged, args.out, args.format)
    how = f"SVD to rank {report.rank}" if report.rank else "concatenated ranks (exact)"
    print(
        f"Merged {len(adapters)} adapters into {args.out}: {how}; relative error max "
        f"{report.max_relative_error:.2e}, mean {report.mean_relative_error:.2e}"
    )
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from sdlora.adapters import write_lora
    from sdlora.adapters.extract import extract_lora
    from sdlora.models import load_base

    if not args.out.endswith(".safetensors"):
        raise ConfigError("--out must be a .safetensors file.")
    tuned = load_base(args.tuned, prediction_type=args.prediction_type)
    base = load_base(args.base, prediction_type=args.prediction_type)
    lora, report = extract_lora(tuned, base, args.rank, conv_rank=args.conv_rank, min_diff=args.min_diff)
    write_lora(lora, args.out, "kohya")
    errors = sorted(report.errors.items(), key=lambda item: -item[1])
    shown = errors if args.modules else errors[:10]
    for module, error in shown:
        print(f"  {module}: rank {report.ranks[module]}, relative error {error:.3e}")
    if len(shown) < len(errors):
        print(f"  ... {len(errors) - len(shown)} more with smaller errors (--modules lists all)")
    left_out = f"{report.unchanged} unchanged layers left out"
    if report.skipped_convs:
        left_out += f", {report.skipped_convs} changed k x k convolutions left out (--conv-rank 0)"
    print(
        f"Extracted {len(errors)} modules at rank {args.rank} into {args.out}: relative error max "
        f"{report.max_error:.3e}, mean {report.mean_error:.3e}; {left_out}."
    )
    return 0


def cmd_adapters_list(args: argparse.Namespace) -> int:
    from sdlora.adapters.library import COLUMNS, list_adapters

    outputs = Outputs(args.outputs)
    rows = [info.row() for info in list_adapters(outputs)]
    print(_table(COLUMNS, rows) if rows else f"No adapters in {outputs.adapters}.")
    return 0


def cmd_adapters_rename(args: argparse.Namespace) -> int:
    from sdlora.adapters.library import rename_adapter

    path = rename_adapter(Outputs(args.outputs), args.old, args.new)
    print(f"{args.old} -> {path.stem}: {path}")
    return 0


def cmd_adapters_delete(args: argparse.Namespace) -> int:
    from sdlora.adapters.library import delete_adapter

    delete_adapter(Outputs(args.outputs), args.name)
    print(f"Deleted {args.name} (the run folder that trained it is kept).")
    return 0


def cmd_adapters_import(args: argparse.Namespace) -> int:
    from sdlora.adapters.library import import_adapter

    path = import_adapter(args.file, Outputs(args.outputs))
    print(f"Imported {args.file} as {path.stem}: {path}")
    return 0


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, as wide as their widest cell."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = [headers, ["-" * width for width in widths], *rows]
    return "\n".join(
        "  ".join(f"{cell:<{w}}" for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def cmd_ui(args: argparse.Namespace) -> int:
    try:
        from ui.__main__ import main as ui_main
    except ImportError as error:
        raise ConfigError(
            f"The app needs the ui package next to sdlora (run from the project folder): {error}"
        ) from error
    ui_main(args.rest)
    return 0


def cmd_demo_build(args: argparse.Namespace) -> int:
    from sdlora.demo.build import main as build_main

    build_main(args.rest)
    return 0


def _say_demo_model() -> None:
    print(
        "Using the bundled demo model (tiny, draws coloured shapes at 32 px). "
        "For real work pass --base with a hub id, a diffusers folder or a .safetensors checkpoint.",
        file=sys.stderr,
    )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdlora", description="Train and use Stable Diffusion LoRA adapters."
    )
    parser.add_argument("--version", action="version", version=f"sdlora {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Show library logging.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="Train a LoRA adapter from a folder (or a .zip) of images.")
    add_config_arguments(train, TrainConfig)
    train.add_argument(
        "--preset",
        type=preset_name,
        choices=list(PRESETS),
        default=None,
        help="Start from the settings for one kind of adapter: "
        + "; ".join(f"{name}: {preset.help}" for name, preset in PRESETS.items())
        + ". Case and '-' for spaces don't matter (quick-test); --config and flags override it, and it is "
        "scaled down for the demo model.",
    )
    train.set_defaults(handler=cmd_train)

    generate = commands.add_parser("generate", help="Generate images, optionally with stacked adapters.")
    add_config_arguments(generate, GenerateConfig)
    generate.set_defaults(handler=cmd_generate)

    inspect = commands.add_parser(
        "inspect",
        help="What an adapter is for, its metadata, ranks and alphas; "
        "with --base, whether it fits that base.",
    )
    inspect.add_argument("file", help="Adapter .safetensors file (any layout) or peft folder.")
    inspect.add_argument(
        "--base",
        nargs="?",
        const="",
        default=None,
        help="Check every module against this base (bare --base: the demo model).",
    )
    inspect.add_argument("--modules", action="store_true", help="List rank and alpha per module.")
    inspect.add_argument("--json", action="store_true", help="Print JSON.")
    inspect.set_defaults(handler=cmd_inspect)

    convert = commands.add_parser("convert", help="Rewrite an adapter in another layout (true alpha kept).")
    convert.add_argument("input", help="Adapter file or peft folder, any layout.")
    convert.add_argument(
        "--to",
        required=True,
        choices=FORMATS,
        help="kohya: AUTOMATIC1111/ComfyUI; diffusers: load_lora_weights; peft: a folder.",
    )
    convert.add_argument("output", help="Output .safetensors file (or folder for peft).")
    convert.set_defaults(handler=cmd_convert)

    merge = commands.add_parser(
        "merge", help="Merge adapters at weights into one LoRA, or into a full model."
    )
    merge.add_argument("adapters", nargs="+", metavar="FILE[:WEIGHT]")
    merge.add_argument(
        "--out",
        required=True,
        help="Merged LoRA (.safetensors) or, with --into-model, a model file (.safetensors) or folder.",
    )
    merge.add_argument(
        "--rank",
        type=int,
        default=None,
        help="Re-factorise to this rank by SVD (reports the error); default: concatenate ranks.",
    )
    merge.add_argument("--format", choices=FILE_FORMATS, default="kohya", help="Layout of the merged LoRA.")
    merge.add_argument(
        "--into-model",
        action="store_true",
        help="Fuse into the base and save the full model: one original-layout .safetensors file "
        "(A1111, Forge, ComfyUI) when --out ends in .safetensors, else a diffusers folder.",
    )
    merge.add_argument("--base", default=None, help="Base for --into-model (default: the demo model).")
    merge.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="fp16",
        help="Weights of a --into-model single file (default: fp16, as shared checkpoints are).",
    )
    merge.set_defaults(handler=cmd_merge)

    extract = commands.add_parser(
        "extract", help="Extract a LoRA from a fine-tuned model and its base (SVD of the weight changes)."
    )
    extract.add_argument("tuned", help="The fine-tuned model: .safetensors file, diffusers folder or hub id.")
    extract.add_argument("base", help="The model it was tuned from.")
    extract.add_argument("--rank", type=int, required=True, help="LoRA rank of every linear layer.")
    extract.add_argument(
        "--conv-rank",
        type=int,
        default=None,
        help="Rank of 3x3 convolutions (LoCon); default: --rank; 0 leaves them out.",
    )
    extract.add_argument(
        "--min-diff",
        type=float,
        default=0.0,
        help="Leave out layers whose largest weight change is at most this (default 0: unchanged ones).",
    )
    extract.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction"],
        default=None,
        help="For single files that don't say (SD 2.x files are taken as 768-v).",
    )
    extract.add_argument("--out", required=True, help="The LoRA file (.safetensors, kohya layout).")
    extract.add_argument("--modules", action="store_true", help="Print every module's error.")
    extract.set_defaults(handler=cmd_extract)

    library = argparse.ArgumentParser(add_help=False)
    library.add_argument(
        "--outputs", default=str(OUTPUTS_DIR), help=f"The outputs folder (default: {OUTPUTS_DIR})."
    )
    adapters = commands.add_parser("adapters", help="The adapter library in OUTPUTS/adapters.")
    adapter_commands = adapters.add_subparsers(dest="adapters_command", required=True)
    listing = adapter_commands.add_parser(
        "list", parents=[library], help="A table of the adapters with their training facts."
    )
    listing.set_defaults(handler=cmd_adapters_list)
    rename = adapter_commands.add_parser(
        "rename", parents=[library], help="Rename an adapter (and its preview image)."
    )
    rename.add_argument("old", help="The adapter's name (its file name without .safetensors).")
    rename.add_argument("new", help="The new name; it must be free.")
    rename.set_defaults(handler=cmd_adapters_rename)
    delete = adapter_commands.add_parser(
        "delete", parents=[library], help="Delete an adapter file and its preview."
    )
    delete.add_argument("name", help="The adapter's name.")
    delete.set_defaults(handler=cmd_adapters_delete)
    importer = adapter_commands.add_parser(
        "import", parents=[library], help="Copy a .safetensors adapter into the library under a free name."
    )
    importer.add_argument("file", help="A .safetensors adapter file (any layout).")
    importer.set_defaults(handler=cmd_adapters_import)

    ui = commands.add_parser(
        "ui", help="Serve the web app on 127.0.0.1:7860 (options: sdlora ui --help).", add_help=False
    )
    ui.set_defaults(handler=cmd_ui, passthrough=True)

    demo = commands.add_parser("demo-model", help="The bundled demo base model.")
    demo_commands = demo.add_subparsers(dest="demo_command", required=True)
    build = demo_commands.add_parser(
        "build", help="Rebuild the demo model from scratch (options: --help).", add_help=False
    )
    build.set_defaults(handler=cmd_demo_build, passthrough=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest  # `ui` and `demo-model build` hand their options to their own parsers
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        _quiet_libraries()
    try:
        check_stack()
        return args.handler(args)
    except SdloraError as error:
        print(f"sdlora: error: {error}", file=sys.stderr)
        return 2


def _quiet_libraries() -> None:
    """Hide the loaders' progress bars and deprecation chatter; sdlora's own messages still show."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


if __name__ == "__main__":
    raise SystemExit(main())
