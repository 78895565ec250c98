"""
f-divergences between the policy and the reference model, used as the per-token penalty in GRPO.

For a policy π and a reference ρ over a codebook, with u = π/ρ, an f-divergence is D_f(π‖ρ) = Σ_v ρ(v) f(u(v)) for a
convex f with f(1) = 0. The registered members are:

| name         | f(u)                                  | D_f(π‖ρ)                          |
|--------------|---------------------------------------|-----------------------------------|
| `reverse_kl` | u log u                               | KL(π‖ρ) (TRL's default penalty)   |
| `forward_kl` | −log u                                | KL(ρ‖π)                           |
| `js`         | ½[u log u − (u + 1) log((u + 1)/2)]   | Jensen–Shannon, ≤ log 2           |
| `jeffreys`   | (u − 1) log u                         | KL(π‖ρ) + KL(ρ‖π)                 |
| `hellinger`  | (√u − 1)²                             | Σ(√π − √ρ)² = 2(1 − Σ√(πρ))       |
| `alpha`      | (u^α − αu − (1 − α)) / (α(α − 1))     | (Σ π^α ρ^(1−α) − 1) / (α(α − 1))  |

Each member has two estimators:

- `exact(logp_table, ref_logp_table)`: D_f summed over the whole codebook (last dimension), computed in log space.
- `sampled(logps, ref_logps)`: the single-sample estimator h(u) = (f(u) − f′(1)(u − 1)) / u evaluated at a token x ~ π.
  Because Σ_x π(x)(u(x) − 1)/u(x) = Σ_x (π(x) − ρ(x)) = 0, it is unbiased, E_{x~π}[h] = D_f(π‖ρ), and it is
  non-negative per sample since f(u) ≥ f′(1)(u − 1) for convex f. For `reverse_kl` it is TRL's k3 estimator.

Gradient facts for `sampled`, with π_old = π.detach() the distribution the tokens were drawn from:

- With the importance ratio, E_{x~π_old}[∇_θ (π(x)/π_old(x)) h(u(x))] = ∇_θ D_f(π‖ρ): multiplying the per-token
  penalty by the ratio before backpropagating gives an unbiased gradient of the divergence.
- Without it, E_{x~π_old}[∇_θ h(u(x))] misses the score-function term. For `reverse_kl` (k3 added directly to the
  loss, as the paper's code, older TRL and TRL with `use_bias_correction_kl=False` do) it equals ∇_θ KL(ρ‖π), the
  gradient of the *forward* KL, not of KL(π‖ρ). TRL's default `use_bias_correction_kl=True` multiplies by the ratio.

Both estimators work position by position: at image position t, given the prefix x_<t that was sampled, the
per-token term estimates D_t(x_<t) = D_f(π(·|x_<t)‖ρ(·|x_<t)) (`exact`: equals it) and its gradient with the prefix
held fixed. Summed over the positions of the policy's own images, the penalty's value estimates
E_{x~π}[Σ_t D_t(x_<t)], but its gradient is only E[Σ_t ∇_θ D_t(x_<t)]: the gradient of that sequence-level penalty
also has the prefix term E[Σ_t D_t(x_<t) ∇_θ log π(x_<t)] (the policy also chooses the prefixes on which later
positions diverge), which neither estimator, nor TRL's k3, includes. `with_prefix_term` adds it.
"""

import inspect
import math
from typing import Any

import torch


MAX_LOG_RATIO = 20.0
"""Bound on |log(ρ/π)| in `Divergence.sampled` (the same as the paper's code): exp of the log-ratio overflows float32
beyond ~88 and bfloat16 sooner, and the clamp only acts on tokens whose probability ratio exceeds e^20 ≈ 5e8."""

ALPHA_RANGE = (-1.0, 2.0)
"""The orders α that the `alpha` divergence accepts, from Neyman's χ² (α = −1) to Pearson's (α = 2), symmetric about
½ as the duality D_α(π‖ρ) = D_(1−α)(ρ‖π) is. Inside, the sampled term, which grows like w^(1−α) (w = ρ/π), reaches at
most e^40 ≈ 2e17 at the `MAX_LOG_RATIO` clamp (finite in float32 even summed over millions of tokens and weighted by
β), and each term π^α ρ^(1−α) of the exact divergence at most 1/min(π, ρ) (finite for probabilities down to float32's
smallest). Beyond, both overflow: at α = 50 the sampled term reaches e^980."""

_LOG_2 = math.log(2.0)


def _xlog_ratio(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Element-wise a·(log a − log b), with the convention 0·log(0/b) = 0 also for its gradient."""
    # Masking the log-ratio (not the product) keeps 0·inf out of both the value and the backward pass.
    log_ratio = torch.where(log_a == -math.inf, 0.0, log_a - log_b)
    return log_a.exp() * log_ratio


EXACT_ROWS_PER_CHUNK = 64
"""Positions per chunk of `Divergence.exact_penalty`: 64 × 16,384 codes is 4 MB per fp32 temporary, against 38 MB
for one image's table."""


def _chunks(table: torch.Tensor, rows_per_chunk: int) -> tuple[torch.Tensor, ...]:
    return table.reshape(-1, table.size(-1)).split(rows_per_chunk)


class _ExactPenalty(torch.autograd.Function):
    """`Divergence.exact` chunk by chunk, with the closed-form gradient towards the policy table."""

    @staticmethod
    def forward(ctx, divergence, logp_table, ref_logp_table, rows_per_chunk):
        ctx.divergence, ctx.rows_per_chunk = divergence, rows_per_chunk
        ctx.save_for_backward(logp_table, ref_logp_table)
        pairs = zip(_chunks(logp_table, rows_per_chunk), _chunks(ref_logp_table, rows_per_chunk), strict=True)
        return torch.cat([divergence.exact(logps, ref_logps) for logps, ref_logps in pairs]).view(
            logp_table.shape[:-1]
        )

    @staticmethod
    def backward(ctx, grad_output):
        logp_table, ref_logp_table = ctx.saved_tensors
        grad = logp_table.new_empty(logp_table.shape)  # contiguous: the chunks below are views of it
        pairs = zip(
            _chunks(logp_table, ctx.rows_per_chunk),
            _chunks(ref_logp_table, ctx.rows_per_chunk),
            _chunks(grad, ctx.rows_per_chunk),
            grad_output.reshape(-1, 1).split(ctx.rows_per_chunk),
            strict=True,
        )
        for logps, ref_logps, grad_chunk, scale in pairs:
            torch.mul(ctx.divergence.exact_logp_gradient(logps, ref_logps), scale, out=grad_chunk)
        return None, grad, None, None


def _both_zero(logp_table: torch.Tensor, ref_logp_table: torch.Tensor) -> torch.Tensor:
    """Mask of the codes that neither distribution can produce (e.g. logits masked to -inf in both models)."""
    return (logp_table == -math.inf) & (ref_logp_table == -math.inf)


class Divergence:
    """
    Base class of the f-divergences D_f(π‖ρ) = Σ_v ρ(v) f(π(v)/ρ(v)).

    Subclasses define the generator `f`, the closed-form single-sample estimator `_sampled` as a function of the
    log-ratio r = log(ρ/π), and the full-codebook `exact` divergence.
    """

    name: str

    def f(self, u: torch.Tensor) -> torch.Tensor:
        """The convex generator f(u), with f(1) = 0, evaluated element-wise on u = π/ρ > 0."""
        raise NotImplementedError

    def sampled(self, logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
        """
        Per-token single-sample estimate of D_f(π‖ρ) at tokens sampled from the policy.

        Args:
            logps (`torch.Tensor`):
                Log-probabilities of the sampled tokens under the policy, of any shape.
            ref_logps (`torch.Tensor`):
                Log-probabilities of the same tokens under the reference, of the same shape.

        Returns:
            `torch.Tensor`: h(u) = (f(u) − f′(1)(u − 1)) / u with u = π/ρ, same shape as `logps`. Non-negative, and
            unbiased for D_f(π‖ρ). The log-ratio log(ρ/π) is clamped to ±`MAX_LOG_RATIO`, so tokens beyond the clamp
            get no gradient.
        """
        log_ratio = (ref_logps - logps).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        # h ≥ 0 exactly, but the cancellation near w = 1 can leave round-off negatives (~1e-14 in float32).
        return self._sampled(log_ratio).clamp_min(0.0)

    def _sampled(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """h as a function of r = log(ρ/π) = log w, already clamped."""
        raise NotImplementedError

    def exact(self, logp_table: torch.Tensor, ref_logp_table: torch.Tensor) -> torch.Tensor:
        """
        D_f(π‖ρ) summed over the whole codebook at every position.

        Args:
            logp_table (`torch.Tensor`):
                Normalised policy log-probabilities of shape `(..., V)`. Entries may be `-inf`.
            ref_logp_table (`torch.Tensor`):
                Normalised reference log-probabilities of shape `(..., V)`.

        Returns:
            `torch.Tensor`: The divergence, of shape `(...)`. Codes with zero probability under both distributions
            contribute 0; a code with zero probability under only one of them gives `inf` where D_f is unbounded.
        """
        raise NotImplementedError

    def exact_logp_gradient(self, logp_table: torch.Tensor, ref_logp_table: torch.Tensor) -> torch.Tensor:
        """The gradient of `exact` with respect to the entries of `logp_table` (what autograd gives), in closed form.
        Up to a multiple of π, which the log-softmax behind a normalised table cancels, it is π(v) f′(u(v)); zero
        where π(v) = 0."""
        raise NotImplementedError

    def exact_penalty(
        self, logp_table: torch.Tensor, ref_logp_table: torch.Tensor, rows_per_chunk: int | None = None
    ) -> torch.Tensor:
        """`exact` with its gradient towards `logp_table` only, computed in one pass per chunk of `rows_per_chunk`
        positions (default `EXACT_ROWS_PER_CHUNK`): the value without autograd, the gradient in closed form
        (`exact_logp_gradient`) at backward. No `(..., V)` temporary outlives a chunk and autograd keeps none (`exact`
        keeps several full tables per divergence for its backward). `ref_logp_table` must not require a gradient (the
        reference is frozen)."""
        if ref_logp_table.requires_grad:
            raise ValueError("`exact_penalty` differentiates towards the policy only; detach the reference table.")
        return _ExactPenalty.apply(self, logp_table, ref_logp_table, rows_per_chunk or EXACT_ROWS_PER_CHUNK)

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({params})"


class ReverseKLDivergence(Divergence):
    """
    Reverse KL, KL(π‖ρ): f(u) = u log u.

    The sampled estimator is TRL's k3, w − log w − 1 with w = ρ/π.
    """

    name = "reverse_kl"

    def f(self, u: torch.Tensor) -> torch.Tensor:
        return u * u.log()

    def _sampled(self, log_ratio: torch.Tensor) -> torch.Tensor:
        return torch.expm1(log_ratio) - log_ratio

    def exact(self, logp_table: torch.Tensor, ref_logp_table: torch.Tensor) -> torch.Tensor:
        return _xlog_ratio(logp_table, ref_logp_table).sum(-1)

    def exact_logp_gradient(self, logp_table: torch.Tensor, ref_logp_table: torch.Tensor) -> torch.Tensor:
        # π(log u + 1)
        return _xlog_ratio(logp_table, ref_logp_table) + logp_table.exp()


class ForwardKLDivergence(Divergence):
    """
    Forward KL, KL(ρ‖π): f(u) = −log u.

    The sampled estimator is w log w − w + 1 with w = ρ/π.
    """

    name = "forward_kl"

    def f(self, u: torch.Tensor) -> torch.Tensor:
        return -u.log()

    def _sampled(self, log_ratio: torch.Tensor) -> torch.Tensor:
        return log_ratio * log_ratio.exp() - torch.expm1(log_ratio)

    def exact(self, logp_table: torch.Tensor, ref_logp_table: torch.Tensor) -> torch.Tensor:
        return _xlog_ratio(ref_logp_table, logp_table).sum(-1)

    def exact_logp_gradient(self, logp_table: torch.Tensor, ref_logp_table: torch.Tensor) -> torch.Tensor:
        # π · (−1/u) = −ρ
        return -ref_logp_table.exp()


class JensenShannonDivergence(Divergence):
    """
    Jensen–Shannon divergence, ½KL(π‖m) + ½KL(ρ‖m) with m = (π + ρ)/2: f(u) = ½[u log u − (u + 1) log((u + 1)/2)].

    Bounded by log 2. The sampled estimator is ½[log(2/(1 + w)) + w log(2w/(1 + w))] with w = ρ/π.
    """

    name = "js"

    def f(self, u: torch.Tensor) -> torch.Tensor:
        return 0.5 * (u * u.log() - (u + 1) * torch.log((u + 1) / 2))

    def _sampled(self, log_ratio: torch.Tensor) -> torch.Tensor:
        # log((1 + w)/2) written as log1p((w − 1)/2) stays accurate when w is close to 1.
        log_mean = torch.log1p(0.5 * torch.expm1(log_ratio))
        return 0.5 * (log_ratio.exp() * (log_ratio - log_mean) - log_mean)

    def exact(self, logp_table: torch.Tensor, ref_logp_table: torch.Tensor) -> torch.Tensor:
        # logaddexp(-inf, -inf) has a NaN gradient; such codes contribute 0, so any finite stand-in will do.
        both_zero = _both_zero(logp_table, ref_logp_table)
        log_m = (
            torch.logaddexp(logp_table.masked_fill(both_zero, 0.0), ref_logp_table.masked_fill(both_zero, 0.0))
            - _LOG_2
        )
        return 0.5 * (_xlog_ratio(logp_table, log_m) + _xlog_ratio(ref_logp_table, log_m)).sum(-1)

    def exact_logp_gradient(self, logp_table: torch.Tensor, ref_logp_table: torch.Tensor) -> torch.Tensor:
        # π · ½ log(2u/(u + 1)) = ½ π log(π/m)
        both_zero = _both_zero(logp_table, ref_logp_table)
        log_m = torch.logaddexp(logp_table.masked_fill(both_zero, 0.0), ref_logp_table) - _LOG_2
        return 0.5 * _xlog_ratio(logp_table, log_m)


class JeffreysDivergence(Divergence):
    """
    Jeffreys divergence, KL(π‖ρ) + KL(ρ‖π): f(u) = (u − 1) log u.

    The sampled estimator is (w − 1) log w with w = ρ/π.
    """

    name = "jeffreys"

    def f(self, u: torch.Tensor) -> torch.Tensor:
        return (u - 1) * u.log()

    def _sampled(self, log_ratio: torch.Tensor) -> torch.Tensor:
        return log_ratio * torch.expm1(log_ratio)

    def exact(self, logp_table: torch.Tensor, ref_logp_table: torch.Tensor) -> torch.Tensor:
        return (_xlog_ratio(logp_table, ref_logp_table) + _xlog_ratio(ref_logp_table, logp_table)).sum(-1)

    def exact_logp_gradient(self, logp_table: torch.Tensor, ref_logp_table: torch.Tensor) -> torch.Tensor:
        # π(log u + 1 − 1/u) = π log u + π − ρ
        return _xlog_ratio(logp_table, ref_logp_table) + logp_table.exp() - ref_logp_table.exp()


class HellingerDivergence(Divergence):
    """
    Squared Hellinger distance without the ½ factor, Σ(√π − √ρ)² = 2(1 − Σ√(πρ)): f(u) = (√u − 1)².

    With this convention it ranges over [0, 2] and equals half the α-divergence at α = 0.5. The sampled estimator is
    (√w − 1)² with w = ρ/π.
    """

    name = "hellinger"

    def f(self, u: torch.Tensor) -> torch.Tensor:
        return (u.sqrt() - 1) ** 2

    def _sampled(self, log_ratio: torch.Tensor) -> torch.Tensor:
        return torch.expm1(0.5 * log_ratio) ** 2

    def exact(self, logp_table: torch.Tensor, ref_logp_table: torch.Tensor) -> torch.Tensor:
        return ((0.5 * logp_table).exp() - (0.5 * ref_logp_table).exp()).pow(2).sum(-1)

    def exact_logp_gradient(self, logp_table: torch.Tensor, ref_logp_table: torch.Tensor) -> torch.Tensor:
        # π(1 − 1/√u) = π − √(πρ)
        return logp_table.exp() - (0.5 * (logp_table + ref_logp_table)).exp()


class AlphaDivergence(Divergence):
    """
    Amari α-divergence, (Σ π^α ρ^(1−α) − 1) / (α(α − 1)): f(u) = (u^α − αu − (1 − α)) / (α(α − 1)).

    α → 1 recovers `reverse_kl` and α → 0 recovers `forward_kl`; those two values are rejected in favour of the
    dedicated members. α = 0.5 gives twice `hellinger`. The sampled estimator is
    (w^(1−α) − (1 − α)w − α) / (α(α − 1)) with w = ρ/π. For α outside [0, 1] it grows like w^(1−α), and the exact
    divergence weighs the codes by (π/ρ)^α: α is limited to `ALPHA_RANGE`, where both stay finite in float32.

    Args:
        alpha (`float`, *optional*, defaults to `0.5`):
            The order α, in `ALPHA_RANGE` and different from 0 and 1.
    """

    name = "alpha"

    def __init__(self, alpha: float = 0.5) -> None:
        alpha = float(alpha)
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha}.")
        if alpha in (0.0, 1.0):
            limit = "forward_kl" if alpha == 0.0 else "reverse_kl"
            raise ValueError(
                f"alpha={alpha} is not allowed: as alpha → {alpha:g} the α-divergence tends to '{limit}', use that."
            )
        low, high = ALPHA_RANGE
        if not low <= alpha <= high:
            raise ValueError(
                f"alpha={alpha} is outside [{low:g}, {high:g}]: the sampled estimator's terms grow like "
                f"(π_ref/π)^(1 − α), which at the log-ratio clamp ±{MAX_LOG_RATIO:g} reaches "
                f"e^{abs(1 - alpha) * MAX_LOG_RATIO:g} and would overflow float32. Choose alpha in "
                f"[{low:g}, {high:g}] (its ends are Neyman's and Pearson's χ²)."
            )
        self.alpha = alpha

    def f(self, u: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha
        return (u**alpha - alpha * u - (1 - alpha)) / (alpha * (alpha - 1))

    def _sampled(self, log_ratio: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha
        # (w^(1−α) − 1) − (1 − α)(w − 1) through expm1, so that neither term loses precision near w = 1.
        return (torch.expm1((1 - alpha) * log_ratio) - (1 - alpha) * torch.expm1(log_ratio)) / (alpha * (alpha - 1))

    def exact(self, logp_table: torch.Tensor, ref_logp_table: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha
        # Outside (0, 1), α·(-inf) + (1 − α)·(-inf) is NaN; codes that are impossible under both contribute 0.
        log_terms = (alpha * logp_table + (1 - alpha) * ref_logp_table).masked_fill(
            _both_zero(logp_table, ref_logp_table), -math.inf
        )
        return torch.expm1(torch.logsumexp(log_terms, dim=-1)) / (alpha * (alpha - 1))

    def exact_logp_gradient(self, logp_table: torch.Tensor, ref_logp_table: torch.Tensor) -> torch.Tensor:
        # ∂/∂log π(v) of (Σ π^α ρ^(1−α) − 1)/(α(α − 1)) is π^α ρ^(1−α)/(α − 1)
        alpha = self.alpha
        log_terms = (alpha * logp_table + (1 - alpha) * ref_logp_table).masked_fill(
            _both_zero(logp_table, ref_logp_table), -math.inf
        )
        return log_terms.exp() / (alpha - 1)


def with_prefix_term(
    per_token: torch.Tensor, logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """
    The per-token penalty plus the prefix term that makes its expected gradient the sequence-level one.

    With per-token terms D̂_t whose expected gradient is ∇_θ D_t(x_<t) with the prefix held fixed (the exact
    estimator, or the sampled one times the importance ratio), the gradient of E_{x~π}[Σ_t D_t(x_<t)] also has
    E[Σ_s ∇_θ log π(x_s|x_<s) · Σ_{t>s} D_t(x_<t)]: each token is charged, through its log-prob, with the divergences
    of the positions after it (a reward-to-go of −D). Only later positions: D̂_s itself depends on x_s (sampled
    estimator), which would bias the term.

    Args:
        per_token (`torch.Tensor`):
            The per-token penalty `(B, N)`, differentiable.
        logps, old_logps (`torch.Tensor`):
            Log-probs `(B, N)` of the sampled tokens under the distribution that is trained (differentiable) and
            under the one that sampled them.
        mask (`torch.Tensor`):
            The positions `(B, N)` the penalty covers: only their divergences enter the reward-to-go.

    Returns:
        `torch.Tensor`: `per_token` plus sg(Σ_{t>s} D̂_t) · (r_s − sg(r_s)) with r = π/π_old: the same values, the
        gradient of the prefix term added (importance-weighted when the policy has moved since sampling).
    """
    divergences = per_token.detach() * mask
    later = divergences.flip(-1).cumsum(-1).flip(-1) - divergences
    ratio = torch.exp(logps - old_logps)
    return per_token + later * (ratio - ratio.detach())


DIVERGENCES: dict[str, type[Divergence]] = {
    cls.name: cls
    for cls in (
        ReverseKLDivergence,
        ForwardKLDivergence,
        JensenShannonDivergence,
        JeffreysDivergence,
        HellingerDivergence,
        AlphaDivergence,
    )
}


def get_divergence(name: str, **params: Any) -> Divergence:
    """
    Instantiate a registered divergence by name.

    Args:
        name (`str`):
            Registry name, one of the keys of `DIVERGENCES`.
        **params:
            Parameters of the divergence (e.g. `alpha` for `"alpha"`). Parameters set to `None` are ignored, so a
            config can pass every optional parameter for every divergence and only the relevant ones are used.

    Returns:
        `Divergence`: The divergence instance.
    """
    if name not in DIVERGENCES:
        raise ValueError(f"Unknown divergence {name!r}. Valid choices: {', '.join(sorted(DIVERGENCES))}.")
    cls = DIVERGENCES[name]
    params = {key: value for key, value in params.items() if value is not None}
    accepted = list(inspect.signature(cls).parameters)
    unexpected = sorted(set(params) - set(accepted))
    if unexpected:
        raise ValueError(
            f"Divergence {name!r} got unexpected parameter(s): {', '.join(unexpected)}. "
            f"It accepts: {', '.join(accepted) if accepted else 'no parameters'}."
        )
    return cls(**params)
