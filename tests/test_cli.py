"""The command line: train -> generate with stacked adapters -> inspect, options from flags and TOML;
presets and zips for training; the adapter library."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from sdlora.cli import main, make_parser, parse_lora_arg, train_config_from_args
from sdlora.presets import preset_values
from tests.conftest import FACTS, draw_blob, fake_adapter


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


def parsed_train_config(*argv: str):
    return train_config_from_args(make_parser().parse_args(["train", *argv]))


def test_a_preset_fills_the_settings_and_flags_override_it(tiny_base, blob_folder):
    config = parsed_train_config(
        str(blob_folder), "--base", tiny_base, "--preset", "quick-test", "--rank", "2"
    )
    expected = {**preset_values("Quick test", "sd1"), "rank": 2}  # the tiny base counts as SD 1.x
    assert {k: getattr(config, k) for k in expected} == expected


def test_the_demo_model_gets_the_demo_presets(blob_folder, capsys):
    config = parsed_train_config(str(blob_folder), "--preset", "Subject")
    assert (config.steps, config.lr, config.num_class_images, config.batch_size) == (600, 1e-3, 16, 4)
    assert "meant with prior preservation: add --class-prompt" in capsys.readouterr().err


def test_a_toml_file_overrides_a_preset(tiny_base, blob_folder, tmp_path):
    toml = tmp_path / "job.toml"
    toml.write_text("steps = 7\n")
    config = parsed_train_config(
        str(blob_folder), "--base", tiny_base, "--preset", "Style", "--config", str(toml)
    )
    assert (config.steps, config.rank) == (7, 32)


def test_train_with_a_preset(tiny_base, blob_folder, tmp_path):
    out = tmp_path / "outputs"
    argv = [
        "train",
        str(blob_folder),
        "--prompt",
        "sks",
        "--base",
        tiny_base,
        "--preset",
        "Style",
        "--steps",
        "1",
    ]
    assert main([*argv, "--outputs", str(out), "--name", "styled"]) == 0
    (run,) = (out / "runs").iterdir()
    recorded = json.loads((run / "config.json").read_text())
    assert (recorded["rank"], recorded["alpha"], recorded["steps"]) == (32, 16, 1)


def test_train_on_a_zip(tiny_base, blob_folder, tmp_path, capsys):
    archive = tmp_path / "sks blobs.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in blob_folder.iterdir():
            zipped.write(path, path.name)
    out = tmp_path / "outputs"
    argv = ["train", str(archive), "--prompt", "a sks blob", "--base", tiny_base, "--steps", "1"]
    assert main([*argv, "--outputs", str(out)]) == 0
    (upload,) = (out / "uploads").iterdir()
    assert upload.name.startswith("sks_blobs-") and len(list(upload.glob("*.png"))) == 3
    assert (out / "adapters" / "sks_blobs.safetensors").is_file()
    assert "Adapter:" in capsys.readouterr().out


def test_a_zip_with_settings_errors_leaves_no_upload_behind(blob_folder, tmp_path, capsys):
    archive = tmp_path / "blobs.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(blob_folder / "a.png", "a.png")
    out = tmp_path / "outputs"
    assert main(["train", str(archive), "--rank", "0", "--outputs", str(out)]) == 2
    assert "--rank" in capsys.readouterr().err and list((out / "uploads").iterdir()) == []


@pytest.fixture
def library(tmp_path) -> Path:
    """An outputs folder with one adapter trained by sdlora ('star') and one from another tool."""
    out = tmp_path / "outputs"
    fake_adapter(out / "adapters" / "star.safetensors", FACTS)
    fake_adapter(out / "adapters" / "other.safetensors", ss_network_dim="16", ss_network_alpha="8")
    return out


def test_adapters_list_prints_a_table(library, capsys):
    assert main(["adapters", "list", "--outputs", str(library)]) == 0
    header, rule, other, star = capsys.readouterr().out.splitlines()
    assert header.split() == ["name", "base", "rank", "alpha", "trigger", "words", "steps", "created"]
    assert set(rule) == {"-", " "}
    assert other.split() == ["other", "16", "8"]
    assert star.split() == ["star", "demo", "4", "2", "sks", "30", "2026-01-02", "03:04"]


def test_adapters_list_of_an_empty_library(tmp_path, capsys):
    assert main(["adapters", "list", "--outputs", str(tmp_path)]) == 0
    assert "No adapters in" in capsys.readouterr().out


def test_adapters_rename(library, capsys):
    assert main(["adapters", "rename", "star", "my star", "--outputs", str(library)]) == 0
    assert (library / "adapters" / "my_star.safetensors").is_file()
    assert not (library / "adapters" / "star.safetensors").exists()
    assert main(["adapters", "rename", "my_star", "other", "--outputs", str(library)]) == 2
    assert "already an adapter called 'other'" in capsys.readouterr().err


def test_adapters_delete(library, capsys):
    assert main(["adapters", "delete", "star", "--outputs", str(library)]) == 0
    assert not (library / "adapters" / "star.safetensors").exists()
    assert main(["adapters", "delete", "star", "--outputs", str(library)]) == 2
    assert "No adapter called 'star'" in capsys.readouterr().err


def test_adapters_import(library, tmp_path, capsys):
    upload = fake_adapter(tmp_path / "downloads" / "star.safetensors", FACTS)
    assert main(["adapters", "import", str(upload), "--outputs", str(library)]) == 0
    assert (library / "adapters" / "star_2.safetensors").read_bytes() == upload.read_bytes()
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"x")
    assert main(["adapters", "import", str(pickle), "--outputs", str(library)]) == 2
    assert "only .safetensors" in capsys.readouterr().err
