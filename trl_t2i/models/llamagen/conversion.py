"""Conversion of the official LlamaGen-T2I checkpoints (`t2i_XL_stage1_256.pt`, `vq_ds16_t2i.pt`; HF
`peizesun/llamagen_t2i`) into a folder that `LlamaGenForImageGeneration.from_pretrained` loads.

The architecture is read from the weights (width, depth, SwiGLU width, codebook, caption length and width, the VQ
model's channels and levels). No weight shows the number of heads (LlamaGen's for the width by default) nor the
image size: that is read from the GPT checkpoint's name (`t2i_XL_stage2_512.pt`) or from the training arguments
LlamaGen's `train_t2i.py` saves with its checkpoints (`args.image_size`), or given; every source known must agree.
The T5 encoder and its tokenizer come from a transformers checkpoint of the caption
encoder the model was trained with (`google/flan-t5-xl`) and are saved into the folder, so it is self-contained.
"""

import argparse
import re
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5EncoderModel

from .configuration_llamagen import LlamaGenConfig
from .modeling_llamagen import LlamaGenForImageGeneration


HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1536: 24, 2048: 32, 2560: 40, 3200: 32, 4096: 32}
"""Heads of LlamaGen's GPT models (`gpt.py`: GPT-B … GPT-7B) by width, which is all the weights show of them."""

GPT_RENAMES = [
    (r"^cls_embedding\.cap_proj\.(fc[12])\.weight$", r"caption_embedder.\1.weight"),
    (r"^cls_embedding\.uncond_embedding$", "caption_embedder.null_caption"),
    (r"^tok_embeddings\.weight$", "transformer.embed_tokens.weight"),
    (r"^layers\.(\d+)\.attention\.wo\.weight$", r"transformer.layers.\1.self_attn.o_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w1\.weight$", r"transformer.layers.\1.mlp.gate_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w3\.weight$", r"transformer.layers.\1.mlp.up_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w2\.weight$", r"transformer.layers.\1.mlp.down_proj.weight"),
    (r"^layers\.(\d+)\.attention_norm\.weight$", r"transformer.layers.\1.input_layernorm.weight"),
    (r"^layers\.(\d+)\.ffn_norm\.weight$", r"transformer.layers.\1.post_attention_layernorm.weight"),
    (r"^norm\.weight$", "transformer.norm.weight"),
    (r"^output\.weight$", "image_head.weight"),
]
"""LlamaGen `gpt.py` names → ours (the fused `wqkv` is split separately)."""

VQ_RENAMES = [
    (r"^(encoder)\.conv_blocks\.(\d+)\.res\.", r"\1.down.\2.block."),
    (r"^(encoder)\.conv_blocks\.(\d+)\.(attn|downsample)\.", r"\1.down.\2.\3."),
    (r"^(decoder)\.conv_blocks\.(\d+)\.res\.", r"\1.up.\2.block."),
    (r"^(decoder)\.conv_blocks\.(\d+)\.(attn|upsample)\.", r"\1.up.\2.\3."),
    (r"^(encoder|decoder)\.mid\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid\.1\.", r"\1.mid.attn_1."),
    (r"^(encoder|decoder)\.mid\.2\.", r"\1.mid.block_2."),
]
"""LlamaGen `vq_model.py` names → transformers' `JanusVQVAE` (the same VQ-16 architecture)."""

VQ_STATISTICS = {"quantize.codebook_used"}
"""Codebook-usage statistics of VQ training: not weights."""


IMAGE_SIZE_IN_NAME = re.compile(r"(?:^|[_.-])(256|384|512)(?:px)?$")
"""A checkpoint name (without its suffix) that ends in the image size: `t2i_XL_stage1_256`, `t2i_XL_stage2_512`.
Only the sizes LlamaGen trains at (its scripts' `--image-size` choices), so that a step count is never read as one."""


def read_original_checkpoint(path: str | Path) -> dict:
    """An official LlamaGen checkpoint file: its state dict (see `original_state_dict`), and in training checkpoints
    `train_t2i.py`'s arguments (an `argparse.Namespace`, the one object besides tensors that is unpickled)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def original_state_dict(checkpoint: dict, path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint file read by `read_original_checkpoint` (under `"model"`, or DeepSpeed's
    `"module"`)."""
    for key in ("model", "module", "state_dict"):
        if key in checkpoint:
            return checkpoint[key]
    raise ValueError(f"{path} holds no LlamaGen state dict (no 'model', 'module' or 'state_dict' entry).")


def checkpoint_image_size(path: str | Path, checkpoint: dict, image_size: int | None = None) -> int:
    """The image size in pixels a GPT checkpoint generates: given (`image_size`), at the end of its file name, or in
    its saved training arguments. The sources that are known must agree; at least one must be."""
    sources = {} if image_size is None else {"the `image_size` given": image_size}
    if match := IMAGE_SIZE_IN_NAME.search(Path(path).stem):
        sources[f"its name {Path(path).name!r}"] = int(match[1])
    if getattr(checkpoint.get("args"), "image_size", None) is not None:
        sources["its saved training arguments (`args.image_size`)"] = int(checkpoint["args"].image_size)
    if not sources:
        raise ValueError(
            f"Cannot tell the image size of {path}: neither its name (e.g. `t2i_XL_stage1_256.pt`) nor its contents "
            "say it. Give `image_size` (`--image_size`): 256 for `t2i_XL_stage1_256.pt`, 512 for "
            "`t2i_XL_stage2_512.pt`."
        )
    if len(set(sources.values())) > 1:
        found = ", ".join(f"{size} px from {source}" for source, size in sources.items())
        raise ValueError(
            f"{path}: inconsistent image sizes ({found}). A model converted at the wrong size silently generates on "
            "the wrong grid: fix the name or the `image_size` given."
        )
    return next(iter(sources.values()))


def llamagen_config(
    gpt: dict[str, torch.Tensor],
    vq: dict[str, torch.Tensor],
    text_encoder_config,
    image_size: int,
    num_attention_heads: int | None = None,
) -> LlamaGenConfig:
    """The `LlamaGenConfig` of original state dicts generating `image_size` pixels (see the module docstring)."""
    _require(
        gpt, ["tok_embeddings.weight", "cls_embedding.uncond_embedding", "layers.0.feed_forward.w1.weight"], "GPT"
    )
    _require(vq, ["encoder.conv_in.weight", "post_quant_conv.weight", "quantize.embedding.weight"], "VQ")
    codebook_size, hidden_size = gpt["tok_embeddings.weight"].shape
    caption_length, caption_dim = gpt["cls_embedding.uncond_embedding"].shape
    if caption_dim != text_encoder_config.d_model:
        raise ValueError(
            f"The GPT checkpoint reads {caption_dim}-wide caption features but the text encoder gives "
            f"{text_encoder_config.d_model}: LlamaGen-T2I was trained on FLAN-T5-XL (2048)."
        )
    if num_attention_heads is None and hidden_size not in HEADS_BY_WIDTH:
        raise ValueError(f"No LlamaGen model is {hidden_size} wide: give its `num_attention_heads`.")
    levels = _count(vq, r"^encoder\.conv_blocks\.(\d+)\.")
    if image_size % 2 ** (levels - 1):
        raise ValueError(
            f"image_size={image_size} is not a multiple of the VQ model's downsampling ({2 ** (levels - 1)}): no "
            "grid of image tokens covers it."
        )
    base_channels = vq["encoder.conv_in.weight"].shape[0]
    multipliers = [vq[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // base_channels for i in range(levels)]
    return LlamaGenConfig(
        hidden_size=hidden_size,
        num_hidden_layers=_count(gpt, r"^layers\.(\d+)\."),
        num_attention_heads=num_attention_heads or HEADS_BY_WIDTH[hidden_size],
        intermediate_size=gpt["layers.0.feed_forward.w1.weight"].shape[0],
        image_grid_size=image_size // 2 ** (levels - 1),
        codebook_size=codebook_size,
        caption_length=caption_length,
        text_encoder_config=text_encoder_config,
        vq_config={
            "embed_dim": vq["quantize.embedding.weight"].shape[1],
            "num_embeddings": vq["quantize.embedding.weight"].shape[0],
            "latent_channels": vq["post_quant_conv.weight"].shape[0],
            "base_channels": base_channels,
            "channel_multiplier": multipliers,
            "num_res_blocks": _count(vq, r"^encoder\.conv_blocks\.0\.res\.(\d+)\."),
        },
    )


def converted_state_dict(gpt: dict[str, torch.Tensor], vq: dict[str, torch.Tensor], hidden_size: int) -> dict:
    """Our names for the original GPT and VQ weights; keys we do not know keep their name, so that
    `load_original_weights` lists them as unexpected."""
    converted = {}
    for key, tensor in gpt.items():
        fused = re.fullmatch(r"layers\.(\d+)\.attention\.wqkv\.weight", key)
        if fused:  # LlamaGen's fused projection, rows [q; k; v] (multi-head attention: equal sizes)
            prefix = f"transformer.layers.{fused[1]}.self_attn"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.split(hidden_size), strict=True):
                converted[f"{prefix}.{name}.weight"] = part
            continue
        converted[_rename(key, GPT_RENAMES)] = tensor
    for key, tensor in vq.items():
        if key not in VQ_STATISTICS:
            converted[f"vqmodel.{_rename(key, VQ_RENAMES)}"] = tensor
    return converted


def load_original_weights(model: LlamaGenForImageGeneration, gpt: dict, vq: dict) -> None:
    """Load original GPT and VQ state dicts into `model` (all but T5), or fail listing every missing, unexpected
    and mis-shaped key."""
    converted = converted_state_dict(gpt, vq, model.config.hidden_size)
    expected = {key: value for key, value in model.state_dict().items() if not key.startswith("text_encoder.")}
    missing = sorted(expected.keys() - converted.keys())
    unexpected = sorted(converted.keys() - expected.keys())
    mis_shaped = [
        f"{key}: checkpoint {tuple(converted[key].shape)}, model {tuple(expected[key].shape)}"
        for key in sorted(expected.keys() & converted.keys())
        if converted[key].shape != expected[key].shape
    ]
    if missing or unexpected or mis_shaped:
        problems = [("missing", missing), ("unexpected", unexpected), ("with the wrong shape", mis_shaped)]
        raise ValueError(
            "Not a complete LlamaGen-T2I GPT + VQ checkpoint pair of this architecture. "
            + " ".join(f"Keys {kind} ({len(keys)}): {', '.join(keys)}." for kind, keys in problems if keys)
        )
    model.load_state_dict(converted, strict=False)


def convert_llamagen(
    gpt_checkpoint: str | Path,
    vq_checkpoint: str | Path,
    text_encoder: str,
    output_dir: str | Path | None = None,
    image_size: int | None = None,
    num_attention_heads: int | None = None,
) -> tuple[LlamaGenForImageGeneration, PreTrainedTokenizerBase]:
    """Convert official checkpoints (plus a transformers T5 encoder and its tokenizer, e.g. `google/flan-t5-xl`)
    into our model and tokenizer, saved into `output_dir` when given. `image_size` may be left out when the GPT
    checkpoint's name or contents say it (`checkpoint_image_size`)."""
    gpt_file = read_original_checkpoint(gpt_checkpoint)
    image_size = checkpoint_image_size(gpt_checkpoint, gpt_file, image_size)
    gpt = original_state_dict(gpt_file, gpt_checkpoint)
    vq = original_state_dict(read_original_checkpoint(vq_checkpoint), vq_checkpoint)
    t5 = T5EncoderModel.from_pretrained(text_encoder, dtype=torch.float32)
    config = llamagen_config(gpt, vq, t5.config, image_size, num_attention_heads)
    model = LlamaGenForImageGeneration(config)
    model.text_encoder.load_state_dict(t5.state_dict())
    load_original_weights(model, gpt, vq)
    tokenizer = AutoTokenizer.from_pretrained(text_encoder, model_max_length=config.caption_length)
    tokenizer.padding_side = "left"  # LlamaGen's captions are left-padded
    if output_dir is not None:
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    return model.eval(), tokenizer


def _rename(key: str, renames: list[tuple[str, str]]) -> str:
    for pattern, replacement in renames:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return key


def _count(state_dict: dict, pattern: str) -> int:
    return len({match[1] for key in state_dict if (match := re.match(pattern, key))})


def _require(state_dict: dict, keys: list[str], kind: str) -> None:
    absent = [key for key in keys if key not in state_dict]
    if absent:
        raise ValueError(
            f"Not a LlamaGen-T2I {kind} checkpoint: it lacks {', '.join(absent)} (its keys start with "
            f"{', '.join(sorted({key.split('.')[0] for key in state_dict})[:10])})."
        )
