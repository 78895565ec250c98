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
`trl_t2i.evaluation` (the recipe's prompts, rewards and watched `eval_reward_funcs`, and its sampling distribution)
into `output_dir/eval/`: `summary.csv`, `frontier.png` (`--frontier_x` puts a held-out reward on its x axis) and the
rest. The sweep itself (pairs, curvature, finished runs) is `trl_t2i.sweep`.
"""

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoints import latest_checkpoint
from ..data import load_prompt_dataset
from ..divergences import DIVERGENCES
from ..evaluation import (
    BASE,
    DIVERSITY_METRICS,
    EvaluationSettings,
    Run,
    evaluate_runs,
    frontier_axes,
    print_matched,
    print_table,
    read_run,
)
from ..models import load_family
from ..rewards import get_rewards
from ..sweep import check_finished_run, is_finished, run_name, sweep
from . import grpo
from .parsing import RecipeParser, find_recipe


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
    frontier_x: str | None = field(
        default=None,
        metadata={
            "help": "Reward on the frontier's x axis, e.g. a held-out reward of the recipe's `eval_reward_funcs` "
            "(its name, or `<name>_mean`); default: the first trained reward."
        },
    )
    frontier_y: str = field(
        default="pairwise_distance",
        metadata={"help": f"Diversity metric on the frontier's y axis: {', '.join(DIVERSITY_METRICS)}."},
    )
    device: str | None = field(
        default=None, metadata={"help": "Device of the evaluation (default: cuda when available, else cpu)."}
    )
    compile: str = field(
        default="auto",
        metadata={
            "help": "Evaluate with a static KV cache and a torch.compile'd decode step: `auto` (on CUDA), `true` or "
            "`false` (training follows the recipe's `compile_rollouts`, `auto` by default)."
        },
    )
    output_dir: str = field(
        default="outputs/frontier", metadata={"help": "Runs go to `runs/`, evaluation to `eval/`."}
    )

    def __post_init__(self):
        # Bad sweep settings fail here, before anything is trained.
        unknown = [name for name in self.divergences if name not in DIVERGENCES]
        if unknown:
            raise ValueError(f"Unknown divergences {unknown}. Valid choices: {', '.join(sorted(DIVERGENCES))}.")
        if not self.divergences or not self.betas:
            raise ValueError("The sweep needs at least one divergence and one beta.")
        if any(beta < 0 for beta in self.betas):
            raise ValueError(f"betas must be >= 0, got {self.betas}.")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1 (or None for all prompts), got {self.num_prompts}.")
        if self.frontier_y not in DIVERSITY_METRICS:
            raise ValueError(f"Unknown frontier_y {self.frontier_y!r}. Valid choices: {', '.join(DIVERSITY_METRICS)}.")
        for override in self.training_overrides:
            if "=" not in override:
                raise ValueError(f"Training override {override!r} is not `key=value` (e.g. `learning_rate=5e-4`).")
            if override.split("=", 1)[0].lstrip("-") in ("divergence", "beta", "output_dir"):
                raise ValueError(
                    f"Training override {override!r}: the sweep sets divergence, beta and output_dir itself."
                )

    def training_flags(self) -> list[str]:
        """`training_overrides` (and `max_steps`) as the `--key value` flags of the training parser."""
        flags = []
        for override in self.training_overrides:
            key, value = override.split("=", 1)
            flags += [f"--{key.lstrip('-')}", value]
        if self.max_steps is not None:
            flags += ["--max_steps", str(self.max_steps)]
        return flags


def make_parser() -> RecipeParser:
    return RecipeParser(FrontierArguments)


def main(args: FrontierArguments) -> list[dict]:
    recipe = find_recipe(args.recipe)
    output_dir = Path(args.output_dir)
    overrides = args.training_flags()
    # The evaluation samples like training: the recipe's model, prompts, rewards and sampling distribution.
    script_args, training_args, model_args = grpo.make_parser().parse_args_and_config(
        ["--config", str(recipe), *overrides, "--output_dir", str(output_dir / "runs")]
    )
    # Scored with the trained and the watched rewards, so that the frontier can show a held-out reward.
    reward_funcs = get_rewards([*script_args.reward_funcs, *script_args.eval_reward_funcs], script_args.reward_kwargs)
    frontier_axes(args.frontier_x, args.frontier_y, [reward.__name__ for reward in reward_funcs])  # before training
    evaluation_settings = EvaluationSettings(
        num_images_per_prompt=args.num_images_per_prompt,
        feature_model=args.feature_model,
        seed=args.eval_seed,
        frontier_x=args.frontier_x,
        frontier_y=args.frontier_y,
        dtype=model_args.dtype if model_args.dtype not in (None, "auto") else "float32",
        device=args.device,
        compile=args.compile,
    )

    held_out = script_args.eval_dataset_name  # the recipe's held-out prompts, if it has any
    dataset = load_prompt_dataset(
        held_out or script_args.dataset_name,
        (script_args.dataset_test_split or "train") if held_out else script_args.dataset_train_split,
        script_args.prompt_column,
        script_args.dataset_config,
        load_family(model_args.model_name_or_path),  # every caption fits the model, checked before any training
    )
    prompts = list(dataset["prompt"])[: args.num_prompts]

    pairs = sweep(args.divergences, args.betas, args.match_curvature)
    run_dirs, timings = [], {}
    for divergence, beta in pairs:
        run_dir = output_dir / "runs" / run_name(divergence, beta)
        run_dirs.append(run_dir)
        argv = ["--config", str(recipe), *overrides, "--divergence", divergence, "--beta", str(beta)]
        if latest_checkpoint(run_dir):  # an interrupted run goes on from its last checkpoint
            argv += ["--resume_from_checkpoint", "true"]
        run_script_args, run_training_args, run_model_args = grpo.make_parser().parse_args_and_config(
            [*argv, "--output_dir", str(run_dir)]
        )
        if is_finished(run_dir):
            check_finished_run(run_dir, run_training_args)
            print(f"Skipping {run_dir}: already trained.")
            continue
        print(f"\n=== Training {run_dir.name} ({len(run_dirs)} of {len(pairs)}) ===")
        start = time.perf_counter()
        trainer = grpo.main(run_script_args, run_training_args, run_model_args)
        timings[run_dir.name] = time.perf_counter() - start
        del trainer
        gc.collect()

    start = time.perf_counter()
    summary = evaluate_runs(
        model_args.model_name_or_path,
        [Run(BASE)] + [read_run(str(run_dir)) for run_dir in run_dirs],
        prompts,
        reward_funcs,
        output_dir / "eval",
        training_args.sampling,
        evaluation_settings,
    )
    timings["evaluation"] = time.perf_counter() - start
    print_table(summary)
    print_matched(
        summary, *frontier_axes(args.frontier_x, args.frontier_y, [reward.__name__ for reward in reward_funcs])
    )
    print("\nTimes (s): " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in timings.items()))
    print(f"Frontier: {(output_dir / 'eval' / 'frontier.png').resolve()}")
    return summary


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
