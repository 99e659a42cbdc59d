"""The `sdlora` command: a thin face over the library. Options come from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import types
import typing
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from sdlora import __version__
from sdlora.config import (
    OUTPUTS_DIR,
    ConfigError,
    GenerateConfig,
    TrainConfig,
    build_config,
    load_toml,
    parse_size,
)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argparse option per dataclass field; defaults are left out so TOML values can fill them."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kind = _base_type(hints[f.name])
        help_text = meta["help"] + (f" (default: {f.default})" if f.default not in (None, dataclasses.MISSING, False)
                                    else "")
        if meta["positional"]:
            parser.add_argument(f.name, nargs="?", default=argparse.SUPPRESS, help=help_text)
            continue
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=meta["help"])
        elif meta["repeat"]:
            parser.add_argument(flag, action="append", default=argparse.SUPPRESS, help=help_text)
        elif meta["const"] is not None:
            parser.add_argument(flag, nargs="?", const=meta["const"], default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=kind, choices=meta["choices"], default=argparse.SUPPRESS,
                                help=help_text, metavar=f.name.upper() if not meta["choices"] else None)
    parser.add_argument("--config", dest="config_file", metavar="FILE.toml", default=argparse.SUPPRESS,
                        help="Read options from a TOML file (keys are the option names); flags override it.")


def _base_type(hint: Any) -> type:
    """`int | None` -> int, `list[str]` -> str."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return _base_type(args[0])
    if typing.get_origin(hint) is list:
        return args[0]
    return hint


def config_from_args(cls: type, args: argparse.Namespace):
    values: dict[str, Any] = {}
    given = vars(args)
    if "config_file" in given:
        values.update(load_toml(given["config_file"]))
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in given.items() if k in names})
    config = build_config(cls, values)
    config.validate()
    return config


def cmd_train(args: argparse.Namespace) -> int:
    from sdlora.train import train

    config = config_from_args(TrainConfig, args)
    if not config.base:
        _say_demo_model()
    result = train(config)
    print(f"Adapter: {result.adapter}  (run folder: {result.run}, {result.steps} steps, "
          f"final loss {result.final_loss:.4f}, {result.elapsed_s:.1f} s)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from sdlora.generate import GenerationParams, Generator, image_grid, save_png

    config: GenerateConfig = config_from_args(GenerateConfig, args)
    if not config.base:
        _say_demo_model()
    generator = Generator(config.base)
    weights = {generator.load_adapter(path): weight for path, weight in map(parse_lora_arg, config.lora)}
    width, height = parse_size(config.size) if config.size else (None, None)
    params = GenerationParams(config.prompt, config.negative_prompt, config.seed, config.steps, config.guidance,
                              width, height, config.scheduler)
    if config.sweep:
        if not weights:
            raise ConfigError("--sweep needs at least one --lora (the first one is swept).")
        sweep_weights = [float(w) for w in config.sweep.split(",")]
        image = image_grid(generator.sweep(params, next(iter(weights)), sweep_weights, weights))
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

    summary = summarize(args.file)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['file']}: {summary['tensors']} tensors, {summary['parameters']:,} parameters, "
          f"{summary['size_bytes'] / 1024:.1f} KiB, {'/'.join(summary['dtypes'])}")
    for name, part in summary["components"].items():
        print(f"  {name}: {part['keys']} keys on {part['modules']} modules, rank {part['ranks']}")
    if summary["facts"]:
        print("Training facts:")
        for key, value in summary["facts"].items():
            print(f"  {key}: {value}")
    if summary["lora_config"]:
        alphas = {k: v for k, v in summary["lora_config"].items() if k.endswith((".r", ".lora_alpha"))}
        print("LoRA config: " + ", ".join(f"{k}={v}" for k, v in sorted(alphas.items())))
    for key, value in summary["other_metadata"].items():
        print(f"  {key}: {value if len(value) < 200 else value[:200] + '…'}")
    return 0


def cmd_demo_build(args: argparse.Namespace) -> int:
    from sdlora.demo.build import main as build_main

    return build_main(args.build_args)


def _say_demo_model() -> None:
    print("Using the bundled demo model (tiny, draws coloured shapes at 32 px). "
          "For real work pass --base with a hub id, a diffusers folder or a .safetensors checkpoint.",
          file=sys.stderr)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlora", description="Train and use Stable Diffusion LoRA adapters.")
    parser.add_argument("--version", action="version", version=f"sdlora {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Show library logging.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="Train a LoRA adapter from a folder of images.")
    add_config_arguments(train, TrainConfig)
    train.set_defaults(handler=cmd_train)

    generate = commands.add_parser("generate", help="Generate images, optionally with stacked adapters.")
    add_config_arguments(generate, GenerateConfig)
    generate.set_defaults(handler=cmd_generate)

    inspect = commands.add_parser("inspect", help="Show an adapter file's metadata and keys.")
    inspect.add_argument("file", help="Adapter .safetensors file.")
    inspect.add_argument("--json", action="store_true", help="Print JSON.")
    inspect.set_defaults(handler=cmd_inspect)

    demo = commands.add_parser("demo-model", help="The bundled demo base model.")
    demo_commands = demo.add_subparsers(dest="demo_command", required=True)
    build = demo_commands.add_parser("build", help="Rebuild the demo model from scratch (options: --help).",
                                     add_help=False)
    build.add_argument("build_args", nargs=argparse.REMAINDER)
    build.set_defaults(handler=cmd_demo_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        _quiet_libraries()
    from sdlora.adapters import AdapterError
    from sdlora.data import DataError
    from sdlora.models import BaseModelError
    from sdlora.train import TrainingError

    try:
        return args.handler(args)
    except (ConfigError, DataError, BaseModelError, AdapterError, TrainingError) as error:
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
