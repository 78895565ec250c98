"""The penalty coefficient β over training: constant, a linear or cosine ramp, or an adaptive controller."""

import math

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState


class BetaSchedule(TrainerCallback, ExportableState):
    """β at every optimizer step, following `T2IGRPOConfig.beta_schedule` (see its docstring).

    The `adaptive` schedule is PPO's adaptive KL controller on the optimised divergence: the trainer reports the
    divergence it measures on every training micro-batch (`measure`), and after each optimizer step

        β ← clip(β · (1 + rate · clip((D − target) / target, −0.2, 0.2)), beta_min, beta_max)

    with D the mean of the step's measurements. Its β is saved in checkpoints (`trainer_state.json`) and restored on
    resume.
    """

    MAX_ERROR = 0.2
    """Largest relative error the controller acts on (PPO's clip)."""

    def __init__(
        self,
        schedule: str = "constant",
        beta: float = 0.04,
        beta_end: float | None = None,
        target: float | None = None,
        rate: float = 0.1,
        beta_min: float = 1e-4,
        beta_max: float = 10.0,
    ):
        self.schedule, self.beta, self.beta_end = schedule, beta, beta_end
        self.target, self.rate, self.beta_min, self.beta_max = target, rate, beta_min, beta_max
        self.adaptive_beta = beta
        self.measurements: list[float] = []

    @classmethod
    def from_config(cls, args) -> "BetaSchedule":
        return cls(
            args.beta_schedule,
            args.beta,
            args.beta_end,
            args.divergence_target,
            args.beta_adaptive_rate,
            args.beta_min,
            args.beta_max,
        )

    def value(self, global_step: int, max_steps: int) -> float:
        """β at `global_step` of `max_steps`."""
        if self.schedule == "constant":
            return self.beta
        if self.schedule == "adaptive":
            return self.adaptive_beta
        progress = min(global_step / max(max_steps, 1), 1.0)
        if self.schedule == "linear":
            return self.beta + (self.beta_end - self.beta) * progress
        return self.beta_end + (self.beta - self.beta_end) * 0.5 * (1 + math.cos(math.pi * progress))

    def measure(self, divergence: float) -> None:
        """Report the divergence measured on one training micro-batch (all ranks)."""
        if self.schedule == "adaptive" and math.isfinite(divergence):
            self.measurements.append(divergence)

    def update(self) -> None:
        """One controller step from the measurements since the last one."""
        if not self.measurements:
            return
        measured = sum(self.measurements) / len(self.measurements)
        error = min(max((measured - self.target) / self.target, -self.MAX_ERROR), self.MAX_ERROR)
        self.adaptive_beta = min(max(self.adaptive_beta * (1 + self.rate * error), self.beta_min), self.beta_max)
        self.measurements.clear()

    def on_step_end(self, args, state, control, **kwargs):
        if self.schedule == "adaptive":
            self.update()

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__) if state.global_step else None
        if saved:  # resuming: continue from the checkpoint's β
            self.adaptive_beta = saved["attributes"]["adaptive_beta"]

    def state(self) -> dict:
        return {
            "args": {
                "schedule": self.schedule,
                "beta": self.beta,
                "beta_end": self.beta_end,
                "target": self.target,
                "rate": self.rate,
                "beta_min": self.beta_min,
                "beta_max": self.beta_max,
            },
            "attributes": {"adaptive_beta": self.adaptive_beta},
        }
