"""The over-optimisation alarm: held-out rewards and diversity watched at every evaluation, and a warning when the
trained reward keeps rising while one of them falls.

At evaluation (`eval_strategy`, `eval_steps`, an `eval_dataset` of held-out prompts), the trainer scores the sampled
images with the rewards it trains on, as TRL does, and [`HeldOutScores`] adds the *watched* rewards
(`eval_reward_funcs`: scored, never trained on) and the images' diversity: the mean pairwise cosine distance between
the `pixel_features` of the images of each prompt. At the end of every evaluation it appends one [`Evaluation`]
(mean, standard deviation and count of every metric) to its history and checks the last `window` evaluations with
[`check_window`]: the alarm is raised when the trained reward rose over the window while a watched reward or the
diversity fell by more than `threshold` of its standard deviation (and by more than twice the fall's standard error,
so that a small evaluation set's noise alone cannot raise it). Reward hacking (grids, blur, over-saturation with β
too low) typically shows this way: the trained reward climbs while what it should correlate with drops.
"""

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import gather_object
from PIL import Image

from . import trl_boundary as boundary
from .metrics import pairwise_cosine_distance, pixel_features


logger = logging.getLogger(__name__)

TRAINED = "reward"
"""The trained reward: the weighted sum of the rewards trained on, as TRL logs it."""

DIVERSITY = "diversity"
"""The diversity watched: the pairwise distance of the images of each prompt (weight-free pixel features), logged as
`DIVERSITY_METRIC`."""

DIVERSITY_METRIC = "diversity/pairwise_distance"

SIGNIFICANCE = 2.0
"""A fall must also exceed this many standard errors of its own estimate."""


@dataclass
class Evaluation:
    """One evaluation's statistics: by metric, the mean, standard deviation and count of its values (per image for
    rewards, per prompt for the diversity)."""

    step: int
    mean: dict[str, float]
    std: dict[str, float]
    count: dict[str, int]


def fitted_change(steps: list[int], values: list[float]) -> tuple[float, np.ndarray]:
    """The change of `values` over `steps` by their least-squares line (slope × span), and the weights `c` with
    `change = c · values` (its variance is `Σ c² σ²` for independent values)."""
    steps = np.asarray(steps, dtype=np.float64)
    centred = steps - steps.mean()
    weights = centred / (centred**2).sum() * (steps[-1] - steps[0])
    return float(weights @ np.asarray(values, dtype=np.float64)), weights


def check_window(history: list[Evaluation], window: int, threshold: float) -> tuple[bool, dict[str, float]]:
    """Whether the last `window` evaluations raise the alarm, and each metric's fitted change in standard deviations.

    A metric's change is its least-squares change over the window (`fitted_change`), divided by its standard
    deviation at the window's first evaluation. The alarm: the trained reward's change is positive, and some other
    metric's is below `−threshold` and also more than `SIGNIFICANCE` standard errors below zero.

    Example:
        >>> rising = [Evaluation(step, {"reward": r, "ocr": o}, {"reward": 1.0, "ocr": 1.0}, {"reward": 64, "ocr": 64})
        ...           for step, r, o in [(0, 0.0, 0.0), (50, 0.5, -0.4), (100, 1.0, -0.9)]]
        >>> check_window(rising, window=3, threshold=0.5)
        (True, {'reward': 1.0, 'ocr': -0.9})
    """
    if window < 2 or len(history) < window:
        return False, {}
    recent = history[-window:]
    changes, falls = {}, []
    for name in recent[0].mean:
        values = [evaluation.mean.get(name, math.nan) for evaluation in recent]
        scale = recent[0].std.get(name, math.nan)
        if not all(math.isfinite(value) for value in values) or not scale > 0:
            continue  # a metric missing from an evaluation, or without spread, says nothing
        change, weights = fitted_change([evaluation.step for evaluation in recent], values)
        changes[name] = change / scale
        variances = [evaluation.std[name] ** 2 / max(evaluation.count[name], 1) for evaluation in recent]
        standard_error = math.sqrt(float(weights**2 @ np.asarray(variances)))
        if name != TRAINED and changes[name] < -threshold and -change > SIGNIFICANCE * standard_error:
            falls.append(name)
    return bool(falls) and changes.get(TRAINED, 0.0) > 0, changes


class HeldOutScores:
    """The watched rewards and the diversity of the images sampled at evaluation, and the alarm over evaluations.

    The trainer calls `add` for every evaluation batch (with the rewards TRL computed) and `end_evaluation` when the
    evaluation logs; both must run on every process (they gather).

    Args:
        reward_funcs (`list[Callable]`):
            The watched rewards, with TRL's signature; they get the same keyword arguments as the trained ones.
        names (`list[str]`):
            Their names (`rewards/<name>/mean` in the evaluation logs).
        window (`int`):
            Evaluations the alarm looks back over (0: no alarm, the metrics are still logged).
        threshold (`float`):
            The fall, in standard deviations, that raises it.
    """

    def __init__(self, reward_funcs: list[Callable], names: list[str], window: int, threshold: float):
        self.reward_funcs, self.names, self.window, self.threshold = reward_funcs, names, window, threshold
        self.history: list[Evaluation] = []
        self.values: dict[str, list[float]] = {}

    @property
    def pending(self) -> bool:
        """Whether batches were scored since the last `end_evaluation`."""
        return bool(self.values)

    def add(self, trainer, inputs: list[dict], prompts: list[str], images: list[Image.Image], rewards: torch.Tensor):
        """Score one evaluation batch: this process's `images`, and `rewards`, the trained rewards of every process
        `(images of all processes, reward functions)` as TRL's `_calculate_rewards` returns them."""
        trained = (rewards * trainer.reward_weights.to(rewards.device)).nansum(dim=1)
        trained[torch.isnan(rewards).all(dim=1)] = torch.nan  # as TRL's `reward`: no reward applies
        batch = {
            TRAINED: trained.tolist(),
            **self._watched_rewards(trainer, inputs, prompts, images),
            DIVERSITY: gather_object(_group_diversity(prompts, images)),
        }
        for name, values in batch.items():
            self.values.setdefault(name, []).extend(values)
            mean, std, _ = _statistics(values)
            if name == DIVERSITY:
                boundary.record_metric(trainer, DIVERSITY_METRIC, mean)
            elif name != TRAINED:  # TRL records the trained rewards itself
                boundary.record_metric(trainer, f"rewards/{name}/mean", mean)
                boundary.record_metric(trainer, f"rewards/{name}/std", std)

    def _watched_rewards(self, trainer, inputs, prompts, images) -> dict[str, list[float]]:
        """Each watched reward of the images of every process, called as TRL calls the trained ones."""
        skipped = ("prompt", "completion", "completion_ids")  # as TRL's `_calculate_rewards`
        columns = {key: [row[key] for row in inputs] for key in inputs[0] if key not in skipped}
        scores = {}
        for reward_func, name in zip(self.reward_funcs, self.names, strict=True):
            values = reward_func(prompts=prompts, completions=images, trainer_state=trainer.state, **columns)
            if len(values) != len(images):
                raise ValueError(
                    f"The watched reward {name!r} returned {len(values)} values for {len(images)} images."
                )
            local = [math.nan if value is None else value for value in values]
            scores[name] = trainer.accelerator.gather(torch.tensor(local, device=trainer.accelerator.device)).tolist()
        return scores

    def end_evaluation(self, step: int) -> dict[str, float]:
        """Close the evaluation: its statistics join the history; returns the metrics to log (the alarm flag and
        each metric's change over the window, in standard deviations) and warns when the alarm is raised."""
        statistics = {name: _statistics(values) for name, values in self.values.items()}
        self.values = {}
        mean, std, count = ({name: stats[i] for name, stats in statistics.items()} for i in range(3))
        self.history.append(Evaluation(step, mean, std, count))
        alarm, changes = check_window(self.history, self.window, self.threshold)
        if alarm:
            falls = ", ".join(
                f"{name} {change:+.2f}"
                for name, change in changes.items()
                if name != TRAINED and change < -self.threshold
            )
            logger.warning(
                f"Over-optimisation alarm at step {step}: over the evaluations since step "
                f"{self.history[-self.window].step}, the trained reward rose ({changes[TRAINED]:+.2f} standard "
                f"deviations) while held-out metrics fell ({falls} standard deviations). Look at the logged image "
                "grids for reward hacking; a larger β, an earlier checkpoint or another reward may be needed."
            )
        metrics = {"overoptimization/alarm": float(alarm)}
        metrics.update({f"overoptimization/{name}_change": change for name, change in changes.items()})
        return metrics


def _statistics(values: list[float]) -> tuple[float, float, int]:
    """Mean, standard deviation (n − 1) and count of the finite values (NaN: a reward that does not apply)."""
    finite = np.array([value for value in values if math.isfinite(value)], dtype=np.float64)
    mean = float(finite.mean()) if len(finite) else math.nan
    return mean, float(finite.std(ddof=1)) if len(finite) > 1 else math.nan, len(finite)


def _group_diversity(prompts: list[str], images: list[Image.Image]) -> list[float]:
    """The pairwise distance of the images of each prompt of the batch (with at least two images)."""
    groups: dict[str, list[Image.Image]] = {}
    for prompt, image in zip(prompts, images, strict=True):
        groups.setdefault(prompt, []).append(image)
    return [pairwise_cosine_distance(pixel_features(group)) for group in groups.values() if len(group) > 1]
