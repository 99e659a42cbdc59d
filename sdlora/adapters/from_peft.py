"""Neutral modules from a model that peft trained (LoRA, LoCon, LoHa, LoKr, each optionally DoRA).

Read from the live layers rather than the state dict, because each layer knows its own `scaling`: the
file's alpha is `scaling * rank`, so rsLoRA (scaling alpha/sqrt(r)), per-module conv ranks and alphas all
come out as the alpha that gives the same scale under the alpha/rank rule every loader uses.
"""

from __future__ import annotations

import torch
from peft.tuners.loha.layer import LoHaLayer
from peft.tuners.lokr.layer import LoKrLayer
from peft.tuners.lora.layer import LoraLayer

from sdlora.adapters.formats import strip_text_model
from sdlora.adapters.modules import LohaModule, LokrModule, LoraModule, NetworkModule

# neutral field -> peft parameter dict
LOKR_TENSORS = {
    "w1": "lokr_w1",
    "w1a": "lokr_w1_a",
    "w1b": "lokr_w1_b",
    "w2": "lokr_w2",
    "w2a": "lokr_w2_a",
    "w2b": "lokr_w2_b",
}


def modules_from_peft_model(model: torch.nn.Module, adapter: str = "default") -> dict[str, NetworkModule]:
    """{module name: neutral module} for every layer of `model` carrying peft adapter `adapter`."""
    modules: dict[str, NetworkModule] = {}
    for name, layer in model.named_modules():
        converted = _convert(layer, adapter)
        if converted is not None:
            modules[strip_text_model(name.removeprefix("base_model.model."))] = converted
    return modules


def _convert(layer: torch.nn.Module, adapter: str) -> NetworkModule | None:
    if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
        return _lora(layer, adapter)
    if isinstance(layer, LoHaLayer) and adapter in layer.hada_w1_a:
        return _loha(layer, adapter)
    if isinstance(layer, LoKrLayer) and adapter in layer.scaling:
        return _lokr(layer, adapter)
    return None


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().float().to("cpu", copy=True)


def _lora(layer: LoraLayer, adapter: str) -> LoraModule:
    down, up = _copy(layer.lora_A[adapter].weight), _copy(layer.lora_B[adapter].weight)
    alpha = float(layer.scaling[adapter]) * down.shape[0]
    dora = None
    if adapter in getattr(layer, "lora_magnitude_vector", {}):
        # peft's magnitude is |W0 + dW| per output row: LyCORIS's dora_scale, shaped [out, 1(, 1, 1)].
        magnitude = _copy(layer.lora_magnitude_vector[adapter].weight)
        dora = magnitude.reshape(up.shape[0], *[1] * (layer.get_base_layer().weight.dim() - 1))
    return LoraModule(alpha, dora_scale=dora, down=down, up=up)


def _loha(layer: LoHaLayer, adapter: str) -> LohaModule:
    if adapter in layer.hada_t1:
        raise NotImplementedError("Tucker-decomposed LoHa (use_effective_conv2d) is not converted")
    w1a = _copy(layer.hada_w1_a[adapter])
    return LohaModule(
        float(layer.scaling[adapter]) * w1a.shape[1],
        w1a=w1a,
        w1b=_copy(layer.hada_w1_b[adapter]),
        w2a=_copy(layer.hada_w2_a[adapter]),
        w2b=_copy(layer.hada_w2_b[adapter]),
    )


def _lokr(layer: LoKrLayer, adapter: str) -> LokrModule:
    """peft scales LoKr by alpha/r always; LyCORIS only when a factor is low-rank (else by 1), so with
    both factors whole the scale is folded into w1."""
    if adapter in layer.lokr_t2:
        raise NotImplementedError("Tucker-decomposed LoKr (use_effective_conv2d) is not converted")
    scaling = float(layer.scaling[adapter])
    parts = {
        field: _copy(getattr(layer, attribute)[adapter])
        for field, attribute in LOKR_TENSORS.items()
        if adapter in getattr(layer, attribute)
    }
    low_rank = parts.get("w1b", parts.get("w2b"))
    if low_rank is None:
        parts["w1"] = parts["w1"] * scaling
        # Every loader takes scale 1 for whole factors whatever the alpha, but LyCORIS's own loader needs
        # the key: it is written as LyCORIS writes it, alpha = rank.
        return LokrModule(float(layer.r[adapter]), **parts)
    # A convolution's w2b stays flat, (rank, in * kh * kw), as peft holds it and LyCORIS writes it: the
    # layout AUTOMATIC1111's and ComfyUI's `w2a @ w2b` expects.
    return LokrModule(scaling * low_rank.shape[0], **parts)
