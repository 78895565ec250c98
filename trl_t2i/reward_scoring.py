"""Which images each reward scored: a reward that returns None or NaN for every image (a crashed model, a scoring
server gone down, captions it does not apply to) trains nothing while the run goes on with the penalty alone."""

import torch
from transformers.utils import logging

from .checkpoints import latest_checkpoint


logger = logging.get_logger(__name__)


class RewardFailure(ValueError):
    """A reward scored no image for too many steps (or at the first rollout of the run)."""


class RewardScoring:
    """Tracks, rollout by rollout, the fraction of images each reward scored (a finite value).

    A reward that scores nothing at the first rollout is an error at once: it never worked (a wrong prompt column,
    a model that does not load, captions it does not apply to). Later, the first rollout it scores nothing in is
    warned about, and once it has scored nothing for `max_unscored_steps` optimizer steps in a row the run stops.

    Args:
        names (`list[str]`): The rewards' names, in the order of the columns of the rewards `update` receives.
        max_unscored_steps (`int`): Optimizer steps a reward may score nothing in before `update` raises.
        output_dir (`str`): The run's output directory, whose latest checkpoint the error names.
    """

    def __init__(self, names: list[str], max_unscored_steps: int, output_dir: str):
        self.names = names
        self.max_unscored_steps = max_unscored_steps
        self.output_dir = output_dir
        self.unscored_since: dict[str, int] = {}
        """The step (1-based) from which each failing reward has scored no image."""
        self.started = False

    def update(self, rewards: torch.Tensor, global_step: int) -> dict[str, float]:
        """Record the `(images, rewards)` values of a rollout made for step `global_step + 1`; return each reward's
        scored fraction. Raises `RewardFailure` as described in the class docstring."""
        fractions = torch.isfinite(rewards).float().mean(0).tolist()
        step = global_step + 1
        for name, fraction in zip(self.names, fractions, strict=True):
            if fraction > 0:
                if self.unscored_since.pop(name, None) is not None:
                    logger.warning(f"The reward {name!r} scores images again at step {step}.")
                continue
            if not self.started:
                raise RewardFailure(
                    f"The reward {name!r} returned no finite value (only None or NaN) for any of the {len(rewards)} "
                    "images of the first step. Check that it applies to these captions (e.g. `colour_match` needs a "
                    "colour word) and that its model loads; a reward must score at least some images of a batch."
                )
            since = self.unscored_since.setdefault(name, step)
            if since == step:
                logger.warning(
                    f"The reward {name!r} scored none of the {len(rewards)} images of step {step} (only None or "
                    f"NaN): training goes on with the other rewards and the penalty, and stops if it scores nothing "
                    f"for {self.max_unscored_steps} steps (`max_unscored_steps`)."
                )
            if step - since + 1 >= self.max_unscored_steps:
                raise RewardFailure(
                    f"The reward {name!r} has scored no image (only None or NaN) since step {since}: "
                    f"{step - since + 1} steps, the most `max_unscored_steps` allows. It stopped working (a crashed "
                    "model, a scoring service gone down, an exception it turns into None?); the latest checkpoint is "
                    f"{latest_checkpoint(self.output_dir) or 'none (none saved yet)'}. Fix the reward, then resume."
                )
        self.started = True
        return dict(zip(self.names, fractions, strict=True))
