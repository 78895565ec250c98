"""A tiny random LlamaGen for tests and CPU demos, built locally (no download), like the tiny Janus.

It is the real `LlamaGenForImageGeneration` with a tiny T5 encoder and a word-level tokenizer with T5's special
tokens (`<pad>` 0, `</s>` 1 appended to every caption, `<unk>` 2). As in the tiny Janus, the VQ decoder is set up so
that every code decodes to its own flat colour (`trl_t2i.models.tiny`), and the image head gives unit-variance
logits, so that the `colour_match` reward has a signal that a short RL run can follow. T5 keeps its dropout layers
(rate 0.1), so that tests see that the model never applies them. Its captions are only lowercased
(`clean_captions=False`), so it runs without the `llamagen` extra.
"""

import math

import torch
from transformers import PreTrainedTokenizerFast

from ..tiny import PUNCTUATION, WORDS, init_colour_decoder, word_level_tokenizer
from .configuration_llamagen import LlamaGenConfig
from .modeling_llamagen import LlamaGenForImageGeneration


TINY_LLAMAGEN = "tiny:llamagen"
"""Name under which recipes and scripts refer to the tiny LlamaGen (see `trl_t2i.models.tiny.TINY_JANUS`)."""

TINY_REVISION = 2
"""Bump whenever `build_tiny_llamagen` changes, so that copies cached by older versions are not reused."""

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def build_tiny_t5_tokenizer(caption_length: int) -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer with T5's special tokens and ids, `</s>` appended, left padding."""
    return word_level_tokenizer(
        [PAD, EOS, UNK],
        single=f"$A {EOS}",
        pair=f"$A {EOS} $B {EOS}",
        added=EOS,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=caption_length,
    )


def build_tiny_llamagen(
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    image_grid_size: int = 4,
    codebook_size: int = 64,
) -> tuple[LlamaGenForImageGeneration, PreTrainedTokenizerFast]:
    """Build a tiny random LlamaGen and its T5 tokenizer, deterministically from `seed`.

    Images are `image_grid_size²` tokens over `codebook_size` codes and decode to `2·image_grid_size` pixels per
    side (the tiny Janus's VQ model).
    """
    config = LlamaGenConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        image_grid_size=image_grid_size,
        codebook_size=codebook_size,
        clean_captions=False,  # its captions are plain words: no extra needed to run it
        text_encoder_config={
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 64,
            "num_layers": 2,
            "num_heads": 4,
            "feed_forward_proj": "gated-gelu",
            "vocab_size": len(WORDS) + len(PUNCTUATION) + 3,
        },
        vq_config={
            "embed_dim": 8,
            "num_embeddings": codebook_size,
            "latent_channels": 32,
            "base_channels": 32,  # GroupNorm(32 groups) needs multiples of 32
            "channel_multiplier": [3, 1],  # 96 channels at the output (3 per group), one 2× upsampling
            "num_res_blocks": 1,
        },
    )
    tokenizer = build_tiny_t5_tokenizer(config.caption_length)
    with torch.random.fork_rng():  # deterministic weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaGenForImageGeneration(config)
    generator = torch.Generator().manual_seed(seed)
    init_colour_decoder(model.vqmodel, torch.rand(codebook_size, 3, generator=generator))
    with torch.no_grad():  # unit-variance logits (see the module docstring)
        model.image_head.weight.normal_(0.0, 1.0 / math.sqrt(hidden_size), generator=generator)
    return model.eval(), tokenizer
