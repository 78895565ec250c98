"""`sampler_correction`: TRL's vLLM importance-sampling correction, for the numerics of our own sampler."""

import pytest
import torch
from conftest import first_batch, loss_with_gradients, make_trainer, perturb_adapters, policy_token_logps

from trl_t2i.trainer import SAMPLER_WEIGHTS
from trl_t2i.trl_boundary import Batch


def _ratio_weights(log_ratio: torch.Tensor, mode: str, low, high) -> torch.Tensor:
    """TRL's `vllm_importance_sampling_mode` semantics, written out: the ratio per token, or per image (the product
    of its tokens' ratios), clamped to [low, high] (`*_truncate`) or zeroed outside it (`*_mask`)."""
    if mode.startswith("sequence"):
        log_ratio = log_ratio.sum(-1, keepdim=True)
    ratio = log_ratio.exp()
    if mode.endswith("truncate"):
        return torch.minimum(ratio, torch.tensor(high)) if low is None else ratio.clamp(low, high)
    inside = (ratio <= high) & (ratio >= (low if low is not None else 0.0))
    return torch.where(inside, ratio, 0.0)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("low", [None, 0.8])
def test_the_weights_are_trls_truncated_importance_ratios(tmp_path, mode, low):
    trainer = make_trainer(
        tmp_path,
        sampler_correction=True,
        sampler_correction_mode=mode,
        sampler_correction_clip_min=low,
        sampler_correction_clip_max=1.3,
    )
    batch = first_batch(trainer)
    # The sampler's log-probs off by known amounts (what bf16 decoding does, much larger here)
    torch.manual_seed(0)
    old_logps = batch["sampling_per_token_logps"].clone()
    batch["old_per_token_logps"] = old_logps
    batch["sampling_per_token_logps"] = old_logps - 0.3 * torch.randn_like(old_logps)

    weights = trainer._sampler_weights(Batch.of(batch))
    log_ratio = old_logps - batch["sampling_per_token_logps"]
    torch.testing.assert_close(weights, _ratio_weights(log_ratio, mode, low, 1.3))
    assert (weights != _ratio_weights(log_ratio, mode, 0.0, torch.inf)).any()  # the bounds did act


def test_the_weights_scale_each_tokens_policy_gradient_term(tmp_path):
    trainer = make_trainer(tmp_path, beta=0.0, loss_type="bnpo", sampler_correction=True)
    perturb_adapters(trainer.model)
    inputs = first_batch(trainer)
    torch.manual_seed(0)
    weights = torch.rand_like(inputs["sampling_per_token_logps"]) * 2
    inputs[SAMPLER_WEIGHTS] = weights
    ours, our_grads, parameters = loss_with_gradients(trainer, inputs)

    logps = policy_token_logps(trainer, inputs)
    # on-policy GRPO term weighted per token: −A · w_t · π/sg(π), averaged over the tokens (bnpo)
    expected = -(inputs["advantages"][:, None] * weights * (logps - logps.detach()).exp()).mean()
    torch.testing.assert_close(ours, expected)
    for ours_grad, expected_grad in zip(our_grads, torch.autograd.grad(expected, parameters), strict=True):
        torch.testing.assert_close(ours_grad, expected_grad)


def test_in_fp32_the_sampler_is_the_policy_and_nothing_is_corrected(tmp_path):
    trainer = make_trainer(tmp_path, sampler_correction=True, max_steps=1)
    trainer.train()
    logged = trainer.state.log_history[0]
    for name in ("min", "mean", "max"):
        assert logged[f"sampling/importance_ratio/{name}"] == pytest.approx(1.0, abs=1e-4)
    assert logged["sampling/importance_ratio/corrected"] == 0.0


def test_sampler_correction_refuses_vespo_and_bad_bounds():
    from trl_t2i import T2IGRPOConfig

    with pytest.raises(ValueError, match="loss_type='vespo'"):
        T2IGRPOConfig("out", use_cpu=True, sampler_correction=True, loss_type="vespo")
    with pytest.raises(ValueError, match="sampler_correction_clip_min < sampler_correction_clip_max, got 2.0 and 1.5"):
        T2IGRPOConfig("out", use_cpu=True, sampler_correction_clip_min=2.0, sampler_correction_clip_max=1.5)
    with pytest.raises(ValueError, match="Unknown sampler_correction_mode 'tokens'"):
        T2IGRPOConfig("out", use_cpu=True, sampler_correction_mode="tokens")
