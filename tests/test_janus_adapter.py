import re

import pytest
import torch
from peft import LoraConfig, get_peft_model

from trl_t2i.models import TINY_JANUS, JanusAdapter, build_tiny_janus, get_adapter, resolve_tiny, unwrap_model
from trl_t2i.sampling import image_token_logprobs


LM_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _lora(model, adapter):
    return get_peft_model(model, LoraConfig(r=4, target_modules=adapter.lora_target_modules, task_type="CAUSAL_LM"))


def test_prompts_are_chat_formatted_and_left_padded(tiny_janus):
    _, processor, adapter = tiny_janus
    input_ids, attention_mask = adapter.prepare_prompts(["sky", "a big blue dog on the beach"])
    assert attention_mask[0, 0] == 0 and attention_mask[:, -1].all()
    assert (input_ids[:, -1] == adapter.boi_token_id).all()
    assert (input_ids[attention_mask == 0] == adapter.pad_token_id).all()
    text = processor.tokenizer.decode(input_ids[0], skip_special_tokens=False)
    assert text.count("<|User|>") == 1 and "sky" in text


def test_unconditional_rows_keep_only_bos_and_begin_of_image(tiny_janus, prompts):
    _, _, adapter = tiny_janus
    input_ids, attention_mask = adapter.prepare_prompts(prompts)
    uncond_ids, uncond_mask = adapter.cfg_inputs(input_ids, attention_mask)
    assert torch.equal(uncond_mask, attention_mask)
    special = (input_ids == adapter.bos_token_id) | (input_ids == adapter.boi_token_id)
    assert torch.equal(uncond_ids[special], input_ids[special])
    assert (uncond_ids[~special] == adapter.pad_token_id).all()
    # the prompt is gone: only BOS and <begin_of_image> are left between the pads
    for row in uncond_ids:
        assert row[row != adapter.pad_token_id].tolist() == [adapter.bos_token_id, adapter.boi_token_id]


def test_decode_gives_uint8_images(tiny_janus):
    model, _, adapter = tiny_janus
    images = adapter.decode(model, torch.randint(0, adapter.codebook_size, (3, adapter.num_image_tokens)))
    assert images.shape == (3, 8, 8, 3) and images.dtype == torch.uint8


def test_lora_targets_only_language_model_linears(tiny_janus):
    model, _, adapter = tiny_janus
    peft_model = _lora(model, adapter)
    wrapped = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    num_layers = model.config.text_config.num_hidden_layers
    assert len(wrapped) == num_layers * len(LM_LINEARS)
    assert all(".language_model.layers." in name and name.rsplit(".", 1)[-1] in LM_LINEARS for name in wrapped)
    assert not any(part in name for name in wrapped for part in ("vision", "vqmodel", "aligner", "generation"))
    # a plain name list would also hit the vision tower's q/k/v projections: the regex is what avoids that
    vision = [name for name, _ in model.named_modules() if "vision_model" in name and name.endswith("q_proj")]
    assert vision and not any(re.fullmatch(adapter.lora_target_modules, name) for name in vision)


def test_quantization_skip_modules_are_full_paths_of_real_modules(tiny_janus):
    model, _, adapter = tiny_janus
    for path in adapter.quantization_skip_modules:
        assert isinstance(model.get_submodule(path), torch.nn.Module)


def test_4bit_loading_quantizes_only_the_language_model():
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from trl_t2i.models import load_model

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=JanusAdapter.quantization_skip_modules,
    )
    model = load_model(TINY_JANUS, quantization_config=config, dtype=torch.float32)
    quantized = [name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(".language_model.layers." in name for name in quantized)
    num_layers = model.config.text_config.num_hidden_layers
    assert len(quantized) == num_layers * len(LM_LINEARS)


def test_image_logits_go_through_peft_and_match_the_bare_model(tiny_janus, prompts):
    model, _, adapter = tiny_janus
    input_ids, attention_mask = adapter.prepare_prompts(prompts)
    tokens = torch.randint(0, adapter.codebook_size, (len(prompts), adapter.num_image_tokens))
    bare = adapter.image_logits(model, input_ids, attention_mask, tokens)
    peft_model = _lora(model, adapter)
    assert unwrap_model(peft_model) is model
    torch.testing.assert_close(adapter.image_logits(peft_model, input_ids, attention_mask, tokens), bare)
    for name, param in peft_model.named_parameters():  # perturb the adapters: logits must change, and not when off
        if "lora_B" in name:
            param.data.normal_()
    assert not torch.allclose(adapter.image_logits(peft_model, input_ids, attention_mask, tokens), bare)
    with peft_model.disable_adapter():
        torch.testing.assert_close(adapter.image_logits(peft_model, input_ids, attention_mask, tokens), bare)


def test_text_forward_still_works_after_patching(tiny_janus, prompts):
    model, _, adapter = tiny_janus
    input_ids, attention_mask = adapter.prepare_prompts(prompts)
    output = model(input_ids=input_ids, attention_mask=attention_mask)
    assert output.logits.shape == (*input_ids.shape, model.config.text_config.vocab_size)


def test_unpatched_model_is_a_clear_error_not_text_logits(prompts):
    model, processor = build_tiny_janus()
    adapter = get_adapter(model, processor)
    input_ids, attention_mask = adapter.prepare_prompts(prompts)
    tokens = torch.zeros(len(prompts), adapter.num_image_tokens, dtype=torch.long)
    with pytest.raises(RuntimeError, match="patch_forward"):
        image_token_logprobs(adapter, model, input_ids, attention_mask, tokens)


def test_unknown_model_type_lists_the_supported_ones():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="'llama'.*janus"):
        get_adapter(LlamaConfig(), processing_class=None)


def test_saved_tiny_processor_keeps_the_chat_template():
    from trl_t2i.models import load_processor

    processor = load_processor(resolve_tiny(TINY_JANUS))
    assert processor.chat_template and "<|User|>" in processor.chat_template
