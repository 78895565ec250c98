import pytest
import torch

from trl_t2i.sampling import image_token_logprobs, sample_image_tokens, warp_logits


WARPS = [{}, {"top_k": 5}, {"top_p": 0.8, "temperature": 0.7}, {"temperature": 1.3, "top_k": 10, "top_p": 0.9}]


def _generate(model, input_ids, attention_mask, **kwargs):
    return model.generate(
        input_ids=input_ids, attention_mask=attention_mask, generation_mode="image", guidance_scale=5.0, **kwargs
    )


def test_greedy_reproduces_generate(tiny_janus, prompts):
    model, _, adapter = tiny_janus
    input_ids, attention_mask = adapter.prepare_prompts(prompts)
    expected = _generate(model, input_ids, attention_mask, do_sample=False)
    ours = sample_image_tokens(adapter, model, input_ids, attention_mask, cfg_scale=5.0, do_sample=False)
    assert torch.equal(ours.image_tokens, expected)


@pytest.mark.parametrize("warp", WARPS)
def test_sampling_reproduces_generate_under_the_same_global_seed(tiny_janus, prompts, warp):
    model, _, adapter = tiny_janus
    input_ids, attention_mask = adapter.prepare_prompts(prompts)
    torch.manual_seed(3)
    # generate's own default top_k is 50; TRL's (and ours) is 0 = disabled
    expected = _generate(model, input_ids, attention_mask, do_sample=True, **{"top_k": 0, **warp})
    torch.manual_seed(3)
    ours = sample_image_tokens(adapter, model, input_ids, attention_mask, cfg_scale=5.0, **warp)
    assert torch.equal(ours.image_tokens, expected)


def test_generator_seeds_the_sampler(tiny_janus, prompts):
    model, _, adapter = tiny_janus
    input_ids, attention_mask = adapter.prepare_prompts(prompts * 4)

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        return sample_image_tokens(adapter, model, input_ids, attention_mask, generator=generator).image_tokens

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


@pytest.mark.parametrize("warp", WARPS)
@pytest.mark.parametrize("cfg_scale", [5.0, 1.0])
def test_teacher_forced_logprobs_equal_the_samplers(tiny_janus, prompts, warp, cfg_scale):
    model, _, adapter = tiny_janus
    input_ids, attention_mask = adapter.prepare_prompts(prompts)
    guided = cfg_scale != 1.0
    sample = sample_image_tokens(
        adapter, model, input_ids, attention_mask, cfg_scale=cfg_scale, return_conditional_logprobs=guided, **warp
    )
    for mode, recorded in [("guided", sample.logprobs), ("conditional", sample.conditional_logprobs)]:
        if recorded is None:  # cfg_scale == 1: conditional is the sampled distribution
            recorded = sample.logprobs
        full = image_token_logprobs(
            adapter,
            model,
            input_ids,
            attention_mask,
            sample.image_tokens,
            cfg_scale=cfg_scale,
            cfg_logprobs=mode,
            **warp,
        )
        assert full.shape == (*sample.image_tokens.shape, adapter.codebook_size)
        scored = full.gather(-1, sample.image_tokens[..., None]).squeeze(-1)
        torch.testing.assert_close(scored, recorded, atol=1e-5, rtol=0)
        assert torch.isfinite(scored).all()


def test_guided_and_conditional_logprobs_differ_when_guidance_is_on(tiny_janus, prompts):
    model, _, adapter = tiny_janus
    input_ids, attention_mask = adapter.prepare_prompts(prompts)
    sample = sample_image_tokens(
        adapter, model, input_ids, attention_mask, cfg_scale=5.0, return_conditional_logprobs=True
    )
    assert (sample.logprobs - sample.conditional_logprobs).abs().max() > 1e-2


def test_cfg_scale_one_skips_the_unconditional_rows(tiny_janus, prompts):
    model, _, adapter = tiny_janus
    input_ids, attention_mask = adapter.prepare_prompts(prompts)
    rows = []
    hook = model.model.generation_head.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    try:
        sample_image_tokens(adapter, model, input_ids, attention_mask, cfg_scale=1.0)
        image_token_logprobs(
            adapter, model, input_ids, attention_mask, torch.zeros(4, 16, dtype=torch.long), cfg_scale=1.0
        )
        assert set(rows) == {len(prompts)}
        rows.clear()
        sample_image_tokens(adapter, model, input_ids, attention_mask, cfg_scale=5.0)
        assert set(rows) == {2 * len(prompts)}
    finally:
        hook.remove()


def test_teacher_forced_logprobs_are_differentiable(tiny_janus, prompts):
    model, _, adapter = tiny_janus
    input_ids, attention_mask = adapter.prepare_prompts(prompts)
    tokens = sample_image_tokens(adapter, model, input_ids, attention_mask).image_tokens
    full = image_token_logprobs(adapter, model, input_ids, attention_mask, tokens)
    full.gather(-1, tokens[..., None]).sum().backward()
    grads = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("language_model" in name for name in grads)
    assert any("generation_head" in name for name in grads)
    assert not any("vqmodel" in name or "vision_model" in name for name in grads)


def test_bad_cfg_logprobs_is_rejected(tiny_janus, prompts):
    model, _, adapter = tiny_janus
    input_ids, attention_mask = adapter.prepare_prompts(prompts)
    with pytest.raises(ValueError, match="'cond'.*guided, conditional"):
        image_token_logprobs(
            adapter, model, input_ids, attention_mask, torch.zeros(4, 16, dtype=torch.long), cfg_logprobs="cond"
        )


@pytest.mark.parametrize("top_k", [1, 3, 7])
def test_top_k_keeps_exactly_k_tokens(top_k):
    logits = torch.randn(5, 20)
    kept = torch.isfinite(warp_logits(logits, top_k=top_k))
    assert (kept.sum(-1) == top_k).all()
    assert torch.equal(kept, logits >= logits.topk(top_k, dim=-1).values[:, -1:])


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9])
def test_top_p_keeps_the_smallest_nucleus(top_p):
    logits = torch.randn(6, 30)
    kept = torch.isfinite(warp_logits(logits, top_p=top_p))
    probs = logits.softmax(-1)
    for row in range(logits.size(0)):
        order = probs[row].argsort(descending=True)
        cumulative = probs[row][order].cumsum(0)
        size = int((cumulative < top_p).sum()) + 1  # smallest prefix whose mass reaches top_p
        assert set(order[:size].tolist()) == set(kept[row].nonzero().flatten().tolist())


def test_temperature_divides_the_logits():
    logits = torch.randn(3, 8)
    torch.testing.assert_close(warp_logits(logits, temperature=0.5), logits * 2)
