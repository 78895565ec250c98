"""Sweep divergences × β with a training recipe, then evaluate every run and draw the reward–diversity frontier.

    python scripts/frontier_t2i.py                                   # the tiny CPU sweep: about 7 minutes on 2 cores
    python scripts/frontier_t2i.py --divergences reverse_kl js --betas 0 0.1 0.4 --max_steps 100 \\
        --training_overrides learning_rate=5e-4 --output_dir outputs/my-frontier

For every divergence and every β it trains the recipe in this process, one run after the other (through
`trl_t2i.cli.grpo`'s parser and `main`, with `--divergence`, `--beta`, `--output_dir` and the overrides on top of the
recipe), into `output_dir/runs/<divergence>-beta<β>`. By default each divergence's β is the listed one divided by its
curvature f''(1) (JS has ¼ of KL's, so its β are 4× larger). β = 0 means no penalty, where every divergence trains the
same run: it is trained once, as `output_dir/runs/beta0`. Runs whose output already exists are skipped, so an
interrupted sweep resumes where it stopped. Then the base model and every run are evaluated with
`trl_t2i.cli.evaluate` (same prompts, seeds, guidance and temperature as training) into `output_dir/eval/`:
`summary.csv`, `frontier.png` and the rest.
"""

import gc
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import TrlParser

from ..divergences import DIVERGENCES, get_divergence
from . import evaluate, grpo
from .parsing import find_recipe


@dataclass
class FrontierArguments:
    """Arguments of the frontier sweep; each is also a `--flag` and a YAML key."""

    recipe: str = field(
        default="recipes/tiny/frontier.yaml",
        metadata={"help": "Training recipe (YAML of `trl-t2i grpo`) that every run of the sweep starts from."},
    )
    divergences: list[str] = field(
        default_factory=lambda: ["reverse_kl", "forward_kl", "js"],
        metadata={"help": f"Divergences to sweep; choices: {', '.join(sorted(DIVERGENCES))}."},
    )
    betas: list[float] = field(
        default_factory=lambda: [0.0, 0.03, 0.1, 0.3],
        metadata={"help": "Penalty coefficients to sweep for every divergence (0: one unregularised run)."},
    )
    match_curvature: bool = field(
        default=True,
        metadata={
            "help": "Divide each divergence's betas by its curvature f''(1) (JS: ×4, Jeffreys: ×½), so that every "
            "divergence penalises small policy changes alike; the runs record the β they trained with."
        },
    )
    max_steps: int | None = field(default=None, metadata={"help": "Training steps per run (default: the recipe's)."})
    training_overrides: list[str] = field(
        default_factory=list,
        metadata={"help": "More recipe overrides for every run, as `key=value` (e.g. `learning_rate=5e-4`)."},
    )
    num_prompts: int | None = field(
        default=120, metadata={"help": "Evaluation prompts: the first this many of the recipe's dataset (None: all)."}
    )
    num_images_per_prompt: int = field(default=8, metadata={"help": "Evaluation images per prompt (>= 2)."})
    eval_seed: int = field(default=1234, metadata={"help": "Seed of the evaluation's sampling noise."})
    feature_model: str | None = field(
        default=None,
        metadata={"help": "Image model (CLIP, DINOv2) for diversity features; default: weight-free pixel features."},
    )
    frontier_y: str = field(
        default="pairwise_distance",
        metadata={"help": f"Diversity metric on the frontier's y axis: {', '.join(evaluate.DIVERSITY_METRICS)}."},
    )
    device: str = field(
        default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "Device of the evaluation."}
    )
    output_dir: str = field(
        default="outputs/frontier", metadata={"help": "Runs go to `runs/`, evaluation to `eval/`."}
    )


def make_parser() -> TrlParser:
    return TrlParser(FrontierArguments)


def main(args: FrontierArguments) -> list[dict]:
    recipe = find_recipe(args.recipe)
    check_arguments(args)
    output_dir = Path(args.output_dir)
    overrides = recipe_overrides(args)

    pairs = sweep(args.divergences, args.betas, args.match_curvature)
    run_dirs, timings = [], {}
    for divergence, beta in pairs:
        run_dir = output_dir / "runs" / (f"{divergence}-beta{beta:g}" if beta else "beta0")
        run_dirs.append(run_dir)
        argv = ["--config", str(recipe), *overrides, "--divergence", divergence, "--beta", str(beta)]
        script_args, training_args, model_args = grpo.make_parser().parse_args_and_config(
            [*argv, "--output_dir", str(run_dir)]
        )
        if is_finished(run_dir):
            check_finished_run(run_dir, training_args)
            print(f"Skipping {run_dir}: already trained.")
            continue
        print(f"\n=== Training {run_dir.name} ({len(run_dirs)} of {len(pairs)}) ===")
        start = time.perf_counter()
        trainer = grpo.main(script_args, training_args, model_args)
        timings[run_dir.name] = time.perf_counter() - start
        del trainer
        gc.collect()

    # Evaluate like training samples: the recipe's model, prompts, rewards, guidance and temperature.
    script_args, training_args, model_args = grpo.make_parser().parse_args_and_config(
        ["--config", str(recipe), *overrides, "--output_dir", str(output_dir / "runs")]
    )
    start = time.perf_counter()
    summary = evaluate.main(
        evaluate.EvaluateArguments(
            model_name_or_path=model_args.model_name_or_path,
            runs=[str(run_dir) for run_dir in run_dirs],
            dataset_name=script_args.dataset_name,
            dataset_split=script_args.dataset_train_split,
            dataset_config=script_args.dataset_config,
            prompt_column=script_args.prompt_column,
            num_prompts=args.num_prompts,
            num_images_per_prompt=args.num_images_per_prompt,
            reward_funcs=script_args.reward_funcs,
            feature_model=args.feature_model,
            cfg_scale=training_args.cfg_scale,
            temperature=training_args.temperature,
            top_k=training_args.top_k or 0,
            top_p=training_args.top_p,
            seed=args.eval_seed,
            frontier_y=args.frontier_y,
            dtype=model_args.dtype if model_args.dtype not in (None, "auto") else "float32",
            device=args.device,
            output_dir=str(output_dir / "eval"),
        )
    )
    timings["evaluation"] = time.perf_counter() - start
    print("\nTimes (s): " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in timings.items()))
    print(f"Frontier: {(output_dir / 'eval' / 'frontier.png').resolve()}")
    return summary


def check_arguments(args: FrontierArguments) -> None:
    """Catch bad sweep settings before anything is trained."""
    unknown = [name for name in args.divergences if name not in DIVERGENCES]
    if unknown:
        raise ValueError(f"Unknown divergences {unknown}. Valid choices: {', '.join(sorted(DIVERGENCES))}.")
    if not args.divergences or not args.betas:
        raise ValueError("The sweep needs at least one divergence and one beta.")
    if any(beta < 0 for beta in args.betas):
        raise ValueError(f"betas must be >= 0, got {args.betas}.")
    evaluate.check_images_per_prompt(args.num_images_per_prompt)
    if args.frontier_y not in evaluate.DIVERSITY_METRICS:
        raise ValueError(
            f"Unknown frontier_y {args.frontier_y!r}. Valid choices: {', '.join(evaluate.DIVERSITY_METRICS)}."
        )
    for override in args.training_overrides:
        if "=" not in override:
            raise ValueError(f"Training override {override!r} is not `key=value` (e.g. `learning_rate=5e-4`).")
        if override.split("=", 1)[0].lstrip("-") in ("divergence", "beta", "output_dir"):
            raise ValueError(f"Training override {override!r}: the sweep sets divergence, beta and output_dir itself.")


def recipe_overrides(args: FrontierArguments) -> list[str]:
    """`key=value` overrides (and `max_steps`) as the `--key value` flags of the training parser."""
    flags = []
    for override in args.training_overrides:
        key, value = override.split("=", 1)
        flags += [f"--{key.lstrip('-')}", value]
    if args.max_steps is not None:
        flags += ["--max_steps", str(args.max_steps)]
    return flags


def sweep(divergences: list[str], betas: list[float], match_curvature: bool) -> list[tuple[str, float]]:
    """(divergence, β) pairs to train: β = 0 once (no penalty: the divergence plays no part), then every pair."""
    runs = [(divergences[0], 0.0)] if 0 in betas else []
    for divergence in divergences:
        scale = 1.0 / curvature(divergence) if match_curvature else 1.0
        runs += [(divergence, float(f"{beta * scale:.6g}")) for beta in sorted(set(betas)) if beta > 0]
    return runs


def curvature(divergence: str) -> float:
    """f''(1): near π = ρ every f-divergence is f''(1)/2 · χ²(π‖ρ), so this sets how hard it resists small changes."""
    generator = get_divergence(divergence).f
    return torch.autograd.functional.hessian(generator, torch.tensor(1.0, dtype=torch.float64)).item()


def is_finished(run_dir: Path) -> bool:
    """A run is finished once its final save is there: the weights and `training_args.bin` at the top level."""
    weights = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
    return (run_dir / "training_args.bin").is_file() and any((run_dir / name).is_file() for name in weights)


def check_finished_run(run_dir: Path, training_args) -> None:
    """Warn when a run that is skipped was trained with other settings than the sweep asks for now."""
    trained = torch.load(run_dir / "training_args.bin", weights_only=False)
    fields = ("divergence", "beta", "max_steps", "learning_rate", "seed", "per_device_train_batch_size")
    differ = [
        f"{name}={getattr(trained, name, None)} (now {getattr(training_args, name)})"
        for name in fields
        if getattr(trained, name, None) != getattr(training_args, name)
    ]
    if differ:
        warnings.warn(
            f"Skipping {run_dir}, which was trained with {', '.join(differ)}; delete it to train it again.",
            stacklevel=2,
        )


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
