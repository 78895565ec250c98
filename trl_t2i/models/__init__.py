"""Model families behind one interface, and their loading."""

from .base import Conditioning, DecodeState, ModelFamily, unwrap_model
from .janus import JanusFamily
from .llamagen import TINY_LLAMAGEN, LlamaGenConfig, LlamaGenFamily, LlamaGenForImageGeneration, build_tiny_llamagen
from .loading import (
    FAMILIES,
    disable_bnb_cpu_repack,
    family_class,
    get_family,
    load_adapter,
    load_config,
    load_family,
    load_model,
    load_processor,
    resolve_name,
    with_skip_modules,
)
from .tiny import TINY_JANUS, build_tiny_janus


__all__ = [
    "FAMILIES",
    "TINY_JANUS",
    "TINY_LLAMAGEN",
    "Conditioning",
    "DecodeState",
    "JanusFamily",
    "LlamaGenConfig",
    "LlamaGenFamily",
    "LlamaGenForImageGeneration",
    "ModelFamily",
    "build_tiny_janus",
    "build_tiny_llamagen",
    "disable_bnb_cpu_repack",
    "family_class",
    "get_family",
    "load_config",
    "load_family",
    "load_adapter",
    "load_model",
    "load_processor",
    "resolve_name",
    "unwrap_model",
    "with_skip_modules",
]
