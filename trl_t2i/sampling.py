"""The distribution image tokens are sampled from, and the matching teacher-forced log-probs.

`SamplingConfig` names that distribution (guidance scale, temperature, top-k, top-p) once, for the trainer and every
command. The sampler (`decoding.py`) and teacher forcing (here) build it with the same function, `token_logits`: the
guided logits `l_u + s·(l_c − l_u)` (or the conditional logits alone) in fp32, then temperature, top-k and top-p, in
the order `transformers`' `generate` applies them. So the log-prob the sampler records for a token equals the log-prob
that teacher forcing computes for it (to float round-off), which is what makes GRPO's importance ratios exactly 1 on
the first update.

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

import math
from dataclasses import dataclass

import torch
from torch import nn

from .models.base import Conditioning, ModelFamily


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
        for name in ("cfg_scale", "temperature", "top_p"):
            if not math.isfinite(getattr(self, name)):  # NaN would pass every comparison below
                raise ValueError(f"`{name}={getattr(self, name)}`: {name} must be a finite number.")
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


def gather_logps(logp_table: torch.Tensor, tokens: torch.LongTensor) -> torch.Tensor:
    """The entries of a log-prob table `(..., V)` at `tokens` `(...)`: each token's log-prob."""
    return logp_table.gather(-1, tokens[..., None]).squeeze(-1)


def position_entropy(logp_table: torch.Tensor) -> torch.Tensor:
    """
    Entropy (nats) at every image position, differentiable: `(..., N, V)` → `(..., N)`.

    The last dimension is renormalised, so logits work too. Entries may be `-inf` for codes removed by top-k/top-p:
    they contribute 0 (never NaN), and the entropy is that of the renormalised remaining codes.

    Example:
        >>> position_entropy(torch.zeros(1, 2, 4))  # uniform over 4 codes
        tensor([[1.3863, 1.3863]])
    """
    # Half-precision log-probs lose several digits in p·log p; compute in at least float32.
    logp_table = torch.log_softmax(logp_table, dim=-1, dtype=torch.promote_types(logp_table.dtype, torch.float32))
    probs = logp_table.exp()
    # A removed code has p = 0 and log p = -inf; 0·(-inf) would be NaN, and its true contribution is 0.
    return -(probs * torch.where(probs > 0, logp_table, 0.0)).sum(-1)


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
