"""Classifier-free-guidance sampling of image tokens, and the matching teacher-forced log-probs.

`SamplingConfig` names that distribution (guidance scale, temperature, top-k, top-p) once, for the trainer and every
command. Both paths build it with the same function, `token_logits`: the guided logits `l_u + s·(l_c − l_u)` (or the
conditional logits alone) in fp32, then temperature, top-k and top-p, in the order `transformers`' `generate` applies
them. So the log-prob the sampler records for a token equals the log-prob that teacher forcing computes for it (to
float round-off), which is what makes GRPO's importance ratios exactly 1 on the first update.

`cfg_logprobs` chooses the distribution that training scores:

* `"guided"`: the guided distribution that was sampled. Exactly on-policy; the scoring forward runs the
  conditional and unconditional rows.
* `"conditional"`: the conditional branch alone (what T2I-R1 and the paper's Janus code do), with the temperature
  but without top-k/top-p (a guided sample may lie outside the conditional top-k, where its log-prob would be
  `-inf`). Cheaper, but off-policy whenever `cfg_scale != 1`: the samples do not come from the distribution being
  optimised.

With top-k/top-p the guided distribution is the truncated one, for the sampler and for the policy-gradient term alike;
after an update a token sampled earlier may fall outside the current truncated support, where its log-prob is
`-inf`. The trainer floors such per-token log-probs at `MIN_LOGP` (no gradient, an importance ratio of 0) and
computes the divergence penalty between the untruncated distributions (`teacher_forced_logits`), which share their
support, so nothing becomes NaN or infinite.

Names: `*_logps` are per-token log-probs `(B, N)` (TRL's word); `*_logp_table` are the log-probs of the whole
codebook at every image position `(B, N, V)`.
"""

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import trange

from .metrics import position_entropy
from .models.base import Conditioning, ModelFamily, unwrap_model


CFG_LOGPROBS = ("guided", "conditional")

MIN_LOGP = -1e4
"""Floor of a per-token log-prob outside the truncated support: `exp` of it (or of it minus a finite log-prob) is 0
in float32, and the floor has no gradient."""


@dataclass(frozen=True)
class SamplingConfig:
    """The distribution image tokens are sampled from, shared by training, `sample`, `evaluate` and `frontier`.

    Args:
        cfg_scale (`float`, *optional*, defaults to `5.0`):
            Classifier-free guidance scale `s`: logits `l_u + s·(l_c − l_u)`. `1.0` turns guidance off and skips the
            unconditional rows.
        temperature (`float`, *optional*, defaults to `1.0`):
            Divides the guided logits.
        top_k (`int`, *optional*, defaults to `0`):
            Keep only the `top_k` most likely codes (`0` disables it).
        top_p (`float`, *optional*, defaults to `1.0`):
            Keep the smallest set of most likely codes whose probability reaches `top_p` (`1.0` disables it).
    """

    cfg_scale: float = 5.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.cfg_scale <= 0:
            raise ValueError(f"`cfg_scale` must be > 0 (1.0 disables guidance), got {self.cfg_scale}.")
        if self.temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature}.")
        if self.top_k is None or self.top_k < 0:
            raise ValueError(f"`top_k` must be >= 0 (0 disables it), got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1] (1.0 disables it), got {self.top_p}.")

    @property
    def guided(self) -> bool:
        """Whether the unconditional rows run at all."""
        return self.cfg_scale != 1.0


@dataclass
class SampleOutput:
    """What `sample_image_tokens` returns.

    Attributes:
        image_tokens: `(B, N)` sampled image tokens.
        logps: `(B, N)` log-prob of each token under the distribution it was sampled from.
        conditional_logps: `(B, N)` log-prob of each token under the conditional branch alone (same temperature,
            no top-k/top-p), when asked for; else `None`.
        entropies: `(B, N)` entropy of the distribution each token was sampled from, when asked for; else `None`.
    """

    image_tokens: torch.LongTensor
    logps: torch.Tensor
    conditional_logps: torch.Tensor | None = None
    entropies: torch.Tensor | None = None


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
    sampling: SamplingConfig,
    *,
    truncate: bool = True,
) -> torch.Tensor:
    """Warped fp32 logits of the guided distribution (or of the conditional one when `unconditional` is `None`).

    `truncate=False` applies the temperature only (no top-k/top-p).
    """
    logits = conditional.float()
    if unconditional is not None:
        unconditional = unconditional.float()
        logits = unconditional + (logits - unconditional) * sampling.cfg_scale
    if not truncate:
        return warp_logits(logits, sampling.temperature)
    return warp_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)


@torch.no_grad()
def sample_image_tokens(
    family: ModelFamily,
    model: nn.Module,
    conditioning: Conditioning,
    sampling: SamplingConfig = SamplingConfig(),
    *,
    do_sample: bool = True,
    generator: torch.Generator | None = None,
    return_conditional_logps: bool = False,
    return_entropies: bool = False,
    compile: bool = False,
    show_progress: bool = False,
) -> SampleOutput:
    """Sample one image per conditional row with a KV cache, all rows in one batch. Consecutive identical rows (a
    group's copies of a prompt) share one prefill (`prefill_distinct_rows`).

    Args:
        family: the model family.
        model: the model; DDP/PEFT wrappers are stripped (LoRA layers stay active in the bare model).
        conditioning: the conditional rows, from `family.encode_prompts` (or `build_conditioning`).
        sampling: guidance and warping; the unconditional rows run only when `sampling.cfg_scale != 1`.
        do_sample: sample (`True`) or take the most likely token (greedy).
        generator: RNG for `torch.multinomial`; `None` uses the global RNG (as `generate` does).
        return_conditional_logps: also record the conditional-branch log-prob of each token.
        return_entropies: also record the entropy of the distribution each token was sampled from.
        compile: decode with a static KV cache and a `torch.compile`d step (CUDA graphs on GPU), compiled at the
            first call and reused while the shapes stay the same: the same tokens and log-probs as the eager loop,
            much less per-step overhead where the model is small or the host is the bottleneck.
        show_progress: show a progress bar over image positions.
    """
    model = unwrap_model(model)
    batch_size = len(conditioning)
    if sampling.guided:
        conditioning = family.guided_rows(conditioning)
    elif return_conditional_logps:
        raise ValueError("With cfg_scale=1 the sampled distribution is the conditional one; use `logps`.")

    step = compiled_step(family, cuda_graphs=model.device.type == "cuda") if compile else family.step
    logits, state = prefill_distinct_rows(family, model, conditioning, static=compile)
    tokens, logps, conditional_logps, entropies = [], [], [], []
    for position in trange(family.num_image_tokens, desc="Sampling image tokens", disable=not show_progress):
        conditional, unconditional = (logits[:batch_size], logits[batch_size:]) if sampling.guided else (logits, None)
        warped = token_logits(conditional, unconditional, sampling)
        if do_sample:
            token = torch.multinomial(warped.softmax(dim=-1), num_samples=1, generator=generator).squeeze(-1)
        else:
            token = warped.argmax(dim=-1)
        tokens.append(token)
        logp_table = warped.log_softmax(dim=-1)
        logps.append(logp_table.gather(-1, token[:, None]).squeeze(-1))
        if return_entropies:
            entropies.append(position_entropy(logp_table))
        if return_conditional_logps:
            conditional_table = token_logits(conditional, None, sampling, truncate=False).log_softmax(dim=-1)
            conditional_logps.append(conditional_table.gather(-1, token[:, None]).squeeze(-1))
        if position + 1 < family.num_image_tokens:
            logits = step(model, token.repeat(2) if sampling.guided else token, state)

    return SampleOutput(
        image_tokens=torch.stack(tokens, dim=1),
        logps=torch.stack(logps, dim=1),
        conditional_logps=torch.stack(conditional_logps, dim=1) if return_conditional_logps else None,
        entropies=torch.stack(entropies, dim=1) if return_entropies else None,
    )


def distinct_rows(conditioning: Conditioning) -> torch.LongTensor | None:
    """Index of each row among the rows that differ from the row before (GRPO's `num_generations` consecutive copies
    of a prompt, and identical unconditional rows), or `None` when every row differs from the one before."""
    same = torch.ones(len(conditioning) - 1, dtype=torch.bool, device=next(iter(conditioning.tensors.values())).device)
    for tensor in conditioning.tensors.values():
        same &= (tensor[1:] == tensor[:-1]).flatten(1).all(dim=1) if tensor.dim() > 1 else tensor[1:] == tensor[:-1]
    if not same.any():
        return None
    return torch.cat([same.new_zeros(1), same]).logical_not().cumsum(0) - 1


def compiled_step(family: ModelFamily, cuda_graphs: bool = False):
    """`family.step` compiled for a static `DecodeState` (kernel fusion, no per-op Python dispatch), and with
    `cuda_graphs` captured as a CUDA graph (`mode="reduce-overhead"`) replayed at every position. Dynamo caches the
    compiled code on the step's code, so later rollouts of the same shapes reuse it."""
    if not family.supports_static_decoding:
        raise ValueError(f"{type(family).__name__} has no static decode to compile; sample with `compile=False`.")
    compiled = torch.compile(family.step, dynamic=False, mode="reduce-overhead" if cuda_graphs else None)

    def step(model, image_tokens, state):
        if cuda_graphs:  # the previous step's logits are consumed: the graph may overwrite them
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(model, image_tokens, state)

    return step


def prefill_distinct_rows(family: ModelFamily, model: nn.Module, conditioning: Conditioning, static: bool = False):
    """`family.prefill` once per run of identical consecutive rows, then expanded to every row."""
    index = distinct_rows(conditioning) if len(conditioning) > 1 else None
    if index is None:
        return family.prefill(model, conditioning, static=static)
    first = torch.cat([index.new_zeros(1), (index[1:] != index[:-1]).nonzero().flatten() + 1])
    logits, state = family.prefill(
        model, Conditioning({name: tensor[first] for name, tensor in conditioning.tensors.items()}), static=static
    )
    state.select_rows(index)
    return logits[index], state


def teacher_forced_logits(
    family: ModelFamily,
    model: nn.Module,
    conditioning: Conditioning,
    image_tokens: torch.LongTensor,
    sampling: SamplingConfig = SamplingConfig(),
    cfg_logprobs: str = "guided",
) -> torch.Tensor:
    """Teacher-forced fp32 logits `(B, N, V)` of the distribution `cfg_logprobs` names, with the temperature
    applied but before top-k/top-p (`truncate_logits`), differentiable.

    Runs through `model`'s own (possibly DDP/PEFT-wrapped) `forward`, so gradients are all-reduced.
    """
    if cfg_logprobs not in CFG_LOGPROBS:
        raise ValueError(f"Unknown cfg_logprobs {cfg_logprobs!r}. Valid choices: {', '.join(CFG_LOGPROBS)}.")
    batch_size = len(conditioning)
    guided = cfg_logprobs == "guided" and sampling.guided
    if guided:
        conditioning, image_tokens = family.guided_rows(conditioning), image_tokens.repeat(2, 1)
    logits = family.image_logits(model, conditioning, image_tokens)
    if guided:
        return token_logits(logits[:batch_size], logits[batch_size:], sampling, truncate=False)
    return token_logits(logits, None, sampling, truncate=False)


def truncates(sampling: SamplingConfig, cfg_logprobs: str) -> bool:
    """Whether the scored distribution is truncated by top-k/top-p: the sampled one is (guided, or conditional when
    guidance is off); the conditional branch under guidance is not (a guided sample may lie outside its top-k)."""
    scores_the_sampled_distribution = cfg_logprobs == "guided" or not sampling.guided
    return scores_the_sampled_distribution and (0 < sampling.top_k or sampling.top_p < 1.0)


def truncate_logits(logits: torch.Tensor, sampling: SamplingConfig, cfg_logprobs: str) -> torch.Tensor:
    """`teacher_forced_logits` with the sampler's top-k/top-p where the scored distribution has them."""
    if not truncates(sampling, cfg_logprobs):
        return logits
    return warp_logits(logits, top_k=sampling.top_k, top_p=sampling.top_p)


def image_logp_table(
    family: ModelFamily,
    model: nn.Module,
    conditioning: Conditioning,
    image_tokens: torch.LongTensor,
    sampling: SamplingConfig = SamplingConfig(),
    cfg_logprobs: str = "guided",
) -> torch.Tensor:
    """Teacher-forced log-probs `(B, N, V)` of the distribution `cfg_logprobs` names, warped like the sampler's
    (see the module docstring): a sampled token's entry equals the log-prob the sampler recorded."""
    logits = teacher_forced_logits(family, model, conditioning, image_tokens, sampling, cfg_logprobs)
    return truncate_logits(logits, sampling, cfg_logprobs).log_softmax(dim=-1)
