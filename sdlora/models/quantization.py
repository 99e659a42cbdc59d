"""A frozen base loaded quantized (QLoRA for diffusion), through diffusers' and transformers' own
quantization configs: one per component, given to `from_pretrained`, so the weights are quantized as they
load and never sit in memory at full size.

- nf4: bitsandbytes 4-bit NormalFloat with double quantization (CUDA only), computing in the training
  precision.
- int8: torchao int8 weight-only, which runs on the CPU too.

peft puts its LoRA layers on top of both kinds of layer (`peft.tuners.lora.bnb`, `peft.tuners.lora.torchao`)
and the adapter weights stay in full precision, so the saved file is an ordinary LoRA for the
unquantized base.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

import torch

from sdlora.errors import SdloraError

# The components quantized when present: the frozen parts that run every step. The VAE runs once per
# image (its latents are cached) and stays as it is.
QUANTIZED_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


class QuantizationError(SdloraError, RuntimeError):
    """A quantized base was asked for where it can't be had; the message says what to install or use."""


def pipeline_quantization(kind: str, compute_dtype: torch.dtype, components: Iterable[str]):
    """diffusers' `PipelineQuantizationConfig` quantizing `components` as `kind` ('nf4', 'int8'), or None
    for 'none'."""
    if kind == "none":
        return None
    check_backend(kind)
    from diffusers import PipelineQuantizationConfig

    make = {"nf4": _nf4, "int8": _int8}[kind]
    wanted = [name for name in components if name in QUANTIZED_COMPONENTS]
    return PipelineQuantizationConfig(quant_mapping={name: make(name, compute_dtype) for name in wanted})


def check_backend(kind: str) -> None:
    """Fail before any model loads when `kind` can't run here, saying what to install or use instead."""
    if kind == "int8":
        _require("torchao", "--quantize-base int8 needs torchao: pip install 'sdlora[quant]'")
    elif kind == "nf4":
        if not torch.cuda.is_available():
            raise QuantizationError(
                "--quantize-base nf4 needs a CUDA GPU (bitsandbytes); on the CPU use --quantize-base int8."
            )
        _require("bitsandbytes", "--quantize-base nf4 needs bitsandbytes: pip install 'sdlora[cuda]'")


def _int8(component: str, compute_dtype: torch.dtype):
    from torchao.quantization import Int8WeightOnlyConfig

    if component == "unet":
        from diffusers import TorchAoConfig
    else:
        from transformers import TorchAoConfig
    return TorchAoConfig(Int8WeightOnlyConfig())


def _nf4(component: str, compute_dtype: torch.dtype):
    if component == "unet":
        from diffusers import BitsAndBytesConfig
    else:
        from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _require(package: str, message: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise QuantizationError(message)


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether `model` was loaded quantized (its dtype is then fixed at load time)."""
    return bool(getattr(model, "is_quantized", False))
