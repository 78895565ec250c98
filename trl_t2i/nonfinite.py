"""Non-finite training: found at every optimizer step before the weights are updated, and never saved.

The trainer records, for every training micro-batch, whether each term of its loss is finite (`NonFiniteGuard.record`,
no device synchronisation). At the optimizer step, with the gradient norm, the flags of every process are reduced
(one collective per step), so all processes stop, or skip the step, together: a non-finite term stops the run with a
`NonFiniteTrainingError` naming it, or with `skip_nonfinite_steps` the step's gradients are dropped (a warning names
the term) until that many steps have been skipped. Saving refuses weights that are not finite (`check_weights`).
"""

import math
from collections.abc import Iterable

import torch


class NonFiniteTrainingError(FloatingPointError):
    """Training went non-finite: the message names the term, the step and what to do."""


class NonFiniteGuard:
    """Which terms of the loss went non-finite (NaN or ±inf) since the last optimizer step.

    Args:
        terms: each term's key and how a message names it, in the order the loss computes them (the first
            non-finite one is the likely cause).
        device: where the flags live (the training device: recording them needs no synchronisation).
    """

    def __init__(self, terms: dict[str, str], device: torch.device):
        self.terms = dict(terms)
        self.flags = torch.zeros(len(self.terms), 2, device=device)  # per term: any NaN, any ±inf
        self.skipped = 0
        """Steps skipped so far (`skip_nonfinite_steps`)."""

    def record(self, term: str, value: torch.Tensor) -> None:
        """Note whether `value` (any shape), the term `term` of a training micro-batch, holds a NaN or an infinity."""
        value = value.detach()
        row = self.flags[list(self.terms).index(term)]
        row[0] += value.isnan().any()
        row[1] += value.isinf().any()

    def problems(self, accelerator, grad_norm: torch.Tensor | float | None) -> list[str]:
        """The terms that went non-finite on any process since the last call, then the gradient norm (`None`: not
        checked), as "<term> is nan"; the flags are cleared."""
        flags = accelerator.reduce(self.flags, reduction="sum").tolist()
        self.flags.zero_()
        found = [
            f"{name} is {_kind(*flag)}" for name, flag in zip(self.terms.values(), flags, strict=True) if any(flag)
        ]
        if grad_norm is not None and not math.isfinite(grad_norm := float(grad_norm)):
            found.append(f"the gradient norm is {grad_norm}")
        return found


def _kind(nan: float, inf: float) -> str:
    return "nan and inf" if nan and inf else "nan" if nan else "inf"


def check_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], output_dir: str) -> None:
    """Raise `NonFiniteTrainingError` naming the tensors that are not finite, instead of saving them to
    `output_dir`."""
    bad = [name for name, tensor in named_tensors if tensor.is_floating_point() and not tensor.isfinite().all()]
    if bad:
        listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteTrainingError(
            f"Refusing to save non-finite weights to {output_dir}: {listed} hold NaN or infinite values. The earlier "
            "checkpoints are intact; resume from the latest one with a lower learning_rate or beta."
        )
