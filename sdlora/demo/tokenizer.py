"""A tiny CLIP tokenizer whose vocabulary is the demo dataset's words.

The real CLIP vocabulary has 49,408 entries; a 64-wide text encoder would spend most of its parameters on
embeddings it never sees. Instead we learn BPE merges over the handful of words the demo uses (captions
plus the words people type for the LoRA examples) until every one of them is a single token, and keep the
256 byte-level symbols (with and without the ``</w>`` word ending) so any other text still tokenizes.
The result is an ordinary ``CLIPTokenizer`` (vocab.json + merges.txt) that diffusers loads as usual.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from sdlora.demo.shapes import caption_words

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 20
BYTE_ALPHABET = bytes_to_unicode()  # GPT-2/CLIP's reversible byte -> printable character map

# Words people are likely to type when training or prompting the demo LoRAs, beyond the caption words.
EXTRA_WORDS: tuple[str, ...] = (
    "sks", "photo", "picture", "image", "drawing", "of", "in", "with", "the", "and", "shape", "shapes",
    "big", "tiny", "medium", "dark", "bright", "pink", "brown", "grey", "cyan", "magenta", "gold", "silver",
    "colour", "color", "simple", "plain", "centre", "center", "left", "right", "top", "bottom",
)  # fmt: skip


def demo_words() -> list[str]:
    """All words that get a token of their own: the dataset's caption words plus :data:`EXTRA_WORDS`."""
    return sorted(set(caption_words()) | set(EXTRA_WORDS))


def _symbols(word: str) -> tuple[str, ...]:
    """How BPE first sees ``word``: byte-level characters, the last one carrying the word ending."""
    chars = [BYTE_ALPHABET[byte] for byte in word.encode("utf-8")]
    return (*chars[:-1], chars[-1] + END_OF_WORD)


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
            merged.append(symbols[index] + symbols[index + 1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Plain BPE training run until each word is one symbol.

    Training BPE (rather than hand-writing one prefix chain per word) matters: a tokenizer applies merges
    by rank, so hand-made chains for different words can pre-empt each other. Merges learned by BPE are
    applied at tokenization time in exactly the order they were learned, so every word ends up whole.
    Ties are broken by the pair itself, which keeps the vocabulary deterministic.
    """
    corpus = [_symbols(word) for word in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for symbols in corpus for pair in pairwise(symbols))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        corpus = [_merge_pair(symbols, best) for symbols in corpus]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout: bytes, bytes with word ending, one entry per merge, then the specials."""
    alphabet = list(BYTE_ALPHABET.values())
    tokens = alphabet + [char + END_OF_WORD for char in alphabet] + ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}


def write_tokenizer_files(directory: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (the files CLIP tokenizers are distributed as)."""
    merges = learn_merges(demo_words())
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(
        json.dumps(build_vocab(merges), ensure_ascii=False), encoding="utf-8"
    )
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_tokenizer() -> CLIPTokenizer:
    """A ``CLIPTokenizer`` for the demo words, loaded from the standard files so it round-trips on save."""
    with tempfile.TemporaryDirectory() as scratch:
        write_tokenizer_files(Path(scratch))
        tokenizer = CLIPTokenizer.from_pretrained(scratch, model_max_length=MODEL_MAX_LENGTH)
    check_whole_words(tokenizer, demo_words())
    return tokenizer


def check_whole_words(tokenizer: CLIPTokenizer, words: Iterable[str]) -> None:
    """Fail loudly if any vocabulary word would be split: the text encoder relies on one token per word."""
    split = {word: pieces for word in words if len(pieces := tokenizer.tokenize(word)) != 1}
    if split:
        raise ValueError(f"words split into several tokens: {split}")
