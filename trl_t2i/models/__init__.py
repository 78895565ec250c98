"""Model families behind one adapter interface, and their loading."""

from transformers import AutoConfig, AutoProcessor, PreTrainedModel

from .base import DecodeState, T2IAdapter, unwrap_model
from .janus import JanusAdapter
from .tiny import TINY_JANUS, build_tiny_janus, resolve_tiny


ADAPTERS: dict[str, type[T2IAdapter]] = {JanusAdapter.model_type: JanusAdapter}


def adapter_class(config) -> type[T2IAdapter]:
    """The adapter class serving `config.model_type`; a clear error for families we do not support."""
    if config.model_type not in ADAPTERS:
        raise ValueError(
            f"Unsupported model type {config.model_type!r}. Supported model types: {', '.join(sorted(ADAPTERS))}."
        )
    return ADAPTERS[config.model_type]


def get_adapter(model_or_config, processing_class) -> T2IAdapter:
    """Build the adapter for a model (possibly wrapped) or its config."""
    config = model_or_config if not hasattr(model_or_config, "config") else unwrap_model(model_or_config).config
    return adapter_class(config)(config, processing_class)


def load_model(name_or_path: str, **model_kwargs) -> PreTrainedModel:
    """Load a text-to-image model by hub id or local path (`trl-t2i/tiny-janus` is built locally)."""
    path = resolve_tiny(name_or_path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=model_kwargs.get("trust_remote_code", False))
    return adapter_class(config).model_class.from_pretrained(path, **model_kwargs)


def load_processor(name_or_path: str, **kwargs):
    """Load the processing class (processor or tokenizer) that goes with `load_model(name_or_path)`."""
    return AutoProcessor.from_pretrained(resolve_tiny(name_or_path), **kwargs)


__all__ = [
    "ADAPTERS",
    "TINY_JANUS",
    "DecodeState",
    "JanusAdapter",
    "T2IAdapter",
    "adapter_class",
    "build_tiny_janus",
    "get_adapter",
    "load_model",
    "load_processor",
    "resolve_tiny",
    "unwrap_model",
]
