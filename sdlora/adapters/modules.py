"""The neutral form of one adapted layer: whatever it takes to compute its weight change exactly.

Shared LoRA files hold several network types (kohya's LoRA, LyCORIS's LoCon, LoHa, LoKr, full
diffs, each optionally with DoRA's weight decomposition). Each type here is a small dataclass that
knows its tensors (by the key suffixes kohya/LyCORIS write), its rank or factor sizes and its
`delta`: the weight change at multiplier 1, with alpha applied as LyCORIS's own forward pass does
and as AUTOMATIC1111 and ComfyUI apply it. `apply_to(weight, multiplier)` adds DoRA on top.

Adding a type is one class plus one entry in `MODULE_TYPES`; readers and writers go through
`module_from_tensors` / `NetworkModule.tensors`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

DORA_EPS = torch.finfo(torch.float32).eps


def _tucker(core: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Rebuild a Tucker-decomposed conv kernel: core (r, r, kh, kw), down (r, in), up (r, out)."""
    return torch.einsum("i j ..., j r, i p -> p r ...", core, down, up)


@dataclass
class NetworkModule:
    """One adapted layer. `alpha` None means the file gave none (then alpha = rank: scale 1)."""

    alpha: float | None = None
    dora_scale: torch.Tensor | None = None

    kind: ClassVar[str] = ""
    # file suffix -> dataclass field; the first suffix must be present for a module to be this type
    SUFFIXES: ClassVar[dict[str, str]] = {}

    @property
    def rank(self) -> int:
        return 0

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None or not self.rank else self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, ...]:
        """(out, in, ...) of the weight this module changes, as far as its tensors tell."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        """The type a user knows it by: 'LoRA', 'LoCon', 'LoHa', 'LoKr', 'full', with '+DoRA'."""
        return self.kind + ("+DoRA" if self.dora_scale is not None else "")

    def delta(self) -> torch.Tensor:
        """The weight change at multiplier 1 (alpha applied), float32, in the module's own shape."""
        raise NotImplementedError

    def bias_delta(self) -> torch.Tensor | None:
        return None

    def apply_to(self, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
        """What this module adds to `weight` (the pristine base weight) at `multiplier`.

        DoRA rescales the merged weight W0 + dW to the stored magnitude per output row (files since
        2025, dora_scale [out, 1]) or per input column (older files, [1, in]); a multiplier m then
        blends W0 toward that result, as AUTOMATIC1111 and ComfyUI do, so m = 0 is the base itself.
        """
        base = weight.float()
        delta = self.delta().reshape(base.shape)
        if self.dora_scale is None:
            return multiplier * delta
        merged = base + delta
        scale = self.dora_scale.float()
        if scale.shape[0] == base.shape[0] and (scale.dim() < 2 or scale.shape[1] == 1):
            norm = (
                merged.reshape(base.shape[0], -1).norm(dim=1).reshape(base.shape[0], *[1] * (base.dim() - 1))
            )
        else:
            norm = merged.transpose(0, 1).reshape(base.shape[1], -1).norm(dim=1)
            norm = norm.reshape(1, base.shape[1], *[1] * (base.dim() - 2))
        decomposed = merged * (scale.reshape(norm.shape) / (norm + DORA_EPS))
        return multiplier * (decomposed - base)

    def tensors(self) -> dict[str, torch.Tensor]:
        """This module's tensors under the key suffixes kohya and LyCORIS write."""
        out = {suffix: getattr(self, name) for suffix, name in self.SUFFIXES.items()}
        out = {k: v.contiguous() for k, v in out.items() if v is not None}
        if self.alpha is not None:
            out["alpha"] = torch.tensor(float(self.alpha))
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale.contiguous()
        return out

    def sizes(self) -> str:
        """Rank or factor sizes for `inspect`."""
        return f"rank {self.rank}"

    def to(self, device: torch.device | str) -> NetworkModule:
        """The same module with its tensors on `device` (the Generator keeps them beside the weights)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()}
        return type(self)(**moved)

    @property
    def parameters(self) -> int:
        return sum(v.numel() for v in self.tensors().values() if v.dim() > 0)


@dataclass
class LoraModule(NetworkModule):
    """LoRA (linear) and LoCon (conv): up @ down, with an optional Tucker core for conv kernels."""

    down: torch.Tensor | None = None  # (rank, in[, kh, kw])
    up: torch.Tensor | None = None  # (out, rank[, 1, 1])
    mid: torch.Tensor | None = None  # Tucker core (rank, rank, kh, kw)

    SUFFIXES: ClassVar[dict[str, str]] = {
        "lora_down.weight": "down",
        "lora_up.weight": "up",
        "lora_mid.weight": "mid",
    }

    @property
    def kind(self) -> str:  # type: ignore[override]
        conv = self.down.dim() == 4 and (self.mid is not None or self.down.shape[2:] != (1, 1))
        return "LoCon" if conv else "LoRA"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        if self.mid is not None:
            return (self.up.shape[0], self.down.shape[1], *self.mid.shape[2:])
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self) -> torch.Tensor:
        up, down = self.up.flatten(1).float(), self.down.flatten(1).float()
        if self.mid is not None:
            return self.scale * _tucker(self.mid.float(), down, up.T)
        return (self.scale * up @ down).reshape(self.shape)


@dataclass
class LohaModule(NetworkModule):
    """LoHa: the Hadamard product of two low-rank products, (w1a @ w1b) * (w2a @ w2b)."""

    w1a: torch.Tensor | None = None  # (out, rank); (rank, out) with a Tucker core
    w1b: torch.Tensor | None = None  # (rank, in·kh·kw); (rank, in) with a Tucker core
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t1: torch.Tensor | None = None  # Tucker cores (rank, rank, kh, kw)
    t2: torch.Tensor | None = None

    kind: ClassVar[str] = "LoHa"
    SUFFIXES: ClassVar[dict[str, str]] = {
        "hada_w1_a": "w1a",
        "hada_w1_b": "w1b",
        "hada_w2_a": "w2a",
        "hada_w2_b": "w2b",
        "hada_t1": "t1",
        "hada_t2": "t2",
    }

    @property
    def rank(self) -> int:
        return int(self.w1b.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        if self.t1 is not None:
            return (self.w1a.shape[1], self.w1b.shape[1], *self.t1.shape[2:])
        return (self.w1a.shape[0], self.w1b.shape[1])

    def delta(self) -> torch.Tensor:
        if self.t1 is not None:
            first = _tucker(self.t1.float(), self.w1b.float(), self.w1a.float())
            second = _tucker(self.t2.float(), self.w2b.float(), self.w2a.float())
        else:
            first = self.w1a.float() @ self.w1b.float()
            second = self.w2a.float() @ self.w2b.float()
        return self.scale * first * second


@dataclass
class LokrModule(NetworkModule):
    """LoKr: kron(w1, w2), either factor stored whole or as a low-rank pair (w2 optionally Tucker).

    Scale as LyCORIS trains it: alpha / rank when a factor is decomposed, 1 when both are whole.
    """

    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    kind: ClassVar[str] = "LoKr"
    SUFFIXES: ClassVar[dict[str, str]] = {
        "lokr_w1": "w1",
        "lokr_w1_a": "w1a",
        "lokr_w1_b": "w1b",
        "lokr_w2": "w2",
        "lokr_w2_a": "w2a",
        "lokr_w2_b": "w2b",
        "lokr_t2": "t2",
    }

    @property
    def rank(self) -> int:
        if self.w1b is not None:
            return int(self.w1b.shape[0])
        if self.w2b is not None:
            return int(self.w2b.shape[0])
        return 0  # both factors whole: scale 1

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = self.w1.float() if self.w1 is not None else self.w1a.float() @ self.w1b.float()
        if self.w2 is not None:
            w2 = self.w2.float()
        elif self.t2 is not None:
            w2 = _tucker(self.t2.float(), self.w2b.float(), self.w2a.float())
        else:  # a conv w2b keeps its kernel axes: (rank, in, kh, kw)
            w2 = (self.w2a.float() @ self.w2b.float().flatten(1)).reshape(-1, *self.w2b.shape[1:])
        return w1, w2

    @property
    def shape(self) -> tuple[int, ...]:
        w1, w2 = self._factors()
        return (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:])

    def delta(self) -> torch.Tensor:
        w1, w2 = self._factors()
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        return self.scale * torch.kron(w1, w2)

    def sizes(self) -> str:
        w1, w2 = self._factors()
        rank = f", rank {self.rank}" if self.rank else ""
        return f"factors {tuple(w1.shape[:2])} x {tuple(w2.shape[:2])}{rank}"


@dataclass
class FullModule(NetworkModule):
    """A full weight difference (LyCORIS 'full' / 'diff'), optionally with a bias difference."""

    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None

    kind: ClassVar[str] = "full"
    SUFFIXES: ClassVar[dict[str, str]] = {"diff": "diff", "diff_b": "diff_b"}

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape)

    def delta(self) -> torch.Tensor:
        return self.diff.float()

    def bias_delta(self) -> torch.Tensor | None:
        return None if self.diff_b is None else self.diff_b.float()

    def sizes(self) -> str:
        return "full weight"


MODULE_TYPES: tuple[type[NetworkModule], ...] = (LoraModule, LohaModule, LokrModule, FullModule)
# Tensors every type may carry besides its own.
SHARED_SUFFIXES = ("alpha", "dora_scale")
# Tensors some trainers write that carry nothing a loader needs (kohya's unused scalar, bias-free norms).
IGNORED_SUFFIXES = ("scalar",)
KNOWN_SUFFIXES = {s for t in MODULE_TYPES for s in t.SUFFIXES} | set(SHARED_SUFFIXES) | set(IGNORED_SUFFIXES)


def module_from_tensors(parts: dict[str, torch.Tensor]) -> NetworkModule | str:
    """The module these suffix -> tensor parts describe, or a sentence saying why they describe none.

    Never drops a tensor silently: an unknown suffix is reported, so the file can be refused by name.
    """
    unknown = sorted(set(parts) - KNOWN_SUFFIXES)
    if unknown:
        return f"tensor kind(s) {', '.join(unknown)} not understood"
    alpha = float(parts["alpha"].float().item()) if "alpha" in parts else None
    for cls in MODULE_TYPES:
        present = {field: parts[suffix] for suffix, field in cls.SUFFIXES.items() if suffix in parts}
        if not present:
            continue
        others = set(parts) - set(cls.SUFFIXES) - set(SHARED_SUFFIXES) - set(IGNORED_SUFFIXES)
        if others:
            return f"mixes {cls.kind} tensors with {', '.join(sorted(others))}"
        module = cls(alpha=alpha, dora_scale=parts.get("dora_scale"), **present)
        missing = _missing(module)
        return f"{cls.kind} module lacks {missing}" if missing else module
    return "holds no weights (only " + ", ".join(sorted(parts)) + ")"


def _missing(module: NetworkModule) -> str | None:
    """The name of a tensor the module can't do without, or None when it is complete."""
    have = {f.name for f in fields(module) if getattr(module, f.name) is not None}
    needs: dict[type, list[set[str]]] = {
        LoraModule: [{"down"}, {"up"}],
        LohaModule: [{"w1a"}, {"w1b"}, {"w2a"}, {"w2b"}],
        LokrModule: [{"w1", "w1a"}, {"w2", "w2a"}],
        FullModule: [{"diff"}],
    }
    for options in needs[type(module)]:
        if not options & have:
            return "/".join(sorted(options))
    if isinstance(module, LohaModule) and (module.t1 is None) != (module.t2 is None):
        return "t1/t2 (both Tucker cores)"
    if isinstance(module, LokrModule):
        for whole, a, b in (("w1", "w1a", "w1b"), ("w2", "w2a", "w2b")):
            if whole not in have and (a in have) != (b in have):
                return f"{a}/{b}"
    return None
