import math
import re

import pytest
import torch

from trl_t2i.divergences import (
    ALPHA_RANGE,
    DIVERGENCES,
    MAX_LOG_RATIO,
    AlphaDivergence,
    HellingerDivergence,
    JensenShannonDivergence,
    get_divergence,
    with_prefix_term,
)


# Generators written out independently of the module, used as ground truth (float64 torch tensors, u > 0).
REFERENCE_F = {
    "reverse_kl": lambda u: u * torch.log(u),
    "forward_kl": lambda u: -torch.log(u),
    "js": lambda u: 0.5 * (u * torch.log(u) - (u + 1) * torch.log((u + 1) / 2)),
    "jeffreys": lambda u: (u - 1) * torch.log(u),
    "hellinger": lambda u: (torch.sqrt(u) - 1) ** 2,
    "alpha": lambda u, alpha: (u**alpha - alpha * u - (1 - alpha)) / (alpha * (alpha - 1)),
}
# f'(1) for each generator; it is 0 for the members not listed.
REFERENCE_F_PRIME_AT_1 = {"reverse_kl": 1.0, "forward_kl": -1.0}

CASES = [
    ("reverse_kl", {}),
    ("forward_kl", {}),
    ("js", {}),
    ("jeffreys", {}),
    ("hellinger", {}),
    ("alpha", {"alpha": 0.3}),
    ("alpha", {"alpha": 0.5}),
    ("alpha", {"alpha": 2.0}),
    ("alpha", {"alpha": -1.0}),
]
CASE_IDS = [f"{name}-{params['alpha']}" if params else name for name, params in CASES]
parametrize_cases = pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
parametrize_dtypes = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])


def reference_divergence(logp_table, ref_logp_table, name, params):
    """Σ_v ρ f(π/ρ) by direct summation (differentiable)."""
    u = torch.exp(logp_table - ref_logp_table)
    return (torch.exp(ref_logp_table) * REFERENCE_F[name](u, **params)).sum(-1)


def reference_h(logp, ref_logp, name, params):
    """h(u) = (f(u) − f'(1)(u − 1)) / u straight from the definition."""
    u = torch.exp(logp - ref_logp)
    return (REFERENCE_F[name](u, **params) - REFERENCE_F_PRIME_AT_1.get(name, 0.0) * (u - 1)) / u


def random_log_probs(shape, seed, scale=1.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(shape, generator=generator, dtype=torch.float64)
    return torch.log_softmax(logits, dim=-1).to(dtype)


@parametrize_cases
@pytest.mark.parametrize("shape", [(17,), (3, 5, 17), (2, 1, 4, 9)])
def test_exact_matches_direct_sum(name, params, shape):
    logp_table = random_log_probs(shape, seed=0)
    ref_logp_table = random_log_probs(shape, seed=1)
    value = get_divergence(name, **params).exact(logp_table, ref_logp_table)
    assert value.shape == shape[:-1]
    torch.testing.assert_close(
        value, reference_divergence(logp_table, ref_logp_table, name, params), rtol=1e-10, atol=0
    )


@parametrize_cases
def test_sampled_matches_definition(name, params):
    log_ratio = torch.linspace(-15, 15, 121, dtype=torch.float64)
    logp = torch.full_like(log_ratio, -2.5).reshape(11, 11)
    ref_logp = logp + log_ratio.reshape(11, 11)
    value = get_divergence(name, **params).sampled(logp, ref_logp)
    assert value.shape == logp.shape
    torch.testing.assert_close(value, reference_h(logp, ref_logp, name, params), rtol=1e-8, atol=1e-12)


@parametrize_cases
def test_sampled_is_unbiased(name, params):
    logp_table = random_log_probs(6, seed=2, scale=0.7)
    ref_logp_table = random_log_probs(6, seed=3, scale=0.7)
    generator = torch.Generator().manual_seed(4)
    tokens = torch.multinomial(logp_table.exp(), 200_000, replacement=True, generator=generator)
    values = get_divergence(name, **params).sampled(logp_table[tokens], ref_logp_table[tokens])
    standard_error = values.std() / math.sqrt(len(values))
    expected = reference_divergence(logp_table, ref_logp_table, name, params)
    assert abs(values.mean() - expected) < 3 * standard_error


PAPER_FORMULAS = {
    "reverse_kl": lambda w: w - torch.log(w) - 1,
    "forward_kl": lambda w: w * torch.log(w) - w + 1,
    "js": lambda w: 0.5 * (torch.log(2 / (1 + w)) + w * torch.log(2 * w / (1 + w))),
}


@pytest.mark.parametrize("name", sorted(PAPER_FORMULAS))
def test_sampled_matches_paper_formulas(name):
    # Multiples of 0.25 added to -2.5: the log-ratio the module sees is exactly the one the formula gets.
    log_ratio = torch.linspace(-15, 15, 121, dtype=torch.float64)
    logp = torch.full_like(log_ratio, -2.5)
    value = get_divergence(name).sampled(logp, logp + log_ratio)
    expected = PAPER_FORMULAS[name](torch.exp(log_ratio))
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-14)


def policy_and_reference(vocab_size=6):
    """Policy logits θ (requiring grad) and a fixed reference, moderately different."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(vocab_size, generator=generator, dtype=torch.float64).requires_grad_()
    ref_logp_table = torch.log_softmax(torch.randn(vocab_size, generator=generator, dtype=torch.float64), dim=-1)
    return logits, ref_logp_table


def ratio_weighted_penalty(divergence, logits, ref_logp_table):
    """Per-token (π/π_old)·h at every code of the vocabulary, with π_old = π.detach()."""
    logp_table = torch.log_softmax(logits, dim=-1)
    ratio = torch.exp(logp_table - logp_table.detach())
    return ratio * divergence.sampled(logp_table, ref_logp_table)


def divergence_gradient(logits, ref_logp_table, name, params):
    logp_table = torch.log_softmax(logits, dim=-1)
    return torch.autograd.grad(reference_divergence(logp_table, ref_logp_table, name, params), logits)[0]


@parametrize_cases
def test_ratio_weighted_sampled_gradient_is_divergence_gradient(name, params):
    logits, ref_logp_table = policy_and_reference()
    penalty = ratio_weighted_penalty(get_divergence(name, **params), logits, ref_logp_table)
    # Exact expectation over x ~ π_old: weight each code's penalty by its (detached) probability.
    expectation = (torch.softmax(logits, dim=-1).detach() * penalty).sum()
    gradient = torch.autograd.grad(expectation, logits)[0]
    torch.testing.assert_close(
        gradient, divergence_gradient(logits, ref_logp_table, name, params), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("name", ["reverse_kl", "js"])
def test_ratio_weighted_sampled_gradient_monte_carlo(name):
    logits, ref_logp_table = policy_and_reference()
    divergence = get_divergence(name)
    generator = torch.Generator().manual_seed(6)
    tokens = torch.multinomial(torch.softmax(logits, dim=-1).detach(), 200_000, replacement=True, generator=generator)
    penalty = ratio_weighted_penalty(divergence, logits, ref_logp_table)
    monte_carlo = torch.autograd.grad(penalty[tokens].mean(), logits)[0]
    # The gradient of a single draw only depends on the token, so the per-draw spread comes from a per-code table.
    per_code = torch.autograd.functional.jacobian(
        lambda x: ratio_weighted_penalty(divergence, x, ref_logp_table), logits
    )
    standard_error = per_code[tokens].std(dim=0) / math.sqrt(len(tokens))
    error = (monte_carlo - divergence_gradient(logits, ref_logp_table, name, {})).abs()
    assert (error < 4 * standard_error).all()


def test_k3_without_ratio_gives_forward_kl_gradient():
    logits, ref_logp_table = policy_and_reference()
    logp_table = torch.log_softmax(logits, dim=-1)
    k3 = get_divergence("reverse_kl").sampled(logp_table, ref_logp_table)
    gradient = torch.autograd.grad((logp_table.exp().detach() * k3).sum(), logits)[0]
    forward_kl_gradient = divergence_gradient(logits, ref_logp_table, "forward_kl", {})
    reverse_kl_gradient = divergence_gradient(logits, ref_logp_table, "reverse_kl", {})
    torch.testing.assert_close(gradient, forward_kl_gradient, rtol=1e-10, atol=1e-12)
    assert (gradient - reverse_kl_gradient).norm() > 0.1 * reverse_kl_gradient.norm()


@parametrize_cases
@parametrize_dtypes
def test_sampled_is_non_negative(name, params, dtype):
    # Log-ratios log(ρ/π) over ±50, dense near 0 where the closed forms cancel in round-off.
    small = torch.logspace(-12, -1, 400, dtype=torch.float64)
    log_ratio = torch.cat([torch.linspace(-50, 50, 2001, dtype=torch.float64), small, -small]).to(dtype)
    # Log-probabilities ≤ 0 whose difference is exactly the log-ratio, even for tiny ones in float32.
    logp, ref_logp = -log_ratio.clamp_min(0), log_ratio.clamp_max(0)
    assert (get_divergence(name, **params).sampled(logp, ref_logp) >= 0).all()


@parametrize_cases
def test_exact_is_non_negative(name, params):
    logp_table = random_log_probs((200, 11), seed=7, scale=3.0)
    ref_logp_table = random_log_probs((200, 11), seed=8, scale=3.0)
    assert (get_divergence(name, **params).exact(logp_table, ref_logp_table) >= 0).all()


def test_js_is_bounded_by_log_2():
    js = get_divergence("js")
    sharp = js.exact(random_log_probs((500, 8), seed=9, scale=10.0), random_log_probs((500, 8), seed=10, scale=10.0))
    assert (sharp <= math.log(2)).all()
    # Nearly one-hot on different codes: just below the bound.
    logp_table = torch.log_softmax(torch.tensor([40.0, 0, 0, 0, 0], dtype=torch.float64), dim=-1)
    ref_logp_table = torch.log_softmax(torch.tensor([0, 40.0, 0, 0, 0], dtype=torch.float64), dim=-1)
    nearly_disjoint = js.exact(logp_table, ref_logp_table)
    assert math.log(2) - 1e-12 < nearly_disjoint <= math.log(2)
    # Exactly disjoint supports reach it.
    logp_table = torch.tensor([0.0, -math.inf, -math.inf], dtype=torch.float64)
    ref_logp_table = torch.tensor([-math.inf, 0.0, -math.inf], dtype=torch.float64)
    torch.testing.assert_close(js.exact(logp_table, ref_logp_table), torch.tensor(math.log(2), dtype=torch.float64))


@parametrize_cases
def test_zero_when_distributions_match(name, params):
    divergence = get_divergence(name, **params)
    logp_table = random_log_probs((4, 13), seed=11, scale=3.0)
    assert (divergence.sampled(logp_table, logp_table) == 0).all()
    torch.testing.assert_close(
        divergence.exact(logp_table, logp_table), torch.zeros(4, dtype=torch.float64), atol=1e-14, rtol=0
    )


@parametrize_cases
def test_sampled_clamps_log_ratio(name, params):
    logp = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    beyond = torch.tensor([-50.0, 50.0], dtype=torch.float64)
    at_bound = torch.tensor([-MAX_LOG_RATIO, MAX_LOG_RATIO], dtype=torch.float64)
    divergence = get_divergence(name, **params)
    value = divergence.sampled(logp, beyond)
    torch.testing.assert_close(value, divergence.sampled(logp, at_bound))
    assert (torch.autograd.grad(value.sum(), logp)[0] == 0).all()


@parametrize_cases
@parametrize_dtypes
def test_sampled_is_finite_with_finite_gradients(name, params, dtype):
    # Every pair of log-probabilities between log(1e-30) and 0, so log-ratios reach ±69.
    grid = torch.linspace(math.log(1e-30), 0, 61, dtype=dtype)
    logp = grid[:, None].expand(61, 61).clone().requires_grad_()
    ref_logp = grid[None, :].expand(61, 61).clone().requires_grad_()
    value = get_divergence(name, **params).sampled(logp, ref_logp)
    gradients = torch.autograd.grad(value.sum(), (logp, ref_logp))
    assert torch.isfinite(value).all()
    assert all(torch.isfinite(gradient).all() for gradient in gradients)


@parametrize_cases
@parametrize_dtypes
def test_exact_is_finite_with_finite_gradients(name, params, dtype):
    # Probabilities spanning 1 down to ~1e-30, ordered differently under the policy and the reference.
    spread = torch.linspace(0, math.log(1e-30), 16, dtype=torch.float64)
    logp_table = torch.log_softmax(spread, dim=-1).to(dtype).requires_grad_()
    ref_logp_table = torch.log_softmax(spread.roll(5), dim=-1).to(dtype).requires_grad_()
    value = get_divergence(name, **params).exact(logp_table, ref_logp_table)
    gradients = torch.autograd.grad(value, (logp_table, ref_logp_table))
    assert torch.isfinite(value)
    assert all(torch.isfinite(gradient).all() for gradient in gradients)


@parametrize_cases
def test_exact_ignores_codes_impossible_under_both(name, params):
    # Masked codes (-inf logits in both models) must act as if the codebook were smaller.
    logp_table = random_log_probs((3, 7), seed=12)
    ref_logp_table = random_log_probs((3, 7), seed=13)
    masked = torch.full((3, 2), -math.inf, dtype=torch.float64)
    logp_padded = torch.cat([logp_table, masked], dim=-1).requires_grad_()
    ref_logp_padded = torch.cat([ref_logp_table, masked], dim=-1).requires_grad_()
    divergence = get_divergence(name, **params)
    value = divergence.exact(logp_padded, ref_logp_padded)
    gradients = torch.autograd.grad(value.sum(), (logp_padded, ref_logp_padded))
    torch.testing.assert_close(
        value, reference_divergence(logp_table, ref_logp_table, name, params), rtol=1e-10, atol=0
    )
    assert all(torch.isfinite(gradient).all() for gradient in gradients)


@pytest.mark.parametrize(
    ("name", "params"),
    [("reverse_kl", {}), ("js", {}), ("hellinger", {}), ("alpha", {"alpha": 0.5}), ("alpha", {"alpha": 2.0})],
    ids=["reverse_kl", "js", "hellinger", "alpha-0.5", "alpha-2.0"],
)
def test_exact_is_finite_for_code_impossible_under_policy(name, params):
    # These divergences stay finite when π(v) = 0 < ρ(v); the limit π(v) → 0 gives the value.
    logp_table = torch.tensor([-0.5, -1.5, -math.inf], dtype=torch.float64)
    logp_table = (logp_table - torch.logsumexp(logp_table, dim=-1)).requires_grad_()
    ref_logp_table = torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))
    value = get_divergence(name, **params).exact(logp_table, ref_logp_table)
    nearly_zero = logp_table.detach().clone()
    nearly_zero[-1] = -200.0
    torch.testing.assert_close(value, reference_divergence(nearly_zero, ref_logp_table, name, params))
    assert torch.isfinite(torch.autograd.grad(value, logp_table)[0]).all()


@pytest.mark.parametrize(("alpha", "limit"), [(1 - 1e-4, "reverse_kl"), (1e-4, "forward_kl")], ids=["1", "0"])
def test_alpha_limits(alpha, limit):
    divergence, expected = AlphaDivergence(alpha), get_divergence(limit)
    logp_table = random_log_probs((3, 17), seed=14)
    ref_logp_table = random_log_probs((3, 17), seed=15)
    torch.testing.assert_close(
        divergence.exact(logp_table, ref_logp_table), expected.exact(logp_table, ref_logp_table), rtol=1e-3, atol=0
    )
    logp = torch.full((101,), -2.0, dtype=torch.float64)
    ref_logp = logp + torch.linspace(-5, 5, 101, dtype=torch.float64)
    torch.testing.assert_close(
        divergence.sampled(logp, ref_logp), expected.sampled(logp, ref_logp), rtol=1e-3, atol=1e-12
    )


def test_alpha_half_is_twice_hellinger():
    alpha, hellinger = AlphaDivergence(0.5), HellingerDivergence()
    logp_table = random_log_probs((3, 17), seed=16)
    ref_logp_table = random_log_probs((3, 17), seed=17)
    torch.testing.assert_close(
        alpha.exact(logp_table, ref_logp_table), 2 * hellinger.exact(logp_table, ref_logp_table)
    )
    # And the convention Σ(√π − √ρ)² = 2(1 − Σ√(πρ)).
    bhattacharyya = torch.exp(0.5 * (logp_table + ref_logp_table)).sum(-1)
    torch.testing.assert_close(hellinger.exact(logp_table, ref_logp_table), 2 * (1 - bhattacharyya))
    log_ratio = torch.linspace(-15, 15, 121, dtype=torch.float64)
    logp = torch.zeros_like(log_ratio)
    torch.testing.assert_close(alpha.sampled(logp, log_ratio), 2 * hellinger.sampled(logp, log_ratio))


def test_get_divergence_rejects_unknown_name():
    message = "Unknown divergence 'kl'. Valid choices: alpha, forward_kl, hellinger, jeffreys, js, reverse_kl."
    with pytest.raises(ValueError, match=re.escape(message)):
        get_divergence("kl")


def test_get_divergence_rejects_unknown_parameter():
    with pytest.raises(ValueError, match=r"'js'.*alpha.*no parameters"):
        get_divergence("js", alpha=0.3)
    with pytest.raises(ValueError, match=r"'alpha'.*beta.*accepts: alpha"):
        get_divergence("alpha", beta=1.0)


@pytest.mark.parametrize(
    ("alpha", "match"),
    [
        (0, "forward_kl"),
        (1, "reverse_kl"),
        (math.nan, "finite"),
        (math.inf, "finite"),
        (50, r"alpha=50.0 is outside \[-1, 2\].*overflow"),  # the issue's: e^980 at the clamp
        (2.5, r"outside \[-1, 2\]"),
        (-1.5, r"outside \[-1, 2\]"),
    ],
)
def test_alpha_rejects_invalid_values(alpha, match):
    with pytest.raises(ValueError, match=match):
        get_divergence("alpha", alpha=alpha)


@pytest.mark.parametrize("alpha", ALPHA_RANGE)
def test_alpha_sampled_terms_stay_finite_at_the_ends_of_its_range(alpha):
    # The largest term and gradient the sampled estimator can produce, at the log-ratio clamp, in float32: finite
    # with room to spare for a sum over a million tokens times β = 10.
    logp = torch.zeros(2, requires_grad=True)
    value = AlphaDivergence(alpha).sampled(logp, torch.tensor([-MAX_LOG_RATIO, MAX_LOG_RATIO]))
    (gradient,) = torch.autograd.grad(value.sum(), logp)
    assert torch.isfinite(value.max() * 1e6 * 10) and torch.isfinite(gradient.abs().max() * 1e6 * 10)


def test_get_divergence_ignores_none_parameters():
    assert isinstance(get_divergence("js", alpha=None), JensenShannonDivergence)
    assert get_divergence("alpha", alpha=None).alpha == 0.5
    assert get_divergence("alpha", alpha=2).alpha == 2.0


def test_every_registered_divergence_is_checked_against_its_written_out_generator():
    # the tests below compare each name's generator, estimators and gradients with REFERENCE_F[name]: a divergence
    # registered without a reference (or under another's name) would go unchecked
    assert {name for name, _ in CASES} == set(REFERENCE_F) == set(DIVERGENCES)


@parametrize_cases
def test_generator_is_convex_with_f_of_1_zero(name, params):
    divergence = get_divergence(name, **params)
    assert divergence.f(torch.tensor(1.0, dtype=torch.float64)).abs() < 1e-15
    u = torch.linspace(0.01, 10, 1000, dtype=torch.float64)
    values = divergence.f(u)
    torch.testing.assert_close(values, REFERENCE_F[name](u, **params))
    assert (values[2:] - 2 * values[1:-1] + values[:-2] >= -1e-12).all()


def test_the_gradient_figure_shows_each_divergences_own_gradient():
    # scripts/plot_divergences.py: with bias correction the pull on log π is β·(f'(1) − f'(π/π_ref)), at
    # curvature-matched β: reverse KL r, forward KL e^r − 1, JS 2·log((e^r + 1)/2), with r = log(π_ref/π)
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "plot_divergences.py"
    spec = importlib.util.spec_from_file_location("plot_divergences", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    r = torch.linspace(-6, 4, 11, dtype=torch.float64)
    expected = {"reverse_kl": r, "forward_kl": r.exp() - 1, "js": 2 * torch.log((r.exp() + 1) / 2)}
    for name, pull in expected.items():
        torch.testing.assert_close(script.penalty_and_pull(name, r)[1], pull)
    # the toy panel: in the loss no pull on the earlier code; in the reward −β·D/4, D the later position's divergence
    drifts = torch.linspace(-4, 4, 9, dtype=torch.float64)
    drifted = torch.stack([drifts / 2, -drifts / 2], dim=-1).log_softmax(-1)
    uniform = torch.full_like(drifted, -math.log(2.0))
    beta = {"reverse_kl": 1.0, "forward_kl": 1.0, "js": 4.0}
    for name in beta:
        later = reference_divergence(drifted, uniform, name, {})
        torch.testing.assert_close(script.first_token_pull(name, drifts, "reward"), -beta[name] * later / 4)
        assert script.first_token_pull(name, drifts, "loss").abs().max() < 1e-12


@parametrize_cases
@pytest.mark.parametrize("rows_per_chunk", [1, 4, 1000])
def test_exact_penalty_has_the_value_and_gradient_of_exact(name, params, rows_per_chunk):
    # The chunked, closed-form-gradient penalty against autograd through `exact` and through the direct sum
    # Σ ρ f(π/ρ), on logits (so the gradient also goes through the log-softmax), with codes masked in both models.
    divergence = get_divergence(name, **params)
    logits = torch.randn(3, 5, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    ref_logits = torch.randn(3, 5, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    masked = torch.zeros(11, dtype=torch.bool)
    masked[[2, 7]] = True
    weights = torch.rand(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def tables():
        return (
            logits.masked_fill(masked, -math.inf).log_softmax(-1),
            ref_logits.masked_fill(masked, -math.inf).log_softmax(-1),
        )

    logp_table, ref_logp_table = tables()
    penalty = divergence.exact_penalty(logp_table, ref_logp_table, rows_per_chunk=rows_per_chunk)
    (fused_grad,) = torch.autograd.grad((penalty * weights).sum(), logits)
    logp_table, ref_logp_table = tables()
    expected = divergence.exact(logp_table, ref_logp_table)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    keep = ~masked
    logp_table, ref_logp_table = tables()
    direct = reference_divergence(logp_table[..., keep], ref_logp_table[..., keep], name, params)
    (direct_grad,) = torch.autograd.grad((direct * weights).sum(), logits)

    torch.testing.assert_close(penalty, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(penalty, direct, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused_grad, expected_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused_grad, direct_grad, rtol=1e-8, atol=1e-10)
    assert fused_grad.abs().sum() > 0 and (fused_grad[..., masked] == 0).all()


def test_exact_penalty_refuses_a_reference_that_requires_grad():
    table = random_log_probs((2, 5), seed=1).requires_grad_()
    with pytest.raises(ValueError, match="detach the reference"):
        get_divergence("js").exact_penalty(table, table)


# ---------------------------------------------------------------- the sequence-level penalty, on a 2-token toy


def toy_sequences(vocabulary=3, seed=7):
    """A policy over 2-token sequences (position 1 depends on token 0) with a reference of the same form: every
    sequence `x` as a row, the tables of both positions and `θ` (the policy's logits) to differentiate."""
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(1 + vocabulary, vocabulary, generator=generator, dtype=torch.float64).requires_grad_()
    reference = torch.randn(1 + vocabulary, vocabulary, generator=generator, dtype=torch.float64)
    sequences = torch.cartesian_prod(torch.arange(vocabulary), torch.arange(vocabulary))  # (V², 2)
    rows = torch.stack([torch.zeros_like(sequences[:, 0]), 1 + sequences[:, 0]], dim=1)  # logits row per position
    return sequences, theta.log_softmax(-1)[rows], reference.log_softmax(-1)[rows], theta


def sequence_level_gradient(sequences, logp_tables, ref_tables, theta, name, params):
    """∇θ E_{x~π}[Σ_t D_t(x_<t)], the divergence of each position summed along the policy's own sequences, by
    enumerating the sequences."""
    logps = logp_tables.gather(-1, sequences[..., None]).squeeze(-1)
    per_position = reference_divergence(logp_tables, ref_tables, name, params)  # (V², 2)
    return torch.autograd.grad((logps.sum(-1).exp() * per_position.sum(-1)).sum(), theta, retain_graph=True)[0]


def expected_penalty_gradient(per_token, logps, theta):
    """E_{x~π_old}[∇θ Σ_t per_token(x)_t] by enumeration, with π_old = π.detach()."""
    return torch.autograd.grad((logps.sum(-1).exp().detach() * per_token.sum(-1)).sum(), theta, retain_graph=True)[0]


def penalty_terms(estimator, divergence, sequences, logp_tables, ref_tables):
    """The per-token penalty the loss carries: the exact per-position divergence, or the sampled term times the
    importance ratio (`use_bias_correction_kl=True`)."""
    logps = logp_tables.gather(-1, sequences[..., None]).squeeze(-1)
    if estimator == "exact":
        return divergence.exact_penalty(logp_tables, ref_tables), logps
    ref_logps = ref_tables.gather(-1, sequences[..., None]).squeeze(-1)
    return divergence.sampled(logps, ref_logps) * torch.exp(logps - logps.detach()), logps


@pytest.mark.parametrize("estimator", ["exact", "sampled"])
@parametrize_cases
def test_the_prefix_term_gives_the_sequence_level_gradient(name, params, estimator):
    sequences, logp_tables, ref_tables, theta = toy_sequences()
    per_token, logps = penalty_terms(estimator, get_divergence(name, **params), sequences, logp_tables, ref_tables)
    full = with_prefix_term(per_token, logps, logps.detach(), torch.ones_like(logps))
    expected = sequence_level_gradient(sequences, logp_tables, ref_tables, theta, name, params)
    torch.testing.assert_close(expected_penalty_gradient(full, logps, theta), expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(full, per_token, rtol=0, atol=0)  # the added term is zero in value


@pytest.mark.parametrize("estimator", ["exact", "sampled"])
@parametrize_cases
def test_the_per_position_penalty_misses_the_prefix_term(name, params, estimator):
    # in the loss alone, each position's divergence is differentiated with its sampled prefix held fixed: the
    # expected gradient is E[Σ_t ∇D_t(x_<t)], short of E[Σ_t D_t ∇log π(x_<t)] (for the exact estimator too)
    sequences, logp_tables, ref_tables, theta = toy_sequences()
    per_token, logps = penalty_terms(estimator, get_divergence(name, **params), sequences, logp_tables, ref_tables)
    per_position = reference_divergence(logp_tables, ref_tables, name, params)
    held = (logps.sum(-1).exp().detach() * per_position.sum(-1)).sum()
    (held_gradient,) = torch.autograd.grad(held, theta, retain_graph=True)
    torch.testing.assert_close(
        expected_penalty_gradient(per_token, logps, theta), held_gradient, rtol=1e-9, atol=1e-12
    )
    prefix = per_position[:, 1].detach() * logps[:, 0]  # D_1(x_0) ∇log π(x_0)
    prefix_term = expected_penalty_gradient(prefix[:, None], logps, theta)
    full = sequence_level_gradient(sequences, logp_tables, ref_tables, theta, name, params)
    assert prefix_term.norm() > 0.1 * full.norm()
    torch.testing.assert_close(held_gradient + prefix_term, full, rtol=1e-9, atol=1e-12)


def test_the_prefix_term_counts_only_later_positions_under_the_mask():
    per_token = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    logps = torch.zeros(1, 4, requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    (gradient,) = torch.autograd.grad(with_prefix_term(per_token, logps, logps.detach(), mask).sum(), logps)
    # position s is credited with the masked divergences after it: 4 + 8, 4 + 8, 8, nothing
    assert gradient.tolist() == [[12.0, 12.0, 8.0, 0.0]]
