"""LlamaGen text-to-image: configuration, model, family, tiny model and checkpoint conversion."""

from transformers import AutoConfig

from .configuration_llamagen import LlamaGenConfig
from .family import LlamaGenFamily
from .modeling_llamagen import LlamaGenForImageGeneration
from .tiny import TINY_LLAMAGEN, build_tiny_llamagen


# `AutoConfig` (hence `load_model`, `load_processor`) recognises a saved LlamaGen by its `model_type`.
AutoConfig.register(LlamaGenConfig.model_type, LlamaGenConfig, exist_ok=True)

__all__ = [
    "TINY_LLAMAGEN",
    "LlamaGenConfig",
    "LlamaGenFamily",
    "LlamaGenForImageGeneration",
    "build_tiny_llamagen",
]
