"""How each divergence shapes the gradient: the per-token penalty of the sampled estimator and its pull on log π, as a
function of r = log(π_ref/π) of the sampled token, with each divergence's β matched to KL's curvature at π = π_ref.

    python scripts/plot_divergences.py --output docs/divergence_gradients.png

Left: β·h(e^{−r}), the term one sampled token adds to the penalty. Right: its pull on log π with
`use_bias_correction_kl=True` (the default, which makes the expected gradient the divergence's): −∂/∂log π of
(π/π_old)·β·h at π = π_old, which is β·(f′(1) − f′(π/π_ref)); dashed: differentiating h directly (`False`).
Curvature-matched β = β_KL / f″(1) (JS: 4×, Jeffreys: ½×, Hellinger: 2×) makes every divergence resist small changes
alike (all pulls have slope 1 at r = 0); far from the reference they differ. Where the policy has moved mass onto a
code (r < 0), reverse KL keeps pulling back harder and harder (pull = r), forward KL and JS only boundedly (→ −1 and
→ −2·log 2 at matched β): they let the policy concentrate where the reward asks. Where the policy has left a code the
reference likes (r > 0), forward KL pulls back exponentially (e^r − 1), JS and reverse KL linearly (≈ 2r and r).

Right: where `divergence_in: loss` and `divergence_in: reward` differ, on a 2-token toy. The policy equals the
reference at the first position (two codes, uniform) and after code 0; after code 1 its next-token logits have
drifted by (d/2, −d/2) from the uniform reference. The pull on the logit of code 1 at the first position: the
penalty in the loss differentiates each position with its prefix held fixed and gives it none (dashed, 0); in the
reward it also charges code 1 with the divergence D of the position it leads to, which is the sequence-level
gradient: −β·D/4 (solid).
"""

import argparse
import math
from pathlib import Path

import torch
from matplotlib.figure import Figure

from trl_t2i.divergences import get_divergence
from trl_t2i.sweep import curvature


DIVERGENCES = ("reverse_kl", "forward_kl", "js", "jeffreys", "hellinger")


def penalty_and_pull(
    name: str, log_ratios: torch.Tensor, bias_correction: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The curvature-matched per-token penalty β·h at log(π_ref/π) = `log_ratios`, and its pull on log π: minus the
    gradient of the trained term, β·h times π/π_old (at π = π_old) with `bias_correction`, else β·h itself."""
    beta = 1.0 / curvature(name)
    logps = torch.zeros_like(log_ratios, requires_grad=True)
    penalty = beta * get_divergence(name).sampled(logps, log_ratios)
    trained = penalty * torch.exp(logps - logps.detach()) if bias_correction else penalty
    (gradient,) = torch.autograd.grad(trained.sum(), logps)
    return penalty.detach(), -gradient


def first_token_pull(name: str, drifts: torch.Tensor, divergence_in: str) -> torch.Tensor:
    """The toy of the right panel: the curvature-matched pull −β·∂/∂θ on the first position's logit θ = 0 of code 1,
    for each drift d of the later position after code 1, with the penalty in the `"loss"` (each position's
    divergence with its prefix held fixed) or also in the `"reward"` (the sequence-level E_π[Σ_t D_t])."""
    beta, divergence = 1.0 / curvature(name), get_divergence(name)
    theta = torch.zeros_like(drifts, requires_grad=True)
    first = torch.stack([torch.zeros_like(theta), theta], dim=-1).log_softmax(-1)
    uniform = torch.full_like(first, -math.log(2.0))
    drifted = divergence.exact(torch.stack([drifts / 2, -drifts / 2], dim=-1).log_softmax(-1), uniform)
    weight = first[..., 1].exp()  # how often the drifted position is reached (after code 0, D = 0)
    later = (weight if divergence_in == "reward" else weight.detach()) * drifted
    (gradient,) = torch.autograd.grad(beta * (divergence.exact(first, uniform) + later).sum(), theta)
    return -gradient


def plot(path: Path, r_max: float = 4.0) -> None:
    log_ratios = torch.linspace(-r_max, r_max, 401, dtype=torch.float64)
    drifts = torch.linspace(-2 * r_max, 2 * r_max, 401, dtype=torch.float64)
    figure = Figure(figsize=(16, 4.2), layout="constrained")
    value_axes, pull_axes, prefix_axes = figure.subplots(1, 3)
    for index, name in enumerate(DIVERGENCES):
        colour = f"C{index}"
        penalty, pull = penalty_and_pull(name, log_ratios)
        _, direct_pull = penalty_and_pull(name, log_ratios, bias_correction=False)
        label = f"{name} (β × {1 / curvature(name):g})"
        value_axes.plot(log_ratios, penalty, label=label, color=colour)
        pull_axes.plot(log_ratios, pull, label=label, color=colour)
        pull_axes.plot(log_ratios, direct_pull, "--", color=colour, linewidth=0.8)
        prefix_axes.plot(drifts, first_token_pull(name, drifts, "reward"), color=colour)
        prefix_axes.plot(drifts, first_token_pull(name, drifts, "loss"), "--", color=colour, linewidth=0.8)
    value_axes.set(xlabel="r = log(π_ref / π) of the sampled token", ylabel="β · h  (per-token penalty)", ylim=(0, 6))
    pull_axes.set(xlabel="r = log(π_ref / π) of the sampled token", ylabel="pull on log π", ylim=(-4, 6))
    prefix_axes.set(xlabel="d: drift of the position after code 1 (logits ±d/2)", ylabel="pull on θ", ylim=(-1, 0.1))
    value_axes.set_title("Penalty of one sampled token,\ncurvature-matched β", fontsize=10)
    pull_axes.set_title("Its pull on log π (> 0: up;\ndashed: without bias correction)", fontsize=10)
    prefix_axes.set_title(
        "2-token toy: pull on an earlier token\n(solid: divergence_in=reward; dashed: loss)", fontsize=10
    )
    for axes in (value_axes, pull_axes, prefix_axes):
        axes.axvline(0, color="grey", linewidth=0.5)
        axes.axhline(0, color="grey", linewidth=0.5)
        axes.grid(alpha=0.3)
    value_axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("docs/divergence_gradients.png"))
    args = parser.parse_args()
    plot(args.output)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
