"""Evaluate a base text-to-image model and trained runs on reward and diversity, and draw the reward–diversity
frontier.

    trl-t2i evaluate --runs outputs/js-beta0.1 reverse_kl=outputs/rkl-beta0.1 --num_images_per_prompt 8
    trl-t2i evaluate --model_name_or_path deepseek-community/Janus-Pro-7B --dtype bfloat16 \\
        --runs js=outputs/janus-js kl=outputs/janus-kl --dataset_name simple_scenes \\
        --reward_funcs pickscore hpsv2 --feature_model openai/clip-vit-large-patch14
    trl-t2i evaluate --model_name_or_path deepseek-community/Janus-Pro-7B --dtype bfloat16 \\
        --runs js=outputs/janus-js --geneval_metadata geneval/prompts/evaluation_metadata.jsonl \\
        --output_dir outputs/geneval-eval

Every run (and the base model) samples `num_images_per_prompt` images per prompt with the same noise, guidance and
temperature, so runs differ only by their weights. A run is a directory written by `trl-t2i grpo` (its
`run_settings.json` gives the divergence and β), a PEFT adapter directory or a full model directory, optionally
labelled `label=path`. `output_dir` receives `per_image.csv`, `per_prompt.csv`, `summary.csv`, `summary.json`, one
image grid per run and `frontier.png`: see `trl_t2i.evaluation`, which does the work.

With `--geneval_metadata`, the prompts are GenEval's and every run's images are also written as GenEval's scorer
reads them, `output_dir/geneval/<run>/<00000>/{metadata.jsonl, samples/0000.png, ...}` (4 images per prompt unless
`--num_images_per_prompt` says otherwise); then, in a GenEval checkout with its Mask2Former detector:

    python evaluation/evaluate_images.py <output_dir>/geneval/<run> \\
        --outfile <output_dir>/geneval/<run>/results.jsonl --model-path <OBJECT_DETECTOR_FOLDER>
    python evaluation/summary_scores.py <output_dir>/geneval/<run>/results.jsonl

`--save_images` writes every image as `output_dir/images/<run>/<prompt>_<image>.png` (see `trl_t2i.benchmarks`).
"""

from dataclasses import dataclass, field

from ..benchmarks import geneval_prompts, read_geneval_metadata
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
from ..rewards import get_rewards
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
    num_images_per_prompt: int | None = field(
        default=None,
        metadata={"help": "Images sampled per prompt, >= 2 (default: 8, or GenEval's 4 with `--geneval_metadata`)."},
    )
    geneval_metadata: str | None = field(
        default=None,
        metadata={
            "help": "GenEval's `evaluation_metadata.jsonl`: evaluate on its prompts and also write every run's images "
            "as GenEval's scorer reads them, under `output_dir/geneval/<run>/`."
        },
    )
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
        metadata={
            "help": "Reward names (see `trl_t2i.rewards.REWARDS`), import paths `package.module:function` or "
            "reward-server URLs."
        },
    )
    reward_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of the rewards by name, e.g. local weights: "
            '\'{"pickscore": {"model_id": "/models/PickScore_v1"}}\'.'
        },
    )
    output_dir: str = field(default="outputs/evaluation", metadata={"help": "Where tables and figures are written."})

    def __post_init__(self):
        if self.num_images_per_prompt is None:
            self.num_images_per_prompt = 4 if self.geneval_metadata else 8
        super().__post_init__()
        self.sampling  # noqa: B018 -- validates the sampling settings
        if self.geneval_metadata and self.prompts:
            raise ValueError("Pass `prompts` or `geneval_metadata` (which brings its own prompts), not both.")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1 (or unset for all prompts), got {self.num_prompts}.")


def make_parser() -> RecipeParser:
    return RecipeParser(EvaluateArguments)


def main(args: EvaluateArguments) -> list[dict]:
    runs = ([] if args.skip_base else [Run(BASE)]) + [read_run(spec) for spec in args.runs]
    reward_funcs = get_rewards(args.reward_funcs, args.reward_kwargs)  # model rewards load on their first call
    geneval_metadata = None
    if args.geneval_metadata:
        geneval_metadata = read_geneval_metadata(args.geneval_metadata)[: args.num_prompts]
        prompts = geneval_prompts(geneval_metadata)
    elif args.prompts:
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
        geneval_metadata=geneval_metadata,
    )
    print_table(summary)
    print_matched(
        summary, *frontier_axes(args.frontier_x, args.frontier_y, [reward.__name__ for reward in reward_funcs])
    )
    print(f"\nWrote the tables (per_image, per_prompt, summary), grids and frontier.png to {args.output_dir}")
    if geneval_metadata:
        print(f"GenEval's layout, for its evaluation/evaluate_images.py: {args.output_dir}/geneval/<run>")
    return summary


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
