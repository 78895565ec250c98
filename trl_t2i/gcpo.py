"""The two parts of GCPO's loss that the paper's code (BPD-GRPO) adds to GRPO: critical-token selection and the
dynamic-advantage weight.

The critical tokens are about 30% of each image, the union of

* the first `first_fraction` of positions (the image layout is decided early);
* the `entropy_fraction` of positions with the largest *spatial entropy gradient*, chosen inside the window
  `[first_fraction, window_end)`: the per-token entropy of the sampled distribution on the `h × w` grid, averaged
  over the token and its causal neighbours (left, up-left, up, up-right), then the magnitude of its central-difference
  gradient (one-sided at the borders);
* the `similarity_fraction` of the remaining positions where the group's images are least alike: the cosine
  similarity of the sampled tokens' embeddings averaged over every pair of the group's images, one score per
  position shared by the whole group (as in that code; each image still excludes its own first and entropy tokens).

Counts are `int(N · fraction)`, as in that code. Its Janus trainer passes a count where a fraction is expected, so
the entropy rule selects the whole window (and the union all but a few tokens): `entropy_fraction=1.0` reproduces it.
"""

import math

import torch
import torch.nn.functional as F


def spatial_entropy_gradient(entropies: torch.Tensor) -> torch.Tensor:
    """`(B, N)` per-token entropies on a square grid → `(B, N)` magnitude of their spatial gradient, after averaging
    each token with its causal neighbours (left, up-left, up, up-right: those that exist)."""
    batch, num_tokens = entropies.shape
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"Critical-token selection needs a square image grid, got {num_tokens} tokens.")
    grid = entropies.reshape(batch, 1, side, side)
    # neighbour sums and counts through one 3×3 kernel over the upper-left/up/upper-right/left/self cells
    kernel = grid.new_tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]).reshape(1, 1, 3, 3)
    totals = F.conv2d(F.pad(grid, (1, 1, 1, 1)), kernel)
    counts = F.conv2d(F.pad(torch.ones_like(grid), (1, 1, 1, 1)), kernel)
    mean = (totals / counts)[:, 0]
    return torch.sqrt(_central_difference(mean, dim=2) ** 2 + _central_difference(mean, dim=1) ** 2).reshape(batch, -1)


def _central_difference(values: torch.Tensor, dim: int) -> torch.Tensor:
    """(x[i+1] − x[i−1]) / 2 inside, one-sided differences at both ends."""
    inner = (values.narrow(dim, 2, values.size(dim) - 2) - values.narrow(dim, 0, values.size(dim) - 2)) / 2
    first = values.narrow(dim, 1, 1) - values.narrow(dim, 0, 1)
    last = values.narrow(dim, -1, 1) - values.narrow(dim, -2, 1)
    return torch.cat([first, inner, last], dim=dim)


def group_similarity(embeddings: torch.Tensor, group_size: int) -> torch.Tensor:
    """`(B, N, D)` embeddings of the sampled tokens, rows in groups of `group_size` consecutive images →
    `(B, N)`: at each position, the cosine similarity of the group's tokens averaged over every pair of distinct
    images, one score shared by the group's images (the paper's `cos_sim_matrix[:, ~eye].mean(1)`, repeated G
    times)."""
    batch, num_tokens, _ = embeddings.shape
    if batch % group_size:
        raise ValueError(f"{batch} rows do not split into groups of {group_size} images.")
    unit = F.normalize(embeddings.float(), dim=-1).reshape(batch // group_size, group_size, num_tokens, -1)
    similarity = torch.einsum("gind,gjnd->gnij", unit, unit)  # (groups, N, G, G)
    pairs = similarity.sum((-2, -1)) - similarity.diagonal(dim1=-2, dim2=-1).sum(-1)  # leave out the i = j ones
    return (pairs / (group_size * (group_size - 1))).repeat_interleave(group_size, dim=0)


def critical_token_mask(
    entropies: torch.Tensor,
    embeddings: torch.Tensor,
    group_size: int,
    first_fraction: float = 0.1,
    entropy_fraction: float = 0.1,
    similarity_fraction: float = 0.1,
    window_end: float = 0.9,
) -> torch.Tensor:
    """The critical tokens `(B, N)` (bool) of every image: see the module docstring."""
    batch, num_tokens = entropies.shape
    positions = torch.arange(num_tokens, device=entropies.device).expand(batch, num_tokens)
    first = positions < int(num_tokens * first_fraction)

    start = int(num_tokens * first_fraction)
    stop = start + int(num_tokens * (window_end - first_fraction))
    gradient = spatial_entropy_gradient(entropies)[:, start:stop]
    count = min(int(num_tokens * entropy_fraction), stop - start)
    entropy = torch.zeros_like(first)
    entropy[:, start:stop].scatter_(1, gradient.topk(count, dim=1).indices, True)

    similarity = group_similarity(embeddings, group_size).masked_fill(first | entropy, math.inf)
    dissimilar = torch.zeros_like(first)
    dissimilar.scatter_(1, similarity.topk(int(num_tokens * similarity_fraction), dim=1, largest=False).indices, True)
    return first | entropy | dissimilar


def dynamic_advantage_weight(logps: torch.Tensor, ref_logps: torch.Tensor, clamp: float) -> torch.Tensor:
    """`(B, N)` weight of the policy-gradient term at each position: the running mean over positions ≤ t of
    `exp(clamp(log π − log π_ref, −clamp, clamp))`, differentiable through `logps` (as in the paper's code)."""
    ratio = (logps - ref_logps).clamp(-clamp, clamp).exp()
    positions = torch.arange(1, ratio.size(-1) + 1, device=ratio.device, dtype=ratio.dtype)
    return ratio.cumsum(dim=-1) / positions
