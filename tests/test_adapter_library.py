"""The adapter library: listing with facts and previews, import, rename and delete, all inside outputs/."""

from __future__ import annotations

import json

import pytest

from sdlora.adapters import AdapterError, library
from sdlora.outputs import Outputs
from tests.conftest import FACTS, draw_blob, fake_adapter


@pytest.fixture
def outputs(tmp_path) -> Outputs:
    return Outputs(tmp_path)


def test_the_library_lists_facts_and_finds_the_runs_sample(outputs, tmp_path):
    adapter = fake_adapter(tmp_path / "adapters" / "star.safetensors", FACTS)
    fake_adapter(
        tmp_path / "adapters" / "other.safetensors", **{"ss_network_dim": "16", "ss_network_alpha": "8"}
    )
    run = tmp_path / "runs" / "star-20260102-030405"
    (run / "samples").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"adapter": str(adapter)}))
    draw_blob(run / "samples" / "step-000010-0.png", (8, 8), (1, 2, 3))
    draw_blob(run / "samples" / "step-000030-0.png", (8, 8), (1, 2, 3))
    other, star = library.list_adapters(outputs)
    assert star.row() == ["star", "demo", "4", "2", "sks", "30", "2026-01-02 03:04"]
    assert star.sample == run / "samples" / "step-000030-0.png"
    assert (other.rank, other.alpha, other.sample) == ("16", "8", None)


def test_import_takes_only_readable_safetensors_under_a_free_name(tmp_path):
    outputs = Outputs(tmp_path / "outputs")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"x")
    with pytest.raises(AdapterError, match="only .safetensors"):
        library.import_adapter(pickle, outputs)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x00" * 16)
    with pytest.raises(AdapterError, match="not a readable"):
        library.import_adapter(damaged, outputs)
    upload = fake_adapter(tmp_path / "up" / "my style!.safetensors", FACTS)
    first, second = library.import_adapter(upload, outputs), library.import_adapter(upload, outputs)
    assert (first.name, second.name) == ("my_style.safetensors", "my_style_2.safetensors")
    assert first.read_bytes() == upload.read_bytes() and library.adapter_names(outputs) == [
        "my_style",
        "my_style_2",
    ]


def test_rename_moves_the_preview_and_refuses_taken_names(outputs, tmp_path):
    fake_adapter(tmp_path / "adapters" / "a.safetensors", FACTS)
    fake_adapter(tmp_path / "adapters" / "b.safetensors", FACTS)
    draw_blob(tmp_path / "adapters" / "a.png", (8, 8), (1, 2, 3))
    with pytest.raises(AdapterError, match="already an adapter called 'b'"):
        library.rename_adapter(outputs, "a", "b")
    with pytest.raises(AdapterError, match="new name"):
        library.rename_adapter(outputs, "a", "///")
    renamed = library.rename_adapter(outputs, "a", "../../escaped name")
    assert renamed == tmp_path / "adapters" / "escaped_name.safetensors"
    assert renamed.with_suffix(".png").is_file() and not (tmp_path / "adapters" / "a.png").exists()


@pytest.mark.parametrize("name", ["missing", "../adapters/a", "", "a/../a"])
def test_only_library_adapters_can_be_deleted(name, outputs, tmp_path):
    fake_adapter(tmp_path / "adapters" / "a.safetensors", FACTS)
    with pytest.raises(AdapterError, match="No adapter called"):
        library.delete_adapter(outputs, name)
    library.delete_adapter(outputs, "a")
    assert library.adapter_names(outputs) == []


def test_unique_names_avoid_files_and_pending_jobs(outputs, tmp_path):
    fake_adapter(tmp_path / "adapters" / "star.safetensors", FACTS)
    assert library.unique_name(outputs, "star", taken={"star_2"}) == "star_3"
    assert library.unique_name(outputs, "new one") == "new_one"
