"""AUTOMATIC1111 prompt habits: `<lora:name:weight>` tags and seed -1."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from sdlora.generate import GenerationParams, Generator
from sdlora.generate.prompts import LoraTag, PromptError, lora_weights, parse_prompt
from tests.test_generate import PARAMS, pixels


def test_tags_are_removed_from_the_text_the_encoder_sees():
    parsed = parse_prompt("<lora:sks_star:0.8> a purple sks shape, <lora:outlined:0.5:0.2>, on white")
    assert parsed.text == "a purple sks shape, on white"
    assert parsed.loras == [LoraTag("sks_star", 0.8, 0.8), LoraTag("outlined", 0.5, 0.2)]


def test_weight_defaults_to_one_and_named_parts_are_read():
    assert parse_prompt("<lora:a>").loras == [LoraTag("a", 1.0, 1.0)]
    assert parse_prompt("x <lora:a:te=0.3:unet=0.9>").loras == [LoraTag("a", 0.3, 0.9)]
    assert parse_prompt("<lyco:old:0.6> x").loras == [LoraTag("old", 0.6, 0.6)]


def test_negative_prompt_tags_count_and_other_networks_are_set_aside():
    text, negative, weights = lora_weights("a red circle <hypernet:h:1>", "<lora:blurry:-0.5> ugly")
    assert (text, negative, weights) == ("a red circle", "ugly", {"blurry": -0.5})
    assert parse_prompt("a <hypernet:h:1>").ignored == ["<hypernet:h:1>"]


@pytest.mark.parametrize("tag", ["<lora::0.5>", "<lora:a:strong>"])
def test_bad_tags_name_the_tag(tag):
    with pytest.raises(PromptError, match=re.escape(tag)):
        parse_prompt(f"{tag} a circle")


def test_a_tag_draws_what_the_weights_draw(tiny_base, two_adapters, tmp_path):
    generator = Generator(tiny_base, adapter_dir=str(tmp_path / "none"))
    names = [generator.load_adapter(p) for p in two_adapters]
    by_weights = generator.generate(PARAMS, {names[0]: 0.8, names[1]: 0.5})
    params = GenerationParams(f"<lora:purple:0.8> {PARAMS.prompt} <lora:green:0.5>", **_rest(PARAMS))
    by_tags = generator.generate(params)
    assert np.array_equal(pixels(by_tags), pixels(by_weights))
    assert "<lora:purple:0.8>" in by_tags.info["parameters"]  # the PNG keeps what the user typed


def test_a_tag_loads_an_adapter_from_the_library_folder(tiny_base, two_adapters):
    folder = Path(two_adapters[0]).parent
    generator = Generator(tiny_base, adapter_dir=folder)
    generator.generate(GenerationParams("<lora:purple:1> a blob", steps=2))
    assert [p.stem for p in generator.adapters.values()] == ["purple"]
    with pytest.raises(PromptError, match="no adapter called 'nope'.*green.*purple"):
        generator.generate(GenerationParams("<lora:nope:1> a blob", steps=2))


def test_seed_minus_one_is_random_and_recorded(tiny_base):
    generator = Generator(tiny_base)
    params = GenerationParams("a blob", seed=-1, steps=2)
    seeds = [
        int(re.search(r"Seed: (\d+)", generator.generate(params).info["parameters"]).group(1)) for _ in "ab"
    ]
    assert seeds[0] != seeds[1]
    again = generator.generate(GenerationParams("a blob", seed=seeds[0], steps=2))
    first = generator.generate(GenerationParams("a blob", seed=seeds[0], steps=2))
    assert np.array_equal(pixels(again), pixels(first))


def _rest(params: GenerationParams) -> dict:
    return {k: v for k, v in vars(params).items() if k != "prompt"}
