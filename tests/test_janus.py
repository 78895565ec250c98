"""Janus specifics beyond the family contract (`test_family_contract.py`): the chat format, the exact unconditional
rows of transformers' `generate`, and the exact LoRA/4-bit layer sets."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from trl_t2i.models import TINY_JANUS, JanusFamily, get_family, load_model, load_processor, resolve_name


LM_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_prompts_are_chat_formatted_and_left_padded(tiny_janus):
    _, processor, family = tiny_janus
    input_ids, attention_mask = family.tokenize_prompts(["sky", "a big blue dog on the beach"])
    assert attention_mask[0, 0] == 0 and attention_mask[:, -1].all()
    assert (input_ids[:, -1] == family.boi_token_id).all()
    assert (input_ids[attention_mask == 0] == family.pad_token_id).all()
    text = processor.tokenizer.decode(input_ids[0], skip_special_tokens=False)
    assert text.count("<|User|>") == 1 and "sky" in text


def test_unconditional_rows_keep_only_bos_and_begin_of_image(tiny_janus, prompts):
    _, _, family = tiny_janus
    conditioning = family.encode_prompts(prompts)
    input_ids, attention_mask = conditioning.tensors["input_ids"], conditioning.tensors["attention_mask"]
    unconditional = family.unconditional(conditioning).tensors
    assert torch.equal(unconditional["attention_mask"], attention_mask)
    special = (input_ids == family.bos_token_id) | (input_ids == family.boi_token_id)
    assert torch.equal(unconditional["input_ids"][special], input_ids[special])
    assert (unconditional["input_ids"][~special] == family.pad_token_id).all()
    for row in unconditional["input_ids"]:  # the prompt is gone: only BOS and <begin_of_image> are left
        assert row[row != family.pad_token_id].tolist() == [family.bos_token_id, family.boi_token_id]


def test_lora_wraps_every_language_model_linear_and_nothing_else(tiny_janus):
    model, _, family = tiny_janus
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=family.lora_target_modules))
    wrapped = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    assert len(wrapped) == model.config.text_config.num_hidden_layers * len(LM_LINEARS)
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == LM_LINEARS
    # a plain name list would also hit the vision tower's q/k/v projections: the regex is what avoids that
    assert any("vision_model" in name and name.endswith("q_proj") for name, _ in model.named_modules())


def test_4bit_loading_quantizes_every_language_model_linear():
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = load_model(TINY_JANUS, quantization_config=config, dtype=torch.float32)
    quantized = [name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == model.config.text_config.num_hidden_layers * len(LM_LINEARS)
    assert not isinstance(model.model.generation_aligner.fc1, bnb.nn.Linear4bit)  # in_features 8, as in Janus-Pro
    assert set(JanusFamily.quantization_skip_modules) <= set(model.config.quantization_config.llm_int8_skip_modules)


def test_similarity_embeddings_are_the_generation_embeddings(tiny_janus):
    # the paper's Janus code compares `prepare_gen_img_embeds`: the generation embedding, then its aligner
    model, _, family = tiny_janus
    tokens = torch.randint(0, family.codebook_size, (3, family.num_image_tokens))
    expected = model.model.generation_aligner(model.model.generation_embeddings(tokens))
    torch.testing.assert_close(family.similarity_embeddings(model, tokens), expected)


def test_a_bf16_model_decodes_in_bf16_as_janus_does(tiny_janus):
    # deepseek-ai/Janus decodes with the whole model in bf16 (no autocast): so do we, with a bf16 model
    model, _, family = tiny_janus
    tokens = torch.randint(0, family.codebook_size, (3, family.num_image_tokens))
    model.to(torch.bfloat16)
    pixels = model.model.vqmodel.decode(tokens).permute(0, 2, 3, 1)
    expected = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(family.decode(model, tokens), expected)


def test_text_forward_still_works_after_patching(tiny_janus, prompts):
    model, _, family = tiny_janus
    input_ids, attention_mask = family.tokenize_prompts(prompts)
    output = model(input_ids=input_ids, attention_mask=attention_mask)
    assert output.logits.shape == (*input_ids.shape, model.config.text_config.vocab_size)


def test_unknown_model_type_lists_the_supported_ones():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="'llama'.*janus"):
        get_family(LlamaConfig(), processing_class=None)


def test_saved_tiny_processor_keeps_the_chat_template():
    processor = load_processor(resolve_name(TINY_JANUS))
    assert processor.chat_template and "<|User|>" in processor.chat_template
