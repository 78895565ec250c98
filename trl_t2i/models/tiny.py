"""Tiny random Janus models for tests and the CPU demo, built locally (no download).

They use the real transformers classes (`JanusForConditionalGeneration`, `JanusProcessor`, a fast tokenizer) so
everything downstream runs the code path users run on Janus-Pro. Two things differ from a plain random init:

* the VQ decoder is initialised so that every code decodes to its own flat colour, spread over RGB (a random
  decoder maps every code to nearly the same grey, so colour rewards would have no signal);
* the image head gives unit-variance logits (with the default init they are near-uniform and a short RL run
  barely moves them);
* the vocabulary is a small word list, enough for the built-in prompt sets.

How the decoder is set up, keeping the architecture: every residual/attention branch is zeroed (identity blocks),
the 3×3 convolutions keep only their centre tap, so each pixel depends only on its code. The codebook entry of code
`k` holds `(cos θ_c, sin θ_c)` for each colour channel `c` with `θ_c = (4π/3)·v_c`, `v_k ∈ [0, 1]³` its colour.
The decoder's final GroupNorm (32 groups) sees, per colour channel, a group of three channels
`cos(θ − 2πi/3)`, i = 0, 1, 2, whose mean is 0 and mean square ½ at every pixel: the normalisation is the same for
every image, so a code's colour does not depend on its neighbours. `conv_out` then reads
`a·(SiLU(n₂) − SiLU(n₀)) + b`, monotone in `v`, scaled so that `v = 0 → −1` and `v = 1 → +1`.
"""

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    GenerationConfig,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessorPil,
    JanusProcessor,
    PreTrainedTokenizerFast,
)


TINY_JANUS = "tiny:janus"
"""Name under which recipes and scripts refer to the tiny Janus; resolved to a local directory by
`trl_t2i.models.resolve_name`. No Hub repo id has a colon, so the name never hides one."""

TINY_REVISION = 2
"""Bump whenever `build_tiny_janus` changes, so that copies cached by older versions are not reused."""

BOS, EOS, PAD, UNK = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<unk>"
IMAGE, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
USER, ASSISTANT = "<|User|>", "<|Assistant|>"

# Janus-Pro's conversation format, "<|User|>: {prompt}\n\n<|Assistant|>:", for string or list-of-parts content.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|User|>: {% else %}<|Assistant|>: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)

COLOURS = ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "black", "orange", "purple", "pink", "grey"]
WORDS = (
    COLOURS
    + (
        "a an the of in on with and at by photo picture painting drawing image render sketch cat dog bird horse fish "
        "car bus train boat plane house tree flower apple banana cake cup chair table ball hat shoe sky sea sun moon "
        "mountain city street forest field river beach room wall door window book lamp clock robot person man woman "
        "child big small tall bright dark old new shiny soft wooden metal glass two three four happy sitting standing "
        "flying running under over near beside sunset night day"
    ).split()
)
PUNCTUATION = list(".,:;!?'\"-()")


def word_level_tokenizer(specials: list[str], single: str, pair: str, added: str, **kwargs) -> PreTrainedTokenizerFast:
    """A fast word-level tokenizer over `WORDS` and `PUNCTUATION` after `specials`, whose post-processor applies the
    templates `single`/`pair` (adding the special token `added`); `kwargs` go to `PreTrainedTokenizerFast`."""
    vocab = {token: i for i, token in enumerate(specials + WORDS + PUNCTUATION)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=kwargs["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(added, vocab[added])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", **kwargs)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer with Janus's special tokens, a BOS post-processor and left padding."""
    return word_level_tokenizer(
        [UNK, BOS, EOS, PAD, USER, ASSISTANT, IMAGE, BOI, EOI],
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        added=BOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI},
    )


def build_tiny_janus(
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    image_tokens_per_side: int = 4,
    codebook_size: int = 64,
) -> tuple[JanusForConditionalGeneration, JanusProcessor]:
    """Build a tiny random Janus and its processor, deterministically from `seed`.

    Images are `image_tokens_per_side²` tokens over a codebook of `codebook_size` codes and decode to
    `2·image_tokens_per_side` pixels per side. Defaults: 0.73 M parameters (0.68 M of them in the VQ model),
    16 tokens, 64 codes, 8×8 px.
    """
    tokenizer = build_tiny_tokenizer()
    patch_size = 4
    config = JanusConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 256,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": image_tokens_per_side * patch_size,
            "patch_size": patch_size,
            "projection_dim": hidden_size,
            "depth": 2,
            "mlp_ratio": 2.0,
            "num_image_tokens": image_tokens_per_side**2,
        },
        vq_config={
            "embed_dim": 8,
            "num_embeddings": codebook_size,
            "latent_channels": 32,
            "base_channels": 32,  # GroupNorm(32 groups) needs multiples of 32
            "channel_multiplier": [3, 1],  # 96 channels at the output (3 per group), one 2× upsampling
            "num_res_blocks": 1,
            "projection_dim": hidden_size,
            "image_token_embed_dim": hidden_size,
            "num_hidden_layers": 2,
        },
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
    )
    with torch.random.fork_rng():  # deterministic weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        guidance_scale=5.0,
        generation_kwargs={"boi_token_id": tokenizer.convert_tokens_to_ids(BOI)},
    )
    generator = torch.Generator().manual_seed(seed)
    colours = torch.rand(codebook_size, 3, generator=generator)
    init_colour_decoder(model.model.vqmodel, colours)
    _init_image_head(model.model.generation_head, generator)
    image_processor = JanusImageProcessorPil(
        size={"height": config.vision_config.image_size, "width": config.vision_config.image_size},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    processor = JanusProcessor(
        image_processor, tokenizer, chat_template=CHAT_TEMPLATE, num_image_tokens=image_tokens_per_side**2
    )
    return model, processor


@torch.no_grad()
def _init_image_head(head: torch.nn.Module, generator: torch.Generator) -> None:
    """Unit-variance image logits at init (the default std 0.02 gives near-uniform, prompt-blind logits that a
    short RL run cannot move): fan-in scaled weights for both layers of the image head."""
    for linear in (head.proj_out, head.vision_head):
        linear.weight.normal_(0.0, 1.0 / math.sqrt(linear.in_features), generator=generator)
        linear.bias.zero_()


COLOUR_SPAN = 4 * math.pi / 3
"""Angle range that encodes one colour channel in the tiny decoder (see the module docstring)."""


@torch.no_grad()
def init_colour_decoder(vqmodel: torch.nn.Module, colours: torch.Tensor) -> None:
    """Make code `k` decode to a flat patch of colour `colours[k]` (values in [0, 1]) through the real decoder."""
    angles = COLOUR_SPAN * colours  # (K, 3)
    codebook = torch.zeros_like(vqmodel.quantize.embedding.weight)
    codebook[:, 0:6:2], codebook[:, 1:6:2] = angles.cos(), angles.sin()
    vqmodel.quantize.embedding.weight.copy_(codebook)  # L2-normalised at decode: every row has norm √3

    decoder = vqmodel.decoder
    for module in decoder.modules():  # zero every residual/attention branch: the blocks become identities
        if type(module).__name__ == "JanusVQVAEResnetBlock":
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
        if type(module).__name__ == "JanusVQVAEAttnBlock":
            module.proj_out.weight.zero_()
            module.proj_out.bias.zero_()
    for conv in [vqmodel.post_quant_conv, decoder.conv_in]:
        _centre_identity(conv)
    for level in decoder.up:
        if hasattr(level, "upsample"):
            _centre_identity(level.upsample.conv)

    # Input channels 2c, 2c+1 hold (cos θ_c, sin θ_c); output group c (channels 3c..3c+2) holds cos(θ_c − 2πi/3).
    shortcut = decoder.up[-1].block[0].nin_shortcut
    shortcut.weight.zero_()
    for c in range(3):
        for i in range(3):
            phase = 2 * math.pi * i / 3
            shortcut.weight[3 * c + i, 2 * c, 0, 0] = math.cos(phase)
            shortcut.weight[3 * c + i, 2 * c + 1, 0, 0] = math.sin(phase)
    decoder.norm_out.weight.fill_(1.0)
    decoder.norm_out.bias.zero_()

    # After GroupNorm the group holds √2·cos(θ − 2πi/3); read a·(SiLU(n₂) − SiLU(n₀)) + b with v=0→−1, v=1→+1.
    def readout(v: float) -> float:
        n = [math.sqrt(2) * math.cos(COLOUR_SPAN * v - 2 * math.pi * i / 3) for i in (0, 2)]
        return F.silu(torch.tensor(n[1])).item() - F.silu(torch.tensor(n[0])).item()

    low, high = readout(0.0), readout(1.0)
    scale, offset = 2 / (high - low), -1 - 2 * low / (high - low)
    decoder.conv_out.weight.zero_()
    for c in range(3):
        decoder.conv_out.weight[c, 3 * c + 2, 1, 1] = scale
        decoder.conv_out.weight[c, 3 * c, 1, 1] = -scale
    decoder.conv_out.bias.fill_(offset)


def _centre_identity(conv: torch.nn.Conv2d) -> None:
    """Set a convolution to copy its first `min(in, out)` channels through its centre tap."""
    conv.weight.zero_()
    conv.bias.zero_()
    centre = conv.kernel_size[0] // 2
    for channel in range(min(conv.in_channels, conv.out_channels)):
        conv.weight[channel, channel, centre, centre] = 1.0


def tiny_cache_dir() -> Path:
    """Where tiny models are saved: `$TRL_T2I_CACHE` or `~/.cache/trl_t2i`."""
    return Path(os.environ.get("TRL_T2I_CACHE", Path.home() / ".cache" / "trl_t2i"))


def cached_tiny_model(name: str, revision: int, build: Callable[[], tuple]) -> str:
    """The local directory of the tiny model `name` at `revision`: `build()` (a model and its processing class) is
    saved under `tiny_cache_dir()` on first use, atomically (staging folder, then rename), and reused afterwards."""
    directory = tiny_cache_dir() / f"{name}-r{revision}"
    # Under torch.distributed, transformers saves weights on the main process only: the other ranks wait for it.
    with PartialState().main_process_first():
        if not (directory / "config.json").exists():
            model, processing_class = build()
            staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
            model.save_pretrained(staging)
            processing_class.save_pretrained(staging)
            try:
                staging.rename(directory)
            except OSError:  # another process saved it first
                shutil.rmtree(staging)
    return str(directory)
