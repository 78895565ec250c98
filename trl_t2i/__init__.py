"""GRPO post-training of autoregressive text-to-image models with f-divergence regularisation, on top of TRL."""

import importlib


__version__ = "0.1.0.dev0"

# The public API is imported on first use (PEP 562): `trl-t2i --help` and the other `trl_t2i.cli` entry points import
# this package first, and importing torch, transformers and TRL eagerly here took seconds before a usage line.
_EXPORTS = {
    "DIVERGENCES": "divergences",
    "TINY_JANUS": "models",
    "SamplingConfig": "sampling",
    "T2IGRPOConfig": "config",
    "T2IGRPOTrainer": "trainer",
    "get_divergence": "divergences",
    "get_family": "models",
    "image_logp_table": "sampling",
    "load_model": "models",
    "load_processor": "models",
    "sample_image_tokens": "decoding",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
