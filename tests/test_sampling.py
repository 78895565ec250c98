"""Warping and the sampling settings; the sampler itself is tested per family in `test_family_contract.py`."""

import pytest
import torch

from trl_t2i.decoding import distinct_rows
from trl_t2i.models import Conditioning
from trl_t2i.sampling import SamplingConfig, warp_logits


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


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"cfg_scale": 0.0}, "`cfg_scale` must be > 0"),
        ({"temperature": -1.0}, "`temperature` must be > 0"),
        ({"top_k": -2}, "`top_k` must be >= 0"),
        ({"top_p": 1.5}, r"`top_p` must be in \(0, 1\]"),
        ({"top_p": 0.0}, r"`top_p` must be in \(0, 1\]"),
    ],
)
def test_bad_sampling_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**settings)


def test_guidance_is_off_exactly_at_scale_one():
    assert not SamplingConfig(cfg_scale=1.0).guided and SamplingConfig(cfg_scale=1.01).guided


def test_distinct_rows_index_runs_of_identical_consecutive_rows():
    ids = torch.tensor([[1, 2], [1, 2], [3, 4], [3, 4], [1, 2]])
    flags = torch.tensor([False, False, False, False, True])
    assert distinct_rows(Conditioning({"ids": ids, "flag": flags})).tolist() == [0, 0, 1, 1, 2]
    assert distinct_rows(Conditioning({"ids": ids[1:3], "flag": flags[1:3]})) is None
    assert distinct_rows(Conditioning({"ids": ids[:2], "flag": flags[3:]})) is None  # a differing tensor splits a run
