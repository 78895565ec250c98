"""Model families behind one adapter interface, and their loading."""

from .base import DecodeState, T2IAdapter, unwrap_model
from .janus import JanusAdapter
from .loading import ADAPTERS, adapter_class, disable_bnb_cpu_repack, load_model, load_processor, with_skip_modules
from .tiny import TINY_JANUS, build_tiny_janus, resolve_tiny


def get_adapter(model_or_config, processing_class) -> T2IAdapter:
    """Build the adapter for a model (possibly wrapped) or its config."""
    config = unwrap_model(model_or_config).config if hasattr(model_or_config, "config") else model_or_config
    return adapter_class(config)(config, processing_class)


__all__ = [
    "ADAPTERS",
    "TINY_JANUS",
    "DecodeState",
    "JanusAdapter",
    "T2IAdapter",
    "adapter_class",
    "build_tiny_janus",
    "disable_bnb_cpu_repack",
    "get_adapter",
    "load_model",
    "load_processor",
    "resolve_tiny",
    "unwrap_model",
    "with_skip_modules",
]
