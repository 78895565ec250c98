"""GCPO's critical-token selection and dynamic-advantage weight against hand-computed examples and direct
transcriptions of their definitions."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import first_batch, loss_with_gradients, make_trainer, perturb_adapters, policy_token_logps
from trl import GRPOTrainer

from trl_t2i.gcpo import critical_token_mask, dynamic_advantage_weight, group_similarity, spatial_entropy_gradient


def _gradient_by_definition(entropies: torch.Tensor) -> torch.Tensor:
    """The spatial entropy gradient written out cell by cell, as the paper's code describes it."""
    batch, n = entropies.shape
    side = int(math.sqrt(n))
    grid = entropies.reshape(batch, side, side)
    mean = torch.zeros_like(grid)
    for i in range(side):
        for j in range(side):
            cells = [(i, j), (i, j - 1), (i - 1, j - 1), (i - 1, j), (i - 1, j + 1)]
            values = [grid[:, a, b] for a, b in cells if 0 <= a < side and 0 <= b < side]
            mean[:, i, j] = torch.stack(values).mean(0)

    def difference(values, i):  # along the last axis, one-sided at the ends
        if i == 0:
            return values[..., 1] - values[..., 0]
        if i == side - 1:
            return values[..., -1] - values[..., -2]
        return (values[..., i + 1] - values[..., i - 1]) / 2

    dx = torch.stack([difference(mean, j) for j in range(side)], dim=-1)
    dy = torch.stack([difference(mean.transpose(1, 2), i) for i in range(side)], dim=-1).transpose(1, 2)
    return (dx**2 + dy**2).sqrt().reshape(batch, n)


def test_spatial_entropy_gradient_of_a_hand_computed_grid():
    # 3×3 grid, entropy 1 in the top-right cell only
    entropies = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    # neighbour means: row 0 sees only itself and its left cell; (1,1) sees up-right = 1 among 5 cells
    # neighbour means [[0, 0, 1/2], [0, 1/5, 1/4], [0, 0, 0]]: (0, 2) averages itself and its left cell, (1, 1) five
    # cells of which its up-right is 1, (1, 2) four (no up-right); then central differences, one-sided at the borders
    dx = torch.tensor([[0.0, 0.25, 0.5], [0.2, 0.125, 0.05], [0.0, 0.0, 0.0]])
    dy = torch.tensor([[0.0, 0.2, -0.25], [0.0, 0.0, -0.25], [0.0, -0.2, -0.25]])
    expected = (dx**2 + dy**2).sqrt().reshape(1, 9)
    torch.testing.assert_close(spatial_entropy_gradient(entropies), expected)


def test_spatial_entropy_gradient_matches_its_definition():
    entropies = torch.rand(3, 36)
    torch.testing.assert_close(spatial_entropy_gradient(entropies), _gradient_by_definition(entropies))


def _paper_similarity(embeddings: torch.Tensor, group_size: int) -> torch.Tensor:
    """The paper's code (both trainers), position by position: the cosine similarity of every pair of the group's
    images, averaged over the pairs i ≠ j, and that one score repeated for each of the group's images."""
    batch, n, dim = embeddings.shape
    grouped = embeddings.reshape(batch // group_size, group_size, n, dim)
    pairs = ~torch.eye(group_size, dtype=torch.bool)
    columns = []
    for position in range(n):
        tokens = grouped[:, :, position]
        matrix = F.cosine_similarity(tokens.unsqueeze(2), tokens.unsqueeze(1), dim=-1)
        columns.append(matrix[:, pairs].mean(1).repeat_interleave(group_size))
    return torch.stack(columns, dim=1)


def test_group_similarity_is_the_mean_over_the_pairs_of_the_group():
    # two groups of three images, two positions, 2-D embeddings
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    embeddings = torch.stack([e[[0, 0]], e[[0, 0]], e[[1, 2]]])  # group 0: (pos 0, pos 1) per image
    embeddings = torch.cat([embeddings, embeddings.flip(0)])
    similarity = group_similarity(embeddings, group_size=3)
    # position 0 holds e0, e0, e1: the pairs' similarities are 1, 0, 0, shared by the three images
    assert similarity[:, 0].tolist() == pytest.approx([1 / 3] * 6)
    # position 1 holds e0, e0, e2: 1, cos 45°, cos 45°
    assert similarity[:, 1].tolist() == pytest.approx([(1 + math.sqrt(2)) / 3] * 6)


def test_group_similarity_is_the_paper_codes_rule():
    embeddings = torch.randn(16, 25, 8)
    torch.testing.assert_close(group_similarity(embeddings, group_size=8), _paper_similarity(embeddings, 8))


def test_critical_tokens_are_the_union_of_the_three_rules():
    n = 100  # a 10 × 10 grid: 10 first positions, 10 by entropy gradient, 10 by dissimilarity
    entropies = torch.rand(8, n)
    embeddings = torch.randn(8, n, 4)
    mask = critical_token_mask(entropies, embeddings, group_size=4)
    first = torch.arange(n) < 10
    gradient = _gradient_by_definition(entropies)[:, 10:90]
    by_entropy = torch.zeros(8, n, dtype=torch.bool)
    by_entropy[:, 10:90] = gradient >= gradient.topk(10).values[:, -1:]
    candidates = _paper_similarity(embeddings, 4).masked_fill(first | by_entropy, math.inf)
    by_similarity = candidates <= candidates.topk(10, largest=False).values[:, -1:]
    assert torch.equal(mask, first | by_entropy | by_similarity)
    assert mask.sum(-1).tolist() == [30] * 8


def test_the_entropy_rule_stays_in_its_window():
    entropies = torch.rand(4, 64)
    entropies[:, :6] = 100.0  # huge gradients just before the window
    mask = critical_token_mask(entropies, torch.randn(4, 64, 3), group_size=4, similarity_fraction=0.0)
    first, window = int(64 * 0.1), range(int(64 * 0.1), int(64 * 0.1) + int(64 * 0.8))
    assert mask[:, :first].all() and mask.sum(-1).tolist() == [first + int(64 * 0.1)] * 4
    assert all(i in window for row in mask[:, first:].nonzero()[:, 1].add(first).view(4, -1) for i in row.tolist())


def test_the_janus_code_path_selects_all_but_two_of_576_tokens():
    # its Janus trainer passes the count 57 where a fraction is expected: the entropy rule takes the whole window
    entropies, embeddings = torch.rand(8, 576), torch.randn(8, 576, 16)
    mask = critical_token_mask(entropies, embeddings, group_size=4, entropy_fraction=57)
    assert mask.sum(-1).tolist() == [574] * 8
    torch.testing.assert_close(mask, critical_token_mask(entropies, embeddings, group_size=4, entropy_fraction=1.0))


def test_dynamic_advantage_weight_value_and_gradient():
    logps = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref_logps = torch.tensor([[-1.2, -1.0, -0.5]])
    weight = dynamic_advantage_weight(logps, ref_logps, clamp=0.5)
    # log-ratios 0.2, −1 → clamped to −0.5, 0: a running mean of exp(0.2), exp(−0.5), 1
    terms = torch.tensor([math.exp(0.2), math.exp(-0.5), 1.0])
    torch.testing.assert_close(weight[0], terms.cumsum(0) / torch.tensor([1.0, 2.0, 3.0]))
    weight.sum().backward()
    # d/d logp_j of Σ_t mean_{i≤t} e_i = e_j · Σ_{t≥j} 1/t, zero where the clamp is active (j = 1)
    expected = terms * torch.tensor([1 + 1 / 2 + 1 / 3, 1 / 2 + 1 / 3, 1 / 3]) * torch.tensor([1.0, 0.0, 1.0])
    torch.testing.assert_close(logps.grad[0], expected)


def test_critical_tokens_are_the_only_ones_trained_on(tmp_path):
    trainer = make_trainer(tmp_path, token_selection="critical", beta=0.1)
    trainer.model.train()
    prompts = ["a red cat", "a green bird"]
    rollouts = []
    generate = trainer._generate
    trainer._generate = lambda batch: rollouts.append(generate(batch)) or rollouts[-1]
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in prompts for _ in range(4)])
    # 16 tokens: the first one, one by entropy gradient, one by dissimilarity
    assert batch["tool_mask"].sum(-1).tolist() == [3] * 8 and batch["tool_mask"][:, 0].all()
    assert batch["num_items_in_batch"] == 24  # TRL normalises by the tokens trained on
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["tokens/trained_fraction"] for log in logs] == [pytest.approx(3 / 16)] * 2


def test_the_penalty_on_critical_tokens_is_normalised_like_trls_k3(tmp_path):
    # The sampled reverse-KL penalty is TRL's k3 term: with the loss restricted to the critical tokens (TRL's tool
    # mask), TRL's own k3 must still give our loss and gradients.
    beta = 0.3
    trainer = make_trainer(
        tmp_path, beta=beta, divergence="reverse_kl", token_selection="critical", num_iterations=2, loss_type="dapo"
    )
    perturb_adapters(trainer.model)
    inputs = first_batch(trainer)
    assert 0 < inputs["tool_mask"].float().mean() < 1
    perturb_adapters(trainer.model, std=0.1)
    trainer.current_gradient_accumulation_steps = 1
    parameters = [p for p in trainer.model.parameters() if p.requires_grad]
    ours = trainer._compute_loss(trainer.model, inputs)
    our_grads = torch.autograd.grad(ours, parameters)
    trainer.beta = beta  # TRL's own k3 path
    trls = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    trl_grads = torch.autograd.grad(trls, parameters)
    trainer.beta = 0.0
    torch.testing.assert_close(ours, trls)
    for ours_grad, trl_grad in zip(our_grads, trl_grads, strict=True):
        torch.testing.assert_close(ours_grad, trl_grad)


def test_dynamic_advantage_loss_and_gradient_match_a_direct_computation(tmp_path):
    trainer = make_trainer(tmp_path, beta=0.0, dynamic_advantage=True, loss_type="bnpo", dynamic_advantage_clamp=0.5)
    perturb_adapters(trainer.model)  # policy ≠ reference: the weight is not 1
    inputs = first_batch(trainer)
    ours, our_grads, parameters = loss_with_gradients(trainer, inputs)

    logps = policy_token_logps(trainer, inputs)
    ratio = (logps - inputs["ref_per_token_logps"]).clamp(-0.5, 0.5).exp()
    weight = ratio.cumsum(-1) / torch.arange(1, logps.size(1) + 1)
    assert (weight - 1).abs().max() > 0.05
    # on-policy GRPO term: −A · w_t · π/sg(π), averaged over the tokens (bnpo)
    expected = -(inputs["advantages"][:, None] * weight * (logps - logps.detach()).exp()).mean()
    expected_grads = torch.autograd.grad(expected, parameters)
    torch.testing.assert_close(ours, expected)
    for ours_grad, expected_grad in zip(our_grads, expected_grads, strict=True):
        torch.testing.assert_close(ours_grad, expected_grad)
