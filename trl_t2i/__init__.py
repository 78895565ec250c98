"""GRPO post-training of autoregressive text-to-image models with f-divergence regularisation, on top of TRL."""

from . import _quiet_imports  # noqa: F401 -- first: it filters messages logged while the rest is imported
from .config import T2IGRPOConfig
from .decoding import sample_image_tokens
from .divergences import DIVERGENCES, get_divergence
from .models import TINY_JANUS, get_family, load_model, load_processor
from .sampling import SamplingConfig, image_logp_table
from .trainer import T2IGRPOTrainer


__version__ = "0.1.0.dev0"

__all__ = [
    "DIVERGENCES",
    "TINY_JANUS",
    "SamplingConfig",
    "T2IGRPOConfig",
    "T2IGRPOTrainer",
    "get_divergence",
    "get_family",
    "image_logp_table",
    "load_model",
    "load_processor",
    "sample_image_tokens",
]
