"""Merging LoRAs: several into one LoRA, exactly (by stacking ranks) or re-factorised by SVD.

For module m, adapters i at weights w_i add  ΔW = Σ_i w_i (α_i / r_i) B_i A_i.
- Concatenation writes that sum exactly as one LoRA of rank Σ r_i:  B = [w_i α_i/r_i B_i], A = [A_i], α = rank.
- SVD keeps the best rank-k approximation of ΔW (Eckart–Young) and reports the relative error it made.

Fusing into a base model needs a loaded pipeline, so it is `sdlora.generate.fuse_into_base`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdlora.adapters.files import FACTS_PREFIX, AdapterError
from sdlora.adapters.formats import LoraFile
from sdlora.adapters.modules import FullModule, LoraModule, NetworkModule


@dataclass
class MergeReport:
    rank: int | None  # None: concatenated ranks
    max_relative_error: float  # ||ΔW - approx||_F / ||ΔW||_F, worst module
    mean_relative_error: float


def merge_loras(
    adapters: list[tuple[LoraFile, float]], rank: int | None = None
) -> tuple[LoraFile, MergeReport]:
    """One LoRA equal to the weighted sum of `adapters`: concatenated (rank=None) or SVD to `rank`."""
    if not adapters:
        raise ValueError("Nothing to merge.")
    names = sorted({key for lora, _ in adapters for key in lora.modules})
    merged: dict[str, NetworkModule] = {}
    errors = []
    for key in names:
        parts = [(lora.modules[key], weight) for lora, weight in adapters if key in lora.modules]
        if any(m.dora_scale is not None for m, _ in parts):
            raise AdapterError(
                f"{key}: DoRA modules depend on the base weights; fuse them into a model instead."
            )
        if rank is None and all(type(m) is LoraModule and m.mid is None for m, _ in parts):
            up = torch.cat([m.up.flatten(1).float() * (w * m.scale) for m, w in parts], dim=1)
            down = torch.cat([m.down.flatten(1).float() for m, _ in parts], dim=0)
            merged[key] = LoraModule(float(down.shape[0]), down=down, up=up)
            errors.append(0.0)
        elif rank is None:  # LoHa, LoKr, Tucker: their sum is no low-rank product; keep it whole, exactly
            merged[key] = FullModule(diff=sum(w * m.delta() for m, w in parts))
            errors.append(0.0)
        else:
            delta = sum(w * m.delta().flatten(1) for m, w in parts)
            module, error = _svd_factorise(delta, rank)
            merged[key] = module
            errors.append(error)
    metadata = {k: v for k, v in adapters[0][0].metadata.items() if not k.startswith(FACTS_PREFIX)}
    report = MergeReport(rank, max(errors), sum(errors) / len(errors))
    return LoraFile(merged, metadata), report


def _svd_factorise(delta: torch.Tensor, rank: int) -> tuple[LoraModule, float]:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, s.numel())
    up = (u[:, :k] * s[:k]).float()
    down = vh[:k].float()
    norm = torch.linalg.norm(delta.double())
    error = float(torch.linalg.norm(delta.double() - up.double() @ down.double()) / norm) if norm > 0 else 0.0
    return LoraModule(float(k), down=down, up=up), error
