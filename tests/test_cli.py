"""The command line: train -> generate with stacked adapters -> inspect, options from flags and TOML."""

from __future__ import annotations

import json

from PIL import Image

from sdlora.cli import main, parse_lora_arg
from tests.conftest import draw_blob


def test_train_generate_inspect(tiny_base, blob_folder, tmp_path, capsys):
    out = tmp_path / "outputs"
    adapter = tmp_path / "blob.safetensors"
    code = main(
        [
            "train",
            str(blob_folder),
            "--prompt",
            "a photo of sks blob",
            "--base",
            tiny_base,
            "--steps",
            "2",
            "--rank",
            "4",
            "--alpha",
            "8",
            "--outputs",
            str(out),
            "--out",
            str(adapter),
            "--text-encoder",
        ]
    )
    assert code == 0 and adapter.is_file()
    assert "Adapter:" in capsys.readouterr().out

    toml = tmp_path / "job.toml"
    toml.write_text(
        f'data_dir = "{blob_folder}"\nprompt = "a sks blob"\nbase = "{tiny_base}"\nsteps = 1\n'
        f'outputs = "{out}"\nname = "second"\nsample-prompt = ["a blob"]\nsample_every = 1\n'
    )
    assert main(["train", "--config", str(toml), "--rank", "2"]) == 0
    second = out / "adapters" / "second.safetensors"
    assert second.is_file()

    image_path = tmp_path / "cmp.png"
    code = main(
        [
            "generate",
            "a photo of sks blob",
            "--base",
            tiny_base,
            "--lora",
            f"{adapter}:0.7",
            "--lora",
            str(second),
            "--steps",
            "2",
            "--seed",
            "3",
            "--compare",
            "--out",
            str(image_path),
        ]
    )
    assert code == 0
    grid = Image.open(image_path)
    assert grid.width == 4 * 128  # base, each adapter, mix
    assert "Lora: blob:0.7" in grid.info["parameters"]

    capsys.readouterr()
    assert main(["inspect", str(adapter), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["facts"]["rank"] == 4 and summary["facts"]["alpha"] == 8.0
    assert set(summary["components"]) == {"unet", "text_encoder"}
    assert main(["inspect", str(adapter)]) == 0
    assert "trigger_words" in capsys.readouterr().out


def test_resume_flag_and_errors(tiny_base, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    draw_blob(data / "a.png", (16, 16), (0, 0, 255))
    out = tmp_path / "outputs"
    args = [
        "train",
        str(data),
        "--prompt",
        "sks",
        "--base",
        tiny_base,
        "--outputs",
        str(out),
        "--save-every",
        "1",
    ]
    assert main([*args, "--steps", "1"]) == 0
    assert main([*args, "--steps", "2", "--resume"]) == 0
    runs = list((out / "runs").iterdir())
    assert len(runs) == 1  # the resumed run continued in the same folder

    capsys.readouterr()
    assert main(["train", str(data), "--rank", "0", "--base", tiny_base]) == 2
    assert "--rank" in capsys.readouterr().err
    assert main(["generate", "x", "--base", "nobody/none"]) == 2
    assert "nobody/none" in capsys.readouterr().err


def test_lora_argument_parsing():
    assert parse_lora_arg("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_arg("C:\\loras\\a.safetensors") == ("C:\\loras\\a.safetensors", 1.0)
    assert parse_lora_arg("b.safetensors:-1") == ("b.safetensors", -1.0)
