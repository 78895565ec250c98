"""The contract every model family fulfils, run for each registered family (see `FAMILY_CASES` in conftest.py)."""

import copy
import re

import pytest
import torch
from conftest import FAMILY_CASES
from peft import LoraConfig, get_peft_model

from trl_t2i.decoding import sample_image_tokens
from trl_t2i.models import FAMILIES, get_family, unwrap_model
from trl_t2i.sampling import SamplingConfig, image_logp_table


WARPS = [
    SamplingConfig(),
    SamplingConfig(top_k=5),
    SamplingConfig(top_p=0.8, temperature=0.7),
    SamplingConfig(temperature=1.3, top_k=10, top_p=0.9),
]


def _lora(model, family):
    return get_peft_model(model, LoraConfig(r=4, target_modules=family.lora_target_modules))


def _random_tokens(family, rows):
    return torch.randint(0, family.codebook_size, (rows, family.num_image_tokens))


def test_every_registered_family_has_a_contract_case():
    assert set(FAMILY_CASES) == set(FAMILIES)


def test_greedy_sampling_reproduces_the_reference_generation(tiny_family, prompts):
    model, _, family, case = tiny_family
    conditioning = family.encode_prompts(prompts)
    sampling = SamplingConfig(cfg_scale=5.0)
    expected = case.reference_generate(model, family, conditioning, sampling, do_sample=False)
    assert torch.equal(
        sample_image_tokens(family, model, conditioning, sampling, do_sample=False).image_tokens, expected
    )


@pytest.mark.parametrize("sampling", WARPS, ids=str)
def test_sampling_reproduces_the_reference_generation_under_the_same_seed(tiny_family, prompts, sampling):
    model, _, family, case = tiny_family
    conditioning = family.encode_prompts(prompts)
    torch.manual_seed(3)
    expected = case.reference_generate(model, family, conditioning, sampling, do_sample=True)
    torch.manual_seed(3)
    assert torch.equal(sample_image_tokens(family, model, conditioning, sampling).image_tokens, expected)


def test_a_generator_seeds_the_sampler(tiny_family, prompts):
    model, _, family, _ = tiny_family
    conditioning = family.encode_prompts(prompts * 4)

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        return sample_image_tokens(family, model, conditioning, generator=generator).image_tokens

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


@pytest.mark.parametrize("warp", WARPS, ids=str)
@pytest.mark.parametrize("cfg_scale", [5.0, 1.0])
def test_teacher_forced_logps_equal_the_samplers(tiny_family, prompts, warp, cfg_scale):
    model, _, family, _ = tiny_family
    sampling = SamplingConfig(cfg_scale, warp.temperature, warp.top_k, warp.top_p)
    conditioning = family.encode_prompts(prompts)
    sample = sample_image_tokens(family, model, conditioning, sampling, return_conditional_logps=sampling.guided)
    # with cfg_scale 1 the conditional distribution is the sampled one
    recorded = {"guided": sample.logps, "conditional": sample.conditional_logps if sampling.guided else sample.logps}
    for cfg_logprobs, logps in recorded.items():
        table = image_logp_table(family, model, conditioning, sample.image_tokens, sampling, cfg_logprobs)
        assert table.shape == (*sample.image_tokens.shape, family.codebook_size)
        scored = table.gather(-1, sample.image_tokens[..., None]).squeeze(-1)
        torch.testing.assert_close(scored, logps, atol=1e-5, rtol=0)
        assert torch.isfinite(scored).all()


def test_guided_and_conditional_logps_differ_when_guidance_is_on(tiny_family, prompts):
    model, _, family, _ = tiny_family
    sample = sample_image_tokens(family, model, family.encode_prompts(prompts), return_conditional_logps=True)
    assert (sample.logps - sample.conditional_logps).abs().max() > 1e-2


def test_a_rows_logits_do_not_depend_on_its_batch(tiny_family, prompts):
    # Padding and masks are the family's: a caption scored alone or next to longer ones gives the same logits.
    model, _, family, _ = tiny_family
    tokens = _random_tokens(family, len(prompts))
    batched = family.image_logits(model, family.guided_rows(family.encode_prompts(prompts)), tokens.repeat(2, 1))
    for row, prompt in enumerate(prompts):
        alone = family.image_logits(model, family.guided_rows(family.encode_prompts([prompt])), tokens[[row, row]])
        torch.testing.assert_close(alone, batched[[row, len(prompts) + row]], atol=1e-5, rtol=1e-5)


def test_unconditional_rows_ignore_the_words_of_the_caption(tiny_family):
    model, _, family, _ = tiny_family
    conditioning = family.encode_prompts(["a red cat", "a blue dog"])  # same length, different words
    unconditional = family.unconditional(conditioning)
    assert len(unconditional) == len(conditioning) and len(family.guided_rows(conditioning)) == 2 * len(conditioning)
    tokens = _random_tokens(family, 1).repeat(2, 1)
    conditional_logits = family.image_logits(model, conditioning, tokens)
    assert not torch.allclose(conditional_logits[0], conditional_logits[1], atol=1e-3)
    logits = family.image_logits(model, unconditional, tokens)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)


def test_cfg_scale_one_runs_only_the_conditional_rows(tiny_family, prompts):
    model, _, family, _ = tiny_family
    conditioning = family.encode_prompts(prompts)
    rows = []
    original = family.image_logits

    def counting_prefill(model, conditioning, _prefill=family.prefill, **kwargs):
        rows.append(len(conditioning))
        return _prefill(model, conditioning, **kwargs)

    family.prefill = counting_prefill
    family.image_logits = lambda model, conditioning, tokens: (
        rows.append(len(conditioning)) or original(model, conditioning, tokens)
    )
    tokens = _random_tokens(family, len(prompts))
    sample_image_tokens(family, model, conditioning, SamplingConfig(cfg_scale=1.0))
    image_logp_table(family, model, conditioning, tokens, SamplingConfig(cfg_scale=1.0))
    assert rows == [len(prompts)] * 2
    rows.clear()
    sample_image_tokens(family, model, conditioning, SamplingConfig(cfg_scale=5.0))
    image_logp_table(family, model, conditioning, tokens, SamplingConfig(cfg_scale=5.0))
    image_logp_table(family, model, conditioning, tokens, SamplingConfig(cfg_scale=5.0), cfg_logprobs="conditional")
    assert rows == [2 * len(prompts), 2 * len(prompts), len(prompts)]


def test_teacher_forced_logps_are_differentiable_through_the_language_model_only(tiny_family, prompts):
    model, _, family, case = tiny_family
    conditioning = family.encode_prompts(prompts)
    tokens = sample_image_tokens(family, model, conditioning).image_tokens
    image_logp_table(family, model, conditioning, tokens).gather(-1, tokens[..., None]).sum().backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(case.language_model_prefix in f".{name}" for name in trained)
    frozen_parts = [path for path in family.quantization_skip_modules if path != "lm_head"]
    image_side = [name for name in trained if any(name.startswith(path) for path in frozen_parts)]
    # the image head (and the image-token embedding path) learn; the decoder and any vision encoder never see a grad
    assert not any(word in name for name in image_side for word in ("vqmodel", "vision_model", "decoder"))


def test_bad_cfg_logprobs_is_rejected(tiny_family, prompts):
    model, _, family, _ = tiny_family
    with pytest.raises(ValueError, match="'cond'.*guided, conditional"):
        image_logp_table(
            family, model, family.encode_prompts(prompts), _random_tokens(family, len(prompts)), cfg_logprobs="cond"
        )


def test_decode_gives_uint8_images(tiny_family):
    model, _, family, _ = tiny_family
    images = family.decode(model, _random_tokens(family, 3))
    assert images.dim() == 4 and images.shape[0] == 3 and images.shape[-1] == 3
    assert images.dtype == torch.uint8 and images.shape[1] == images.shape[2]


def test_lora_targets_only_language_model_linears(tiny_family):
    model, _, family, case = tiny_family
    peft_model = _lora(model, family)
    wrapped = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    assert wrapped and all(case.language_model_prefix in name for name in wrapped)
    skipped = [path for path in family.quantization_skip_modules]
    assert not any(f"model.{path}." in name or name.endswith(f".{path}") for name in wrapped for path in skipped)
    # every linear that is not in the language model stays out of the regex
    others = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and case.language_model_prefix not in f".{n}"
    ]
    assert others and not any(re.fullmatch(family.lora_target_modules, name) for name in others)


def test_quantization_skip_modules_are_full_paths_of_real_modules(tiny_family):
    model, _, family, _ = tiny_family
    for path in family.quantization_skip_modules:
        assert isinstance(model.get_submodule(path), torch.nn.Module)


def test_4bit_loading_quantizes_only_the_language_model(tiny_family, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from trl_t2i.models import load_model

    model, processor, family, case = tiny_family
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    quantized_model = load_model(str(tmp_path), quantization_config=config, dtype=torch.float32)
    quantized = [name for name, m in quantized_model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(case.language_model_prefix in f".{name}" for name in quantized)


def test_image_logits_go_through_peft_and_match_the_bare_model(tiny_family, prompts):
    model, _, family, _ = tiny_family
    conditioning = family.encode_prompts(prompts)
    tokens = _random_tokens(family, len(prompts))
    bare = family.image_logits(model, conditioning, tokens)
    peft_model = _lora(model, family)
    assert unwrap_model(peft_model) is model
    torch.testing.assert_close(family.image_logits(peft_model, conditioning, tokens), bare)
    for name, param in peft_model.named_parameters():  # perturb the adapters: logits must change, and not when off
        if "lora_B" in name:
            param.data.normal_()
    assert not torch.allclose(family.image_logits(peft_model, conditioning, tokens), bare)
    with peft_model.disable_adapter():
        torch.testing.assert_close(family.image_logits(peft_model, conditioning, tokens), bare)


def test_an_unpatched_model_is_a_clear_error_not_text_logits(tiny_family, prompts):
    _, _, _, case = tiny_family
    model, processor = case.build()
    family = get_family(model, processor)
    with pytest.raises(RuntimeError, match="patch_forward"):
        image_logp_table(family, model, family.encode_prompts(prompts), _random_tokens(family, len(prompts)))


def test_a_deep_copy_of_a_patched_model_scores_with_its_own_weights(tiny_family, prompts):
    # e.g. the frozen reference of a full fine-tune, copied from a policy that evaluation had patched already
    model, _, family, _ = tiny_family
    copied = copy.deepcopy(model)
    family.patch_forward(copied)
    with torch.no_grad():
        for param in copied.parameters():
            param.add_(torch.randn_like(param), alpha=0.1)
    conditioning = family.encode_prompts(prompts)
    tokens = _random_tokens(family, len(prompts))
    own = family.teacher_forced_logits(copied, conditioning, tokens)
    torch.testing.assert_close(family.image_logits(copied, conditioning, tokens), own)
    assert not torch.allclose(family.image_logits(model, conditioning, tokens), own)
    # a call without image tokens runs the copy's own unpatched forward too
    inputs = {name: conditioning.tensors[name] for name in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(copied(**inputs).logits, type(copied).forward(copied, **inputs).logits)


def test_sampler_entropies_are_those_of_the_teacher_forced_distribution(tiny_family, prompts):
    from trl_t2i.sampling import position_entropy

    model, _, family, _ = tiny_family
    conditioning, sampling = family.encode_prompts(prompts), SamplingConfig(top_k=10)
    sample = sample_image_tokens(family, model, conditioning, sampling, return_entropies=True)
    table = image_logp_table(family, model, conditioning, sample.image_tokens, sampling)
    torch.testing.assert_close(sample.entropies, position_entropy(table), atol=1e-5, rtol=1e-5)


def test_similarity_embeddings_embed_each_token(tiny_family):
    model, _, family, _ = tiny_family
    tokens = _random_tokens(family, 3)
    embeddings = family.similarity_embeddings(model, tokens)
    assert embeddings.shape[:2] == tokens.shape and embeddings.dim() == 3
    same = family.similarity_embeddings(model, tokens[:, :1].expand_as(tokens))
    torch.testing.assert_close(same[:, 1:], same[:, :1].expand_as(same[:, 1:]))  # a token's embedding, wherever it is


def test_decoding_ignores_autocast(tiny_family):
    # each family decodes in its reference code's precision, whatever autocast the caller runs under
    model, _, family, _ = tiny_family
    tokens = _random_tokens(family, 4)
    expected = family.decode(model, tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(family.decode(model, tokens), expected)


def _cached_keys(state):
    """The keys of every layer of a decode's cache."""
    return [layer.keys for layer in state.cache.layers]


def test_the_decode_cache_is_allocated_once_not_grown_every_step(tiny_family, prompts):
    model, _, family, _ = tiny_family
    conditioning = family.guided_rows(family.encode_prompts(prompts))
    with torch.no_grad():
        _, state = family.prefill(model, conditioning)
        storages = [keys.untyped_storage().data_ptr() for keys in _cached_keys(state)]
        prompt_length = _cached_keys(state)[0].size(2)
        for _ in range(family.num_image_tokens - 1):  # every step the sampler takes
            family.step(model, torch.zeros(len(conditioning), dtype=torch.long), state)
    assert [keys.untyped_storage().data_ptr() for keys in _cached_keys(state)] == storages
    assert all(keys.size(2) == prompt_length + family.num_image_tokens - 1 for keys in _cached_keys(state))


def test_a_group_of_copies_of_a_prompt_is_prefilled_once_and_samples_like_the_reference(tiny_family, prompts):
    model, _, family, case = tiny_family
    conditioning, sampling = family.encode_prompts([p for p in prompts for _ in range(3)]), SamplingConfig(top_k=10)
    rows = []

    def counting_prefill(model, conditioning, _prefill=family.prefill, **kwargs):
        rows.append(len(conditioning))
        return _prefill(model, conditioning, **kwargs)

    family.prefill = counting_prefill
    torch.manual_seed(3)
    sample = sample_image_tokens(family, model, conditioning, sampling)
    assert rows[0] <= 2 * len(prompts)  # one conditional (and at most one unconditional) row per distinct prompt
    torch.manual_seed(3)
    assert torch.equal(sample.image_tokens, case.reference_generate(model, family, conditioning, sampling, True))
    scored = image_logp_table(family, model, conditioning, sample.image_tokens, sampling)
    torch.testing.assert_close(
        scored.gather(-1, sample.image_tokens[..., None]).squeeze(-1), sample.logps, atol=1e-5, rtol=0
    )


def test_an_fp32_image_head_takes_the_hidden_states_of_a_bf16_model(tiny_family):
    # the H200 run: transformers' own `generate` of a bf16 Janus failed once `load_model` kept its head in fp32
    model, _, family, _ = tiny_family
    model = copy.deepcopy(model).to(torch.bfloat16)
    family.upcast_image_head(model)
    family.upcast_image_head(model)  # once is enough: a second call changes nothing
    head = model.get_submodule(family.image_head)
    hidden = torch.randn(2, 3, model.config.get_text_config().hidden_size, dtype=torch.bfloat16)
    logits = head(hidden)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, head(hidden.float()), rtol=0, atol=0)


def test_transformers_generate_runs_on_a_bf16_janus_loaded_with_its_fp32_head():
    from trl_t2i import TINY_JANUS, load_model, load_processor

    model = load_model(TINY_JANUS, dtype=torch.bfloat16)
    processor = load_processor(TINY_JANUS)
    inputs = processor(text=["a red cat"], generation_mode="image", return_tensors="pt")
    images = model.generate(**inputs, generation_mode="image", do_sample=True, guidance_scale=5.0)
    assert images.shape == (1, get_family(model, processor).num_image_tokens)
