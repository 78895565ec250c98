"""LoRA folded into the base weights while sampling.

An active LoRA linear computes `x W^T + s·(x A^T) B^T`: three matmuls and their dispatch per linear, at every one of
the 576 decode steps of an image. Folded (`W + s·BA`) it is one. PEFT's own `merge_adapter`/`unmerge_adapter` undo
the fold by subtraction, which in bf16 does not give `W` back (each round trip moves weights by up to an ulp, and a
run does thousands): here the original weights are copied aside and copied back, so the base model is bit-for-bit
the same after every rollout. The fold is computed in fp32 and rounded once to the weights' dtype, and written into
the weights' own storage: a compiled decode step (a CUDA graph) keeps reading the addresses it was captured with.
The price is one extra copy of the adapted weights while sampling (see `docs/memory.md`).
"""

import contextlib
from collections.abc import Iterator

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def why_not_mergeable(model: nn.Module) -> str | None:
    """Why `model`'s adapters cannot be folded for sampling, or `None` when they can."""
    layers = _lora_layers(model)
    if not layers:
        return "the model has no LoRA layers"
    for layer in layers:
        if type(layer) is not LoraLinear:  # PEFT's 4-bit/8-bit, embedding, convolution, ... LoRA layers
            return f"the LoRA layers include {type(layer).__module__}.{type(layer).__name__}, not plain linears"
        weight = layer.get_base_layer().weight
        if type(weight) is not nn.Parameter or not weight.is_floating_point():
            return f"the base weights are {type(weight).__name__} (quantized or sharded), not plain tensors"
        if hasattr(weight, "ds_id"):
            return "the base weights are sharded by DeepSpeed ZeRO-3"
        if any(layer.use_dora.get(name, False) for name in layer.active_adapters):
            return "DoRA adapters do not fold into a weight delta"
        if layer.disable_adapters or layer.merged:
            return "the adapters are already disabled or merged"
    return None


def folded_bytes(model: nn.Module) -> int:
    """Bytes of the folded copies `merged_adapters` allocates: one per adapted base weight."""
    return sum(layer.get_base_layer().weight.nbytes for layer in _lora_layers(model))


@contextlib.contextmanager
def merged_adapters(model: nn.Module) -> Iterator[None]:
    """Inside, every LoRA linear of `model` runs as one linear with its active adapters folded in; on exit the
    original base weights and the adapters are back. Requires `why_not_mergeable(model) is None`."""
    reason = why_not_mergeable(model)
    if reason is not None:
        raise ValueError(f"Cannot fold the adapters into the base weights: {reason}.")
    originals = []
    try:
        with torch.no_grad():
            for layer in _lora_layers(model):
                weight = layer.get_base_layer().weight
                originals.append((layer, weight, weight.detach().clone()))
                weight.copy_(_folded_fp32(layer, weight))
                layer.enable_adapters(False)
        yield
    finally:
        with torch.no_grad():
            for layer, weight, original in originals:
                weight.copy_(original)
                layer.enable_adapters(True)


def _folded_fp32(layer: LoraLinear, weight: torch.Tensor) -> torch.Tensor:
    """`W + Σ s·BA` over the active adapters, in fp32 (PEFT's `get_delta_weight` computes `BA` in the adapter's
    dtype and would round it once more): one fp32 temporary the size of `W`, the products accumulated into it."""
    folded = weight.float()
    for name in layer.active_adapters:
        if name in layer.lora_A:
            down, up = layer.lora_A[name].weight.float(), layer.lora_B[name].weight.float()
            # `fan_in_fan_out` stores W as (in, out): the delta is (BA)ᵀ = AᵀBᵀ
            factors = (down.T, up.T) if layer.fan_in_fan_out else (up, down)
            folded.addmm_(*factors, alpha=layer.scaling[name])
    return folded
