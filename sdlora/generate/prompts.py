"""AUTOMATIC1111's prompt habits: `<lora:name:weight>` tags select adapters and never reach the encoder.

A1111 (and Forge) find extra-network tags with `<(\\w+):([^>]+)>`, split the inside on ':', and for
`lora` read `name[:te_weight[:unet_weight]]` (the U-Net weight defaults to the text-encoder weight;
`te=` / `unet=` name them explicitly), then remove the tag from the text. Tags of other networks
(`<hypernet:...>`) are left for the user to see in the warning, not sent to the encoder either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sdlora.errors import SdloraError

_TAG = re.compile(r"<(\w+):([^>]+)>")
_SPACES = re.compile(r"\s*,(\s*,)+\s*|\s{2,}")


class PromptError(SdloraError, ValueError):
    """A `<lora:...>` tag can't be used; the message names the tag."""


@dataclass(frozen=True)
class LoraTag:
    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0

    @property
    def weight(self) -> float | tuple[float, float]:
        """One number when both parts agree, else (text encoder, U-Net)."""
        return self.te_weight if self.te_weight == self.unet_weight else (self.te_weight, self.unet_weight)


@dataclass
class ParsedPrompt:
    text: str  # what the text encoder sees
    loras: list[LoraTag] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # tags of other extra networks


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Split A1111 extra-network tags off a prompt; `<lora:...>` tags become LoraTags."""
    loras: list[LoraTag] = []
    ignored: list[str] = []

    def take(match: re.Match) -> str:
        kind, inside = match.group(1).lower(), match.group(2)
        if kind in ("lora", "lyco"):  # A1111 reads LyCORIS's old <lyco:...> as a LoRA too
            loras.append(_lora_tag(match.group(0), inside))
        else:
            ignored.append(match.group(0))
        return ""

    text = _TAG.sub(take, prompt)
    text = _SPACES.sub(lambda m: ", " if "," in m.group(0) else " ", text).strip(" ,")
    return ParsedPrompt(text, loras, ignored)


def _lora_tag(tag: str, inside: str) -> LoraTag:
    positional: list[str] = []
    named: dict[str, str] = {}
    for part in inside.split(":"):
        key, sep, value = part.partition("=")
        if sep and key.strip() in ("te", "unet"):
            named[key.strip()] = value
        else:
            positional.append(part)
    if not positional or not positional[0].strip():
        raise PromptError(f"{tag}: name the adapter, e.g. <lora:my_style:0.8>.")
    name, numbers = positional[0].strip(), positional[1:3]
    try:
        te = float(named.get("te", numbers[0] if numbers else 1.0))
        unet = float(named.get("unet", numbers[1] if len(numbers) > 1 else te))
    except ValueError:
        raise PromptError(f"{tag}: the weight must be a number, e.g. <lora:{name}:0.8>.") from None
    return LoraTag(name, te, unet)


def lora_weights(
    prompt: str, negative_prompt: str = ""
) -> tuple[str, str, dict[str, float | tuple[float, float]]]:
    """Both prompts without their tags, and the adapters the tags ask for (a later tag for the same
    name wins, as the last one typed is the one a user means)."""
    positive, negative = parse_prompt(prompt), parse_prompt(negative_prompt)
    weights = {tag.name: tag.weight for tag in positive.loras + negative.loras}
    return positive.text, negative.text, weights
