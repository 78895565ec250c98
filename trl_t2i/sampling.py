"""Classifier-free-guidance sampling of image tokens, and the matching teacher-forced log-probs.

Both paths build the token distribution with the same function, `token_logits`: the guided logits
`l_u + s·(l_c − l_u)` (or the conditional logits alone) in fp32, then temperature, top-k and top-p, in the order
`transformers`' `generate` applies them. So the log-prob the sampler records for a token equals the log-prob that
teacher forcing computes for it (to float round-off), which is what makes GRPO's importance ratios exactly 1 on the
first update.

`cfg_logprobs` chooses the distribution that training scores:

* `"guided"`: the guided distribution that was sampled. Exactly on-policy; the scoring forward runs the
  conditional and unconditional rows.
* `"conditional"`: the conditional branch alone (what T2I-R1 and the paper's Janus code do), with the temperature
  but without top-k/top-p (a guided sample may lie outside the conditional top-k, where its log-prob would be
  `-inf`). Cheaper, but off-policy whenever `cfg_scale != 1`: the samples do not come from the distribution being
  optimised.

With top-k/top-p the guided distribution is the truncated one, for the sampler and for training alike.
"""

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import trange

from .models.base import T2IAdapter, unwrap_model


CFG_LOGPROBS = ("guided", "conditional")


@dataclass
class SampleOutput:
    """What `sample_image_tokens` returns.

    Attributes:
        image_tokens: `(B, N)` sampled image tokens.
        logprobs: `(B, N)` log-prob of each token under the distribution it was sampled from.
        conditional_logprobs: `(B, N)` log-prob of each token under the conditional branch alone (same temperature,
            no top-k/top-p), when asked for; else `None`.
    """

    image_tokens: torch.LongTensor
    logprobs: torch.Tensor
    conditional_logprobs: torch.Tensor | None = None


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on the last dimension; removed tokens get `-inf`.

    Same semantics as `transformers`' warpers: `top_k=0` and `top_p=1.0` disable them, and top-p keeps the smallest
    set of most likely tokens whose probability reaches `top_p` (at least one).
    """
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= 1 - top_p
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def token_logits(
    conditional: torch.Tensor,
    unconditional: torch.Tensor | None,
    cfg_scale: float,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Warped fp32 logits of the guided distribution (or of the conditional one when `unconditional` is `None`)."""
    logits = conditional.float()
    if unconditional is not None:
        unconditional = unconditional.float()
        logits = unconditional + (logits - unconditional) * cfg_scale
    return warp_logits(logits, temperature, top_k, top_p)


@torch.no_grad()
def sample_image_tokens(
    adapter: T2IAdapter,
    model: nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor,
    *,
    cfg_scale: float = 5.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
    generator: torch.Generator | None = None,
    return_conditional_logprobs: bool = False,
    show_progress: bool = False,
) -> SampleOutput:
    """Sample one image per prompt row with a KV cache, all rows in one batch.

    Args:
        adapter: the model family's adapter.
        model: the model; DDP/PEFT wrappers are stripped (LoRA layers stay active in the bare model).
        input_ids, attention_mask: `(B, P)` left-padded prompts from `adapter.prepare_prompts`.
        cfg_scale: guidance scale `s`; the unconditional rows run only when `s != 1`.
        temperature, top_k, top_p: applied to the guided logits (`top_k=0`/`top_p=1.0` disable them).
        do_sample: sample (`True`) or take the most likely token (greedy).
        generator: RNG for `torch.multinomial`; `None` uses the global RNG (as `generate` does).
        return_conditional_logprobs: also record the conditional-branch log-prob of each token.
        show_progress: show a progress bar over image positions.
    """
    model = unwrap_model(model)
    batch_size = input_ids.size(0)
    guided = cfg_scale != 1.0
    if guided:
        uncond_ids, uncond_mask = adapter.cfg_inputs(input_ids, attention_mask)
        input_ids, attention_mask = torch.cat([input_ids, uncond_ids]), torch.cat([attention_mask, uncond_mask])
    elif return_conditional_logprobs:
        raise ValueError("With cfg_scale=1 the sampled distribution is the conditional one; use `logprobs`.")

    logits, state = adapter.prefill(model, input_ids, attention_mask)
    tokens, logprobs, conditional_logprobs = [], [], []
    for position in trange(adapter.num_image_tokens, desc="Sampling image tokens", disable=not show_progress):
        conditional, unconditional = (logits[:batch_size], logits[batch_size:]) if guided else (logits, None)
        warped = token_logits(conditional, unconditional, cfg_scale, temperature, top_k, top_p)
        if do_sample:
            token = torch.multinomial(warped.softmax(dim=-1), num_samples=1, generator=generator).squeeze(-1)
        else:
            token = warped.argmax(dim=-1)
        tokens.append(token)
        logprobs.append(warped.log_softmax(dim=-1).gather(-1, token[:, None]).squeeze(-1))
        if return_conditional_logprobs:
            conditional_dist = token_logits(conditional, None, cfg_scale, temperature).log_softmax(dim=-1)
            conditional_logprobs.append(conditional_dist.gather(-1, token[:, None]).squeeze(-1))
        if position + 1 < adapter.num_image_tokens:
            logits = adapter.step(model, token.repeat(2) if guided else token, state)

    return SampleOutput(
        image_tokens=torch.stack(tokens, dim=1),
        logprobs=torch.stack(logprobs, dim=1),
        conditional_logprobs=torch.stack(conditional_logprobs, dim=1) if return_conditional_logprobs else None,
    )


def image_token_logprobs(
    adapter: T2IAdapter,
    model: nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor,
    image_tokens: torch.LongTensor,
    *,
    cfg_scale: float = 5.0,
    cfg_logprobs: str = "guided",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Teacher-forced log-probs `(B, N, V)` over the codebook at every image position, differentiable.

    Runs through `model`'s own (possibly DDP/PEFT-wrapped) `forward`, so gradients are all-reduced. The
    distribution is the one `cfg_logprobs` names (see the module docstring), warped like the sampler's.
    """
    if cfg_logprobs not in CFG_LOGPROBS:
        raise ValueError(f"Unknown cfg_logprobs {cfg_logprobs!r}. Valid choices: {', '.join(CFG_LOGPROBS)}.")
    batch_size = input_ids.size(0)
    guided = cfg_logprobs == "guided" and cfg_scale != 1.0
    if guided:
        uncond_ids, uncond_mask = adapter.cfg_inputs(input_ids, attention_mask)
        input_ids, attention_mask = torch.cat([input_ids, uncond_ids]), torch.cat([attention_mask, uncond_mask])
        image_tokens = image_tokens.repeat(2, 1)
    logits = adapter.image_logits(model, input_ids, attention_mask, image_tokens)
    if guided:
        warped = token_logits(logits[:batch_size], logits[batch_size:], cfg_scale, temperature, top_k, top_p)
    elif cfg_scale == 1.0:  # the conditional distribution is the sampled one: warp it like the sampler did
        warped = token_logits(logits, None, cfg_scale, temperature, top_k, top_p)
    else:
        warped = token_logits(logits, None, cfg_scale, temperature)
    return warped.log_softmax(dim=-1)
