"""LoRA folded into the base weights while sampling.

An active LoRA linear computes `x W^T + s·(x A^T) B^T`: three matmuls and their dispatch per linear, at every one of
the 576 decode steps of an image. Folded (`W + s·BA`) it is one. PEFT's own `merge_adapter`/`unmerge_adapter` undo
the fold by subtraction, which in bf16 does not give `W` back (each round trip moves weights by up to an ulp, and a
run does thousands): here the folded weights are new tensors and the original ones are put back untouched, so the
base model is bit-for-bit the same after every rollout. The price is one extra copy of the adapted weights while
sampling (see `docs/memory.md`).
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
    layers, originals = _lora_layers(model), []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight
                deltas = [layer.get_delta_weight(name) for name in layer.active_adapters if name in layer.lora_A]
                originals.append((layer, weight, weight.data))
                weight.data = sum((delta.to(weight.dtype) for delta in deltas), weight.data)
                layer.enable_adapters(False)
        yield
    finally:
        for layer, weight, data in originals:
            weight.data = data
            layer.enable_adapters(True)
