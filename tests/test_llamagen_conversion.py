"""Conversion of official LlamaGen checkpoints, checked against LlamaGen's equations written out here.

The state dicts are random, small, and in the ORIGINAL key layout (`autoregressive/models/gpt.py`,
`tokenizer/tokenizer_image/vq_model.py`). The reference forward and decoder below use only those tensors and the
equations of the original (complex-number 2D RoPE, explicit masked softmax attention, RMSNorm, SwiGLU, the caption
MLP, GroupNorm/SiLU convolutions, nearest upsampling), never our modules.
"""

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPTS

from trl_t2i.cli import main as cli_main
from trl_t2i.models import LlamaGenForImageGeneration, build_tiny_llamagen, get_family, load_model, load_processor
from trl_t2i.models.llamagen.conversion import convert_llamagen


DIM, HEADS, LAYERS, HIDDEN, CODES, CAPTION_TOKENS = 32, 4, 2, 96, 64, 120
GRID, CHANNELS, MULTIPLIERS, RES_BLOCKS, Z_CHANNELS, CODE_DIM = 4, 32, (1, 2), 1, 32, 8


def _randn(generator, *shape, std=0.3):
    return torch.randn(*shape, generator=generator) * std


def original_gpt_state_dict(caption_dim: int, generator) -> dict[str, torch.Tensor]:
    state = {
        "cls_embedding.cap_proj.fc1.weight": _randn(generator, DIM, caption_dim),
        "cls_embedding.cap_proj.fc2.weight": _randn(generator, DIM, DIM),
        "cls_embedding.uncond_embedding": _randn(generator, CAPTION_TOKENS, caption_dim, std=1.0),
        "tok_embeddings.weight": _randn(generator, CODES, DIM, std=1.0),
        "norm.weight": 1 + _randn(generator, DIM, std=0.1),
        "output.weight": _randn(generator, CODES, DIM),
    }
    for i in range(LAYERS):
        state |= {
            f"layers.{i}.attention.wqkv.weight": _randn(generator, 3 * DIM, DIM),
            f"layers.{i}.attention.wo.weight": _randn(generator, DIM, DIM),
            f"layers.{i}.feed_forward.w1.weight": _randn(generator, HIDDEN, DIM),
            f"layers.{i}.feed_forward.w3.weight": _randn(generator, HIDDEN, DIM),
            f"layers.{i}.feed_forward.w2.weight": _randn(generator, DIM, HIDDEN),
            f"layers.{i}.attention_norm.weight": 1 + _randn(generator, DIM, std=0.1),
            f"layers.{i}.ffn_norm.weight": 1 + _randn(generator, DIM, std=0.1),
        }
    return state


def _conv(generator, state, name, out_channels, in_channels, kernel):
    state[f"{name}.weight"] = _randn(generator, out_channels, in_channels, kernel, kernel, std=0.5 / in_channels**0.5)
    state[f"{name}.bias"] = _randn(generator, out_channels, std=0.1)


def _norm(generator, state, name, channels):
    state[f"{name}.weight"], state[f"{name}.bias"] = (
        1 + _randn(generator, channels, std=0.1),
        _randn(generator, channels),
    )


def _resnet(generator, state, name, in_channels, out_channels):
    _norm(generator, state, f"{name}.norm1", in_channels)
    _conv(generator, state, f"{name}.conv1", out_channels, in_channels, 3)
    _norm(generator, state, f"{name}.norm2", out_channels)
    _conv(generator, state, f"{name}.conv2", out_channels, out_channels, 3)
    if in_channels != out_channels:
        _conv(generator, state, f"{name}.nin_shortcut", out_channels, in_channels, 1)


def _attention(generator, state, name, channels):
    _norm(generator, state, f"{name}.norm", channels)
    for part in ("q", "k", "v", "proj_out"):
        _conv(generator, state, f"{name}.{part}", channels, channels, 1)


def _mid(generator, state, name, channels):
    _resnet(generator, state, f"{name}.0", channels, channels)
    _attention(generator, state, f"{name}.1", channels)
    _resnet(generator, state, f"{name}.2", channels, channels)


def original_vq_state_dict(generator) -> dict[str, torch.Tensor]:
    """`VQModel(ModelArgs(encoder_ch_mult=MULTIPLIERS, decoder_ch_mult=MULTIPLIERS, z_channels=Z_CHANNELS, ...))`
    with `ch=CHANNELS`, `num_res_blocks=RES_BLOCKS`: its keys and shapes."""
    state, levels = {}, len(MULTIPLIERS)
    _conv(generator, state, "encoder.conv_in", CHANNELS, 3, 3)
    block_in = CHANNELS
    for level, multiplier in enumerate(MULTIPLIERS):
        for j in range(RES_BLOCKS):
            _resnet(generator, state, f"encoder.conv_blocks.{level}.res.{j}", block_in, CHANNELS * multiplier)
            block_in = CHANNELS * multiplier
            if level == levels - 1:
                _attention(generator, state, f"encoder.conv_blocks.{level}.attn.{j}", block_in)
        if level != levels - 1:
            _conv(generator, state, f"encoder.conv_blocks.{level}.downsample.conv", block_in, block_in, 3)
    _mid(generator, state, "encoder.mid", block_in)
    _norm(generator, state, "encoder.norm_out", block_in)
    _conv(generator, state, "encoder.conv_out", Z_CHANNELS, block_in, 3)
    _conv(generator, state, "quant_conv", CODE_DIM, Z_CHANNELS, 1)
    _conv(generator, state, "post_quant_conv", Z_CHANNELS, CODE_DIM, 1)
    state["quantize.embedding.weight"] = _randn(generator, CODES, CODE_DIM, std=1.0)
    state["quantize.codebook_used"] = torch.zeros(65536)
    block_in = CHANNELS * MULTIPLIERS[-1]
    _conv(generator, state, "decoder.conv_in", block_in, Z_CHANNELS, 3)
    _mid(generator, state, "decoder.mid", block_in)
    for index, level in enumerate(reversed(range(levels))):
        for j in range(RES_BLOCKS + 1):
            _resnet(generator, state, f"decoder.conv_blocks.{index}.res.{j}", block_in, CHANNELS * MULTIPLIERS[level])
            block_in = CHANNELS * MULTIPLIERS[level]
            if level == levels - 1:
                _attention(generator, state, f"decoder.conv_blocks.{index}.attn.{j}", block_in)
        if level != 0:
            _conv(generator, state, f"decoder.conv_blocks.{index}.upsample.conv", block_in, block_in, 3)
    _norm(generator, state, "decoder.norm_out", block_in)
    _conv(generator, state, "decoder.conv_out", 3, block_in, 3)
    return state


# ---------------------------------------------------------------- LlamaGen's equations


def rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_factors(sequence_length: int, head_dim: int) -> torch.Tensor:
    """`e^{iθ}` per position and channel pair: 0 on the 120 caption positions; for image cell (r, c), angles
    `r·ω_j` on the first half of the pairs and `c·ω_j` on the second, `ω_j = 10000^(-2j / (head_dim/2))`."""
    omega = 10000.0 ** (-torch.arange(0, head_dim // 2, 2).float() / (head_dim // 2))
    factors = torch.zeros(sequence_length, head_dim // 2, dtype=torch.complex64)
    for position in range(CAPTION_TOKENS, sequence_length):
        row, column = divmod(position - CAPTION_TOKENS, GRID)
        factors[position] = torch.polar(torch.ones(head_dim // 2), torch.cat([row * omega, column * omega]))
    return factors


def rotate(x, factors):  # x: (B, S, H, D); rotation of each adjacent pair as a complex product
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * factors[None, :, None]).flatten(-2)


def original_logits(state, caption_features, caption_mask, image_tokens):
    """LlamaGen's training-mode forward: 120 left-padded caption positions then the image tokens; the mask is
    causal, padded caption keys masked, plus the identity; logits from position 119 on."""
    caption = F.linear(
        F.gelu(F.linear(caption_features, state["cls_embedding.cap_proj.fc1.weight"]), approximate="tanh"),
        state["cls_embedding.cap_proj.fc2.weight"],
    )
    h = torch.cat([caption, state["tok_embeddings.weight"][image_tokens]], dim=1)
    batch, length, head_dim = h.size(0), h.size(1), DIM // HEADS
    keys = torch.cat([caption_mask, torch.ones(batch, length - CAPTION_TOKENS)], 1).bool()
    allowed = (torch.ones(length, length).tril().bool()[None] & keys[:, None]) | torch.eye(length).bool()[None]
    factors = rope_factors(length, head_dim)
    for i in range(LAYERS):
        x = rms_norm(h, state[f"layers.{i}.attention_norm.weight"])
        q, k, v = (
            F.linear(x, state[f"layers.{i}.attention.wqkv.weight"]).view(batch, length, 3, HEADS, head_dim).unbind(2)
        )
        q, k = rotate(q, factors), rotate(k, factors)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        weights = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
        attended = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, DIM)
        h = h + F.linear(attended, state[f"layers.{i}.attention.wo.weight"])
        x = rms_norm(h, state[f"layers.{i}.ffn_norm.weight"])
        gate = F.silu(F.linear(x, state[f"layers.{i}.feed_forward.w1.weight"]))
        h = h + F.linear(
            gate * F.linear(x, state[f"layers.{i}.feed_forward.w3.weight"]),
            state[f"layers.{i}.feed_forward.w2.weight"],
        )
    return F.linear(rms_norm(h, state["norm.weight"]), state["output.weight"])[:, CAPTION_TOKENS - 1 :]


def _conv2d(state, name, x):
    weight = state[f"{name}.weight"]
    return F.conv2d(x, weight, state[f"{name}.bias"], padding=weight.shape[-1] // 2)


def _group_norm(state, name, x):
    return F.group_norm(x, 32, state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6)


def _res_block(state, name, x):
    h = _conv2d(state, f"{name}.conv1", F.silu(_group_norm(state, f"{name}.norm1", x)))
    h = _conv2d(state, f"{name}.conv2", F.silu(_group_norm(state, f"{name}.norm2", h)))
    return (_conv2d(state, f"{name}.nin_shortcut", x) if f"{name}.nin_shortcut.weight" in state else x) + h


def _attn_block(state, name, x):
    h = _group_norm(state, f"{name}.norm", x)
    q, k, v = (_conv2d(state, f"{name}.{part}", h).flatten(2) for part in "qkv")  # (B, C, HW)
    weights = (q.transpose(1, 2) @ k / math.sqrt(x.size(1))).softmax(-1)  # (B, HW queries, HW keys)
    return x + _conv2d(state, f"{name}.proj_out", (v @ weights.transpose(1, 2)).view_as(x))


def original_decode(state, codes):
    """`VQModel.decode_code`: l2-normalised codebook rows on the (row, column) grid, then the decoder."""
    codebook = F.normalize(state["quantize.embedding.weight"], dim=-1)
    h = codebook[codes].view(len(codes), GRID, GRID, CODE_DIM).permute(0, 3, 1, 2)
    h = _conv2d(state, "decoder.conv_in", _conv2d(state, "post_quant_conv", h))
    h = _res_block(state, "decoder.mid.2", _attn_block(state, "decoder.mid.1", _res_block(state, "decoder.mid.0", h)))
    for index in range(len(MULTIPLIERS)):
        for j in range(RES_BLOCKS + 1):
            h = _res_block(state, f"decoder.conv_blocks.{index}.res.{j}", h)
            if f"decoder.conv_blocks.{index}.attn.{j}.q.weight" in state:
                h = _attn_block(state, f"decoder.conv_blocks.{index}.attn.{j}", h)
        if f"decoder.conv_blocks.{index}.upsample.conv.weight" in state:
            h = _conv2d(state, f"decoder.conv_blocks.{index}.upsample.conv", F.interpolate(h, scale_factor=2.0))
    return _conv2d(state, "decoder.conv_out", F.silu(_group_norm(state, "decoder.norm_out", h)))


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Original-layout checkpoints on disk, a tiny T5 (the tiny LlamaGen's) as the text encoder, and the
    converted folder."""
    directory = tmp_path_factory.mktemp("llamagen")
    tiny, tokenizer = build_tiny_llamagen()
    tiny.text_encoder.save_pretrained(directory / "t5")
    tokenizer.save_pretrained(directory / "t5")
    generator = torch.Generator().manual_seed(0)
    gpt, vq = original_gpt_state_dict(tiny.config.caption_dim, generator), original_vq_state_dict(generator)
    torch.save({"model": gpt}, directory / "t2i_gpt.pt")
    torch.save({"model": vq, "optimizer": {}}, directory / "vq.pt")
    convert_llamagen(
        directory / "t2i_gpt.pt", directory / "vq.pt", str(directory / "t5"), directory / "converted", 8, HEADS
    )
    return directory, gpt, vq


def _original_captions(directory, prompts):
    """LlamaGen's `sample_t2i.py`: T5 features of right-padded 120-token captions, rotated to left padding and
    zeroed at the padding."""
    tokenizer = load_processor(str(directory / "t5"))
    encoding = tokenizer(
        [prompt.lower() for prompt in prompts],
        padding="max_length",
        max_length=120,
        padding_side="right",
        return_tensors="pt",
    )
    t5 = LlamaGenForImageGeneration.from_pretrained(directory / "converted").text_encoder
    features = t5(**encoding).last_hidden_state
    lengths = encoding["attention_mask"].sum(1)
    left = torch.stack([torch.cat([f[n:], f[:n]]) for f, n in zip(features, lengths, strict=True)])
    mask = encoding["attention_mask"].flip(-1).float()
    return left * mask[..., None], mask


def test_the_converted_model_reproduces_the_original_forward(checkpoints):
    directory, gpt, _ = checkpoints
    model = LlamaGenForImageGeneration.from_pretrained(directory / "converted").eval()
    family = get_family(model, load_processor(str(directory / "converted")))
    conditioning = family.encode_prompts(PROMPTS)  # padded to the longest caption, not to 120
    tokens = torch.randint(0, CODES, (len(PROMPTS), GRID * GRID))
    ours = model(**conditioning.tensors, image_tokens=tokens[:, :-1]).logits
    features, mask = _original_captions(directory, PROMPTS)
    torch.testing.assert_close(ours, original_logits(gpt, features, mask, tokens[:, :-1]), atol=2e-5, rtol=1e-4)
    # the unconditional rows: LlamaGen's uncond_embedding under the caption's mask
    ours = model(**family.unconditional(conditioning).tensors, image_tokens=tokens[:, :-1]).logits
    null = gpt["cls_embedding.uncond_embedding"].expand(len(PROMPTS), -1, -1)
    torch.testing.assert_close(ours, original_logits(gpt, null, mask, tokens[:, :-1]), atol=2e-5, rtol=1e-4)


def test_the_converted_vq_decoder_reproduces_the_original(checkpoints):
    directory, _, vq = checkpoints
    model = LlamaGenForImageGeneration.from_pretrained(directory / "converted")
    codes = torch.randint(0, CODES, (3, GRID * GRID))
    pixels = model.decode_image_tokens(codes)  # (B, H, W, 3)
    torch.testing.assert_close(pixels.permute(0, 3, 1, 2), original_decode(vq, codes), atol=1e-5, rtol=1e-4)


def test_a_partial_checkpoint_lists_its_missing_and_unexpected_keys(checkpoints, tmp_path):
    directory, gpt, vq = checkpoints
    partial = {key: value for key, value in gpt.items() if key != "layers.1.feed_forward.w3.weight"}
    torch.save({"model": {**partial, "layers.0.attention.bias": torch.zeros(3)}}, tmp_path / "partial.pt")
    with pytest.raises(ValueError) as failure:
        convert_llamagen(tmp_path / "partial.pt", directory / "vq.pt", str(directory / "t5"), None, 8, HEADS)
    message = str(failure.value)
    assert "missing (1): transformer.layers.1.mlp.up_proj.weight" in message
    assert "unexpected (1): layers.0.attention.bias" in message


def test_checkpoints_given_the_wrong_way_round_are_named(checkpoints):
    directory, _, _ = checkpoints
    with pytest.raises(ValueError, match="Not a LlamaGen-T2I GPT checkpoint: it lacks tok_embeddings.weight"):
        convert_llamagen(directory / "vq.pt", directory / "t2i_gpt.pt", str(directory / "t5"), None, 8, HEADS)


def _convert(directory, gpt_checkpoint, image_size=None):
    return convert_llamagen(gpt_checkpoint, directory / "vq.pt", str(directory / "t5"), None, image_size, HEADS)[0]


def test_the_image_size_is_read_from_the_checkpoints_name(checkpoints, tmp_path):
    # the official names end in the size: t2i_XL_stage1_256.pt, t2i_XL_stage2_512.pt (this VQ downsamples 2×)
    directory, gpt, _ = checkpoints
    for size in (256, 512):
        torch.save({"model": gpt}, tmp_path / f"t2i_XL_stage2_{size}.pt")
        assert _convert(directory, tmp_path / f"t2i_XL_stage2_{size}.pt").config.image_grid_size == size // 2


def test_the_image_size_is_read_from_a_training_checkpoints_arguments(checkpoints, tmp_path):
    # LlamaGen's train_t2i.py saves its argparse arguments next to the weights, under steps-numbered names
    directory, gpt, _ = checkpoints
    arguments = argparse.Namespace(image_size=384, downsample_size=16, gpt_model="GPT-XL")
    torch.save({"model": gpt, "optimizer": {}, "steps": 5000, "args": arguments}, tmp_path / "0005000.pt")
    assert _convert(directory, tmp_path / "0005000.pt").config.image_grid_size == 192


@pytest.mark.parametrize(
    "name, contents, given",
    [("t2i_XL_stage2_512.pt", None, 256), ("t2i_XL_stage1_256.pt", 512, None), ("0005000.pt", 384, 256)],
)
def test_an_inconsistent_image_size_is_refused_naming_each_source(checkpoints, tmp_path, name, contents, given):
    directory, gpt, _ = checkpoints
    saved = {"model": gpt} if contents is None else {"model": gpt, "args": argparse.Namespace(image_size=contents)}
    torch.save(saved, tmp_path / name)
    with pytest.raises(ValueError, match="inconsistent image sizes") as failure:
        _convert(directory, tmp_path / name, given)
    for size in filter(None, (contents, given, *map(int, re.findall(r"_(\d{3})\.pt", name)))):
        assert f"{size} px" in str(failure.value)


@pytest.mark.parametrize("name", ["t2i_gpt.pt", "checkpoint_1000.pt"])  # a step count is not a size
def test_an_unknown_image_size_is_asked_for(checkpoints, tmp_path, name):
    directory, gpt, _ = checkpoints
    torch.save({"model": gpt}, tmp_path / name)
    with pytest.raises(ValueError, match="Cannot tell the image size .* Give `image_size`"):
        _convert(directory, tmp_path / name)


def test_an_image_size_the_vq_model_cannot_tile_is_refused(checkpoints):
    directory, _, _ = checkpoints
    with pytest.raises(ValueError, match="image_size=9 is not a multiple of the VQ model's downsampling \\(2\\)"):
        _convert(directory, directory / "t2i_gpt.pt", 9)


def test_the_cli_converts_into_a_folder_that_load_model_reads(checkpoints, tmp_path, capsys):
    directory, _, _ = checkpoints
    flags = ["--gpt_checkpoint", str(directory / "t2i_gpt.pt"), "--vq_checkpoint", str(directory / "vq.pt")]
    flags += ["--text_encoder", str(directory / "t5"), "--image_size", "8", "--num_attention_heads", str(HEADS)]
    cli_main(["convert_llamagen", *flags, "--output_dir", str(tmp_path)])
    assert "2 layers × 32, 16 image tokens over 64 codes" in capsys.readouterr().out
    converted = LlamaGenForImageGeneration.from_pretrained(directory / "converted").state_dict()
    reloaded = load_model(str(tmp_path)).state_dict()
    assert converted.keys() == reloaded.keys() and all(torch.equal(converted[k], reloaded[k]) for k in converted)


@pytest.mark.slow
def test_a_converted_checkpoint_trains_end_to_end_through_accelerate_launch(checkpoints, tmp_path):
    directory, _, _ = checkpoints
    root = Path(__file__).parents[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/cpu.yaml",
        "--num_cpu_threads_per_process", "1", "scripts/grpo_t2i.py", "--config", "recipes/tiny/llamagen_demo.yaml",
        "--model_name_or_path", str(directory / "converted"), "--divergence", "js", "--max_steps", "2",
        "--per_device_train_batch_size", "8", "--num_generations", "4", "--image_log_steps", "0",
        "--logging_steps", "1", "--output_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    assert [log["step"] for log in history if "loss" in log] == [1, 2]
