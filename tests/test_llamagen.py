"""LlamaGen's model: what the family contract does not cover (saving, frozen parts, no dropout, checkpointing)."""

import pytest
import torch
from conftest import PROMPTS

from trl_t2i.models import (
    TINY_LLAMAGEN,
    LlamaGenForImageGeneration,
    build_tiny_llamagen,
    get_family,
    load_model,
    load_processor,
)


@pytest.fixture
def tiny():
    model, tokenizer = build_tiny_llamagen()
    family = get_family(model, tokenizer)
    tokens = torch.randint(0, family.codebook_size, (2 * len(PROMPTS), family.num_image_tokens))
    return model, tokenizer, family.guided_rows(family.encode_prompts(PROMPTS)), tokens


def _logits(model, rows, tokens):
    return model(**rows.tensors, image_tokens=tokens[:, :-1]).logits


def test_save_and_load_give_the_same_model_with_frozen_t5_and_vq(tiny, tmp_path):
    model, tokenizer, rows, tokens = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = LlamaGenForImageGeneration.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(loaded.eval(), rows, tokens), _logits(model, rows, tokens), atol=0, rtol=0)
    trainable = {name.split(".")[0] for name, param in loaded.named_parameters() if param.requires_grad}
    assert trainable == {"caption_embedder", "transformer", "image_head"}
    assert "caption_embedder.null_caption" in loaded.state_dict()  # saved, never trained


def test_similarity_embeddings_are_the_vq_codebook_vectors(tiny):
    # the paper's LlamaGen code compares `decode_code`'s z_q: the l2-normalised VQ codebook rows of the tokens
    model, tokenizer, _, tokens = tiny
    codebook = torch.nn.functional.normalize(model.vqmodel.quantize.embedding.weight, dim=-1)
    embeddings = get_family(model, tokenizer).similarity_embeddings(model, tokens)
    torch.testing.assert_close(embeddings, codebook[tokens])


def test_a_bf16_model_decodes_in_fp32_as_llamagen_does(tiny):
    # LlamaGen's sample_t2i.py keeps its VQ model in fp32: decoding the bf16 weights in fp32 is exactly decoding
    # their fp32 values, not a bf16 decode
    model, _, _, tokens = tiny
    rounded = model.to(torch.bfloat16).to(torch.float32).vqmodel
    codes = torch.nn.functional.normalize(rounded.quantize.embedding.weight, dim=-1)[tokens]
    side = model.config.image_grid_size
    latent = rounded.post_quant_conv(codes.view(len(tokens), side, side, -1).permute(0, 3, 1, 2))
    expected = rounded.decoder(latent).permute(0, 2, 3, 1)
    pixels = model.to(torch.bfloat16).decode_image_tokens(tokens)
    assert pixels.dtype == torch.float32
    torch.testing.assert_close(pixels, expected, atol=1e-6, rtol=0)


def test_a_bf16_load_keeps_the_vq_model_in_fp32_and_decodes_as_the_fp32_model(tiny, tmp_path):
    # LlamaGen's sample_t2i.py keeps its VQ model in fp32: loaded in bf16 (every GPU recipe), its weights are not
    # rounded, so the images are those of the fp32 model, bit for bit
    model, tokenizer, _, tokens = tiny
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert {parameter.dtype for parameter in loaded.vqmodel.parameters()} == {torch.float32}
    assert {parameter.dtype for parameter in loaded.transformer.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(loaded.decode_image_tokens(tokens), model.decode_image_tokens(tokens), atol=0, rtol=0)


def test_the_tiny_llamagen_loads_by_name():
    model, tokenizer = load_model(TINY_LLAMAGEN), load_processor(TINY_LLAMAGEN, padding_side="left")
    assert isinstance(model, LlamaGenForImageGeneration) and tokenizer.pad_token_id == 0
    assert get_family(model, tokenizer).num_image_tokens == 16


def test_train_mode_changes_nothing_no_dropout_acts(tiny):
    # T5 has dropout layers (rate 0.1 in the tiny model, as in FLAN-T5); LlamaGen's own dropouts do not exist here.
    model, _, rows, tokens = tiny
    evaluated = _logits(model.eval(), rows, tokens)
    model.train()
    assert not model.text_encoder.training and not model.vqmodel.training
    torch.testing.assert_close(_logits(model, rows, tokens), evaluated, atol=0, rtol=0)
    outside_t5 = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "text_encoder" not in n]
    assert all(dropout.p == 0 for dropout in outside_t5)  # the VQ decoder's, at LlamaGen's rate 0


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    model, _, rows, tokens = tiny
    model.train()

    def gradients():
        model.zero_grad()
        _logits(model, rows, tokens).logsumexp(-1).sum().backward()
        return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}

    plain = gradients()
    model.activation_checkpointing_enable({"use_reentrant": False})
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and any(name.startswith("transformer.layers") for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name])


def test_the_null_caption_is_its_last_rows_under_the_captions_mask(tiny):
    # LlamaGen's unconditional row: `uncond_embedding` left-padded like the caption, masked like it.
    model, tokenizer, _, tokens = tiny
    family = get_family(model, tokenizer)
    short, long = family.encode_prompts(["a cat"]), family.encode_prompts(["a big red cat on the sea"])
    caption_length = short.tensors["input_ids"].size(1)
    embedded = model.embed_captions(**family.unconditional(short).tensors)
    null = model.caption_embedder.null_caption[-caption_length:]
    torch.testing.assert_close(embedded[0], model.caption_embedder(null))
    unconditional_short = _logits(model, family.unconditional(short), tokens[:1])
    unconditional_long = _logits(model, family.unconditional(long), tokens[:1])
    assert not torch.allclose(unconditional_short, unconditional_long, atol=1e-4)


def test_captions_longer_than_the_model_reads_are_an_error(tiny):
    model, _, _, tokens = tiny
    ids = torch.ones(1, model.config.caption_length + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="at most 120"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
