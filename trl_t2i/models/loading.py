"""Loading text-to-image models and processors, with the quantization details each family needs."""

import copy

import torch
from transformers import AutoConfig, AutoProcessor, BitsAndBytesConfig, PreTrainedModel

from .base import T2IAdapter
from .janus import JanusAdapter
from .tiny import resolve_tiny


ADAPTERS: dict[str, type[T2IAdapter]] = {JanusAdapter.model_type: JanusAdapter}


def adapter_class(config) -> type[T2IAdapter]:
    """The adapter class serving `config.model_type`; a clear error for families we do not support."""
    if config.model_type not in ADAPTERS:
        raise ValueError(
            f"Unsupported model type {config.model_type!r}. Supported model types: {', '.join(sorted(ADAPTERS))}."
        )
    return ADAPTERS[config.model_type]


def with_skip_modules(quantization_config: BitsAndBytesConfig, adapter: type[T2IAdapter]) -> BitsAndBytesConfig:
    """Add the family's unquantized modules (full paths) to a bitsandbytes config's `llm_int8_skip_modules`."""
    quantization_config = copy.deepcopy(quantization_config)
    skip = list(quantization_config.llm_int8_skip_modules or [])
    quantization_config.llm_int8_skip_modules = skip + [m for m in adapter.quantization_skip_modules if m not in skip]
    return quantization_config


def disable_bnb_cpu_repack(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit CPU layers on their autograd path.

    On AVX512-BF16 CPUs, a `Linear4bit` that runs once in eval mode without grad repacks its weight for an inference
    kernel that has no backward: LoRA gradients through it are then silently wrong. CUDA never takes that path.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_model(name_or_path: str, **model_kwargs) -> PreTrainedModel:
    """Load a text-to-image model by hub id or local path (`trl-t2i/tiny-janus` is built locally).

    `model_kwargs` go to `from_pretrained`; a bitsandbytes `quantization_config` gets the family's skip modules.
    """
    path = resolve_tiny(name_or_path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=model_kwargs.get("trust_remote_code", False))
    adapter = adapter_class(config)
    if isinstance(model_kwargs.get("quantization_config"), BitsAndBytesConfig):
        model_kwargs["quantization_config"] = with_skip_modules(model_kwargs["quantization_config"], adapter)
    return adapter.model_class.from_pretrained(path, **model_kwargs)


def load_processor(name_or_path: str, **kwargs):
    """Load the processing class (processor or tokenizer) that goes with `load_model(name_or_path)`."""
    return AutoProcessor.from_pretrained(resolve_tiny(name_or_path), **kwargs)
