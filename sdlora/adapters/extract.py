"""A LoRA from two models: the low-rank part of what fine-tuning changed, as kohya's
`extract_lora_from_models.py` makes it.

For every linear and convolution layer whose weight differs, ΔW = W_tuned - W_base (flattened to
out x in·kh·kw) is factorised by SVD and its best rank-r approximation (Eckart-Young) kept:
up = U_r S_r, down = V_r^T, alpha = r, so the LoRA at weight 1 adds exactly U_r S_r V_r^T. The relative
error ||ΔW - up @ down||_F / ||ΔW||_F of every module is reported: it says how much of the fine-tune a
rank of r keeps (0: all of it). Unlike kohya, values are not clamped to a quantile, so the error
reported is the error the file makes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import DiffusionPipeline

from sdlora.adapters.files import AdapterError
from sdlora.adapters.formats import LoraFile
from sdlora.adapters.inspect import layer_index
from sdlora.adapters.modules import LoraModule
from sdlora.models.families import family_of


@dataclass
class ExtractReport:
    errors: dict[str, float] = field(default_factory=dict)  # module -> relative Frobenius error
    ranks: dict[str, int] = field(default_factory=dict)  # module -> rank kept
    unchanged: int = 0  # layers whose weights were the same (within min_diff) in both models
    skipped_convs: int = 0  # changed k x k convolutions left out (conv_rank 0)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def mean_error(self) -> float:
        return sum(self.errors.values()) / len(self.errors) if self.errors else 0.0


def extract_lora(
    tuned: DiffusionPipeline,
    base: DiffusionPipeline,
    rank: int,
    *,
    conv_rank: int | None = None,
    min_diff: float = 0.0,
    components: tuple[str, ...] | None = None,
) -> tuple[LoraFile, ExtractReport]:
    """The LoRA that turns `base` into (nearly) `tuned`, and how near, module by module.

    `conv_rank`: rank for k x k (k > 1) convolutions, default `rank`; 0 leaves them out (kohya's default
    without `--conv_dim`). Layers whose largest change is at most `min_diff` are left out.
    """
    if rank < 1:
        raise AdapterError(f"The rank must be at least 1, not {rank}.")
    family = family_of(base)
    if family_of(tuned) != family:
        raise AdapterError(f"The tuned model is {family_of(tuned).label}, the base {family.label}.")
    conv_rank = rank if conv_rank is None else conv_rank
    modules: dict[str, LoraModule] = {}
    report = ExtractReport()
    for component in components or family.components:
        tuned_layers, base_layers = (
            layer_index(getattr(tuned, component)),
            layer_index(getattr(base, component)),
        )
        for name, layer in tuned_layers.items():
            if not isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
                continue
            other = base_layers.get(name)
            if other is None or other.weight.shape != layer.weight.shape:
                raise AdapterError(f"{component}.{name}: the two models differ in structure here.")
            delta = layer.weight.detach().float() - other.weight.detach().float()
            if delta.abs().max() <= min_diff:
                report.unchanged += 1
                continue
            kernel = delta.shape[2:] if delta.dim() == 4 else ()
            wanted = conv_rank if any(k > 1 for k in kernel) else rank
            if wanted == 0:
                report.skipped_convs += 1
                continue
            key = f"{component}.{name}"
            modules[key], report.errors[key] = _factorise(delta, wanted)
            report.ranks[key] = modules[key].rank
    if not modules:
        raise AdapterError("The two models have the same weights: there is nothing to extract.")
    return LoraFile(modules, {}, "kohya"), report


def _factorise(delta: torch.Tensor, rank: int) -> tuple[LoraModule, float]:
    """Best rank-`rank` LoRA of `delta` (any layer shape) and its relative error, computed in float64."""
    matrix = delta.flatten(1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = min(rank, s.numel())
    up, down = u[:, :k] * s[:k], vh[:k]
    norm = torch.linalg.norm(matrix)
    error = float(torch.linalg.norm(matrix - up @ down) / norm) if norm > 0 else 0.0
    if delta.dim() == 4:  # LoCon: the kernel in down, a 1x1 conv up
        down = down.reshape(k, *delta.shape[1:])
        up = up.reshape(delta.shape[0], k, 1, 1)
    return LoraModule(float(k), down=down.float().contiguous(), up=up.float().contiguous()), error
