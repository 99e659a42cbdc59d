"""Base models: local folders load; unknown, pickled or malformed bases fail with what was tried."""

from __future__ import annotations

import pytest

from sdlora.models import (
    FAMILIES,
    BaseModelError,
    UnknownFamilyError,
    family_of,
    get_family,
    load_base,
    native_resolution,
)
from tests.tiny_models import tiny_sdxl_pipeline


def test_local_folder_loads(tiny_base, tiny_vpred_base):
    pipe = load_base(tiny_base)
    assert family_of(pipe).name == "sd1" and native_resolution(pipe) == 16
    assert family_of(load_base(tiny_vpred_base)).name == "sd2"


def test_family_table():
    xl = tiny_sdxl_pipeline()
    assert family_of(xl) is family_of(xl.unet) is get_family("sdxl")
    for family in FAMILIES.values():
        assert family.cross_attention_dim == sum(e.width for e in family.text_encoders)
    assert get_family("sdxl").kohya_prefixes["text_encoder"] == "lora_te1_"
    with pytest.raises(UnknownFamilyError, match="sd1, sd2, sdxl"):
        get_family("sd3")


def test_unknown_base_names_what_was_tried():
    with pytest.raises(BaseModelError) as error:
        load_base("nobody/no-such-model")
    message = str(error.value)
    assert "nobody/no-such-model" in message and "local folder" in message and "hub" in message
    assert "--base /path/to/diffusers-folder" in message


def test_pickled_checkpoints_are_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04")
    with pytest.raises(BaseModelError, match="pickled"):
        load_base(str(ckpt))


def test_folder_without_pipeline_is_explained(tmp_path):
    with pytest.raises(BaseModelError, match="model_index.json"):
        load_base(str(tmp_path))


def test_broken_single_file_checkpoint_is_explained(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 32)
    with pytest.raises(BaseModelError, match="model.safetensors"):
        load_base(str(bad))
