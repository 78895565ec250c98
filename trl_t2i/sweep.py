"""The divergence × β sweep behind the reward–diversity frontier: which runs to train, where they go, and which of
them are already trained (so that an interrupted sweep resumes where it stopped)."""

import warnings
from pathlib import Path

import torch

from .divergences import get_divergence
from .run_settings import RUN_SETTINGS_FILE, RunSettings


COMPARED_SETTINGS = (
    "divergence",
    "divergence_estimator",
    "beta",
    "beta_schedule",
    "beta_end",
    "sampling",
    "cfg_logprobs",
    "loss_type",
    "num_generations",
    "learning_rate",
    "max_steps",
    "seed",
    "per_device_train_batch_size",
)
"""Settings of a finished run that must match the sweep's for the run to be reused as is (same names in
`RunSettings` and `T2IGRPOConfig`)."""


def sweep(divergences: list[str], betas: list[float], match_curvature: bool) -> list[tuple[str, float]]:
    """(divergence, β) pairs to train: β = 0 once (no penalty: the divergence plays no part), then every pair.

    With `match_curvature`, each divergence's β is the listed one divided by its `curvature`, so that every divergence
    resists small policy changes alike.
    """
    runs = [(divergences[0], 0.0)] if 0 in betas else []
    for divergence in divergences:
        scale = 1.0 / curvature(divergence) if match_curvature else 1.0
        runs += [(divergence, float(f"{beta * scale:.6g}")) for beta in sorted(set(betas)) if beta > 0]
    return runs


def curvature(divergence: str) -> float:
    """f''(1): near π = ρ every f-divergence is f''(1)/2 · χ²(π‖ρ), so this sets how hard it resists small changes."""
    generator = get_divergence(divergence).f
    return torch.autograd.functional.hessian(generator, torch.tensor(1.0, dtype=torch.float64)).item()


def run_name(divergence: str, beta: float) -> str:
    """The run's folder name: `<divergence>-beta<β>`, or `beta0` for the unregularised run every divergence shares."""
    return f"{divergence}-beta{beta:g}" if beta else "beta0"


def is_finished(run_dir: Path) -> bool:
    """A run is finished once its final save is there: the weights and `run_settings.json` at the top level."""
    weights = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
    return (run_dir / RUN_SETTINGS_FILE).is_file() and any((run_dir / name).is_file() for name in weights)


def check_finished_run(run_dir: Path, training_args) -> None:
    """Warn when a run that is skipped was trained with other settings than `training_args` (a `T2IGRPOConfig`)."""
    trained = RunSettings.load(run_dir)
    differ = [
        f"{name}={getattr(trained, name)} (now {getattr(training_args, name)})"
        for name in COMPARED_SETTINGS
        if getattr(trained, name) != getattr(training_args, name)
    ]
    if differ:
        warnings.warn(
            f"Skipping {run_dir}, which was trained with {', '.join(differ)}; delete it to train it again.",
            stacklevel=2,
        )
