"""Evaluate a base text-to-image model and trained runs on reward and diversity, and draw the reward–diversity frontier.

    trl-t2i evaluate --runs outputs/js-beta0.1 reverse_kl=outputs/rkl-beta0.1 --num_images_per_prompt 8
    trl-t2i evaluate --model_name_or_path deepseek-community/Janus-Pro-7B --dtype bfloat16 \\
        --runs js=outputs/janus-js kl=outputs/janus-kl --dataset_name simple_scenes \\
        --reward_funcs pickscore hpsv2 --feature_model openai/clip-vit-large-patch14

Every run (and the base model) samples `num_images_per_prompt` images per prompt with the same noise, guidance and
temperature, so runs differ only by their weights. A run is a directory written by `trl-t2i grpo` (its
`run_settings.json` gives the divergence and β), a PEFT adapter directory or a full model directory, optionally
labelled `label=path`. `output_dir` receives `per_image.csv`, `per_prompt.csv`, `summary.csv`, `summary.json`, one
image grid per run and `frontier.png`: see `trl_t2i.evaluation`, which does the work.
"""

from dataclasses import dataclass, field

from ..data import PROMPT_SETS, load_prompt_dataset
from ..evaluation import (
    BASE,
    EvaluationSettings,
    Run,
    evaluate_runs,
    frontier_axes,
    print_matched,
    print_table,
    read_run,
)
from ..models import TINY_JANUS
from ..rewards import get_reward
from .arguments import SamplingArguments
from .parsing import RecipeParser


@dataclass
class EvaluateArguments(SamplingArguments, EvaluationSettings):
    """Arguments of `trl-t2i evaluate`; each is also a `--flag` and a YAML key."""

    model_name_or_path: str = field(
        default=TINY_JANUS,
        metadata={"help": "Hub id or local path of the base model that the runs were trained from."},
    )
    runs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Runs to compare with the base model: training output directories, PEFT adapter directories or "
            "full model directories, each optionally labelled as `label=path`."
        },
    )
    skip_base: bool = field(default=False, metadata={"help": "Do not evaluate the base model itself."})
    dataset_name: str = field(
        default="colour_objects",
        metadata={"help": f"Built-in prompt set ({', '.join(PROMPT_SETS)}), local prompt file or Hub dataset id."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a Hub dataset."})
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration of a Hub dataset."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the captions."})
    prompts: list[str] | None = field(
        default=None, metadata={"help": "Captions to evaluate on, instead of `dataset_name`."}
    )
    num_prompts: int | None = field(
        default=None, metadata={"help": "Evaluate on the first this many prompts only (default: all of them)."}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["colour_match"],
        metadata={"help": "Reward names (see `trl_t2i.rewards.REWARDS`) or import paths `package.module:function`."},
    )
    output_dir: str = field(default="outputs/evaluation", metadata={"help": "Where tables and figures are written."})

    def __post_init__(self):
        super().__post_init__()
        self.sampling  # noqa: B018 -- validates the sampling settings
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1 (or unset for all prompts), got {self.num_prompts}.")


def make_parser() -> RecipeParser:
    return RecipeParser(EvaluateArguments)


def main(args: EvaluateArguments) -> list[dict]:
    runs = ([] if args.skip_base else [Run(BASE)]) + [read_run(spec) for spec in args.runs]
    reward_funcs = [get_reward(name) for name in args.reward_funcs]  # model rewards load on their first call
    if args.prompts:
        prompts = list(args.prompts)
    else:
        dataset = load_prompt_dataset(args.dataset_name, args.dataset_split, args.prompt_column, args.dataset_config)
        prompts = list(dataset["prompt"])
    summary = evaluate_runs(
        args.model_name_or_path,
        runs,
        prompts[: args.num_prompts],
        reward_funcs,
        args.output_dir,
        args.sampling,
        settings=args,
    )
    print_table(summary)
    print_matched(summary, *frontier_axes(args, [reward.__name__ for reward in reward_funcs]))
    print(f"\nWrote the tables (per_image, per_prompt, summary), grids and frontier.png to {args.output_dir}")
    return summary


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
