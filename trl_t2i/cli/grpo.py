"""GRPO training of a text-to-image model with an f-divergence penalty.

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml \\
        scripts/grpo_t2i.py --config recipes/janus_pro_7b/qlora_single_gpu.yaml --divergence js

Every field of `T2IScriptArguments`, `T2IGRPOConfig` and TRL's `ModelConfig` is a `--flag` and a YAML key; flags
override the YAML. Installed users run the same thing as `trl-t2i grpo --config ...` (one process) or
`accelerate launch -m trl_t2i.cli grpo --config ...`.

A run owns its `output_dir`: a second run into it fails while the first is running, and a new run into the folder
of an earlier one fails unless it continues it, `--resume_from_checkpoint true` (its latest checkpoint-N) or
`--resume_from_checkpoint <output_dir>/checkpoint-N`, or starts over, `--overwrite_output_dir true`. On SIGTERM (a
cluster's preemption) or Ctrl-C, the run saves a checkpoint at the end of the step, prints the command that
resumes it and exits with 128 + the signal's number (143, 130), never 0.
"""

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from .. import output_dir
from ..checkpoints import resolve_resume
from ..config import UNSUPPORTED_SETTINGS, T2IGRPOConfig
from ..data import PROMPT_SETS, load_prompt_dataset
from ..models import load_family
from ..preemption import PreemptionCallback, stop_with_launcher
from ..rewards import get_rewards
from ..run_settings import check_resume_model
from ..sharding import check_sharding
from ..trainer import T2IGRPOTrainer
from .parsing import RecipeParser, field_names, group_options


@dataclass
class T2IScriptArguments(ScriptArguments):
    """
    Arguments of the training script, besides `T2IGRPOConfig` and `ModelConfig`.

    Args:
        dataset_name (`str`, *optional*, defaults to `"colour_objects"`):
            Prompt dataset: a built-in prompt set (`trl_t2i/data/*.txt`), a local `.txt`/`.json`/`.jsonl`/`.csv`/
            `.parquet` file, or a Hub dataset id.
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Column holding the captions.
        dataset_test_split (`str` or `None`, *optional*):
            Split used for evaluation when `eval_strategy` is not `"no"` (of `eval_dataset_name` when it is set).
        eval_dataset_name (`str` or `None`, *optional*):
            Held-out prompts for evaluation, from another prompt set than training's (a built-in set, a local file or
            a Hub dataset); by default evaluation reads the `dataset_test_split` of `dataset_name`.
        reward_funcs (`list[str]`, *optional*, defaults to `["colour_match"]`):
            Reward names (see `trl_t2i.rewards.REWARDS`), import paths `package.module:function`, or URLs of reward
            servers. Weights go in `reward_weights`.
        eval_reward_funcs (`list[str]`, *optional*, defaults to `[]`):
            Rewards only watched at evaluation, never trained on (names, import paths or URLs, as `reward_funcs`):
            logged as `eval_rewards/<name>/mean` and watched by the over-optimisation alarm.
        reward_kwargs (`dict` or `str`, *optional*):
            Keyword arguments of the rewards, by name (a JSON string on the command line), e.g. local weights on an
            offline cluster: `{pickscore: {model_id: /models/PickScore_v1, processor_id: /models/CLIP-ViT-H-14}}`.
        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Start a new run in an `output_dir` that holds an earlier run's outputs: its `checkpoint-*` folders and
            image grids are deleted (resuming would otherwise take them for this run's), its other files are
            overwritten as this run saves. Without it such a run is refused; `--resume_from_checkpoint true`
            continues the earlier run instead (and then nothing is deleted).
    """

    dataset_name: str = field(
        default="colour_objects",
        metadata={"help": f"Built-in prompt set ({', '.join(PROMPT_SETS)}), local prompt file or Hub dataset id."},
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the captions."})
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Split used for evaluation when `eval_strategy` is not 'no'."}
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Held-out prompts for evaluation (prompt set, file or Hub id); default: `dataset_name`."},
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["colour_match"],
        metadata={"help": "Reward names, import paths `package.module:function` or reward-server URLs."},
    )
    eval_reward_funcs: list[str] = field(
        default_factory=list,
        metadata={"help": "Rewards only watched at evaluation (the over-optimisation alarm), never trained on."},
    )
    reward_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": 'Keyword arguments of the rewards by name, e.g. \'{"pickscore": {"model_id": "/models/PS"}}\'.'
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start over in an `output_dir` that holds an earlier run's outputs, deleting its checkpoints and "
            "image grids. To continue that run instead: `--resume_from_checkpoint true` (its latest checkpoint)."
        },
    )


def make_parser() -> TrlParser:
    parser = RecipeParser((T2IScriptArguments, T2IGRPOConfig, ModelConfig))
    groups = [
        ("trl_t2i options", field_names(T2IGRPOConfig, own=True)),
        ("script options", field_names(T2IScriptArguments)),
        ("TRL/transformers training options", field_names(T2IGRPOConfig)),
        ("model options (TRL's ModelConfig)", field_names(ModelConfig)),
    ]
    # The settings T2IGRPOConfig rejects: hidden from `--help`, still parsed so that the config says why.
    return group_options(parser, groups, hidden=[name for name, _, _ in UNSUPPORTED_SETTINGS])


def check_model_args(model_args: ModelConfig, script_args: T2IScriptArguments, training_args: T2IGRPOConfig) -> None:
    """Catch bad combinations before any model or dataset is loaded."""
    if not model_args.model_name_or_path:
        raise ValueError("Set `model_name_or_path` (e.g. deepseek-community/Janus-Pro-7B or tiny:janus).")
    if model_args.load_in_4bit and model_args.load_in_8bit:
        raise ValueError("Choose one of `load_in_4bit` and `load_in_8bit`, not both.")
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not model_args.use_peft:
        raise ValueError(
            "Quantized loading (QLoRA) trains LoRA adapters on a frozen quantized model: set `use_peft: true` too."
        )
    if training_args.reward_weights is not None and len(training_args.reward_weights) != len(script_args.reward_funcs):
        raise ValueError(
            f"`reward_weights` has {len(training_args.reward_weights)} entries but there are "
            f"{len(script_args.reward_funcs)} reward functions ({', '.join(script_args.reward_funcs)})."
        )


def main(script_args: T2IScriptArguments, training_args: T2IGRPOConfig, model_args: ModelConfig) -> T2IGRPOTrainer:
    stop_with_launcher()  # the launcher's end (SIGTERM to it) ends the run too: while loading at once
    check_model_args(model_args, script_args, training_args)
    check_sharding(training_args)
    writer = training_args.should_save  # the process that writes `output_dir` checks and locks it
    if writer:
        output_dir.check_output_dir(training_args.output_dir)
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    # The model's config and processor, not its weights: every caption is checked against the model as it is read.
    family = load_family(model_args.model_name_or_path, trust_remote_code=training_args.trust_remote_code)
    if resume is not None:
        check_resume_model(resume, model_args.model_name_or_path, family.model_type)
    train_dataset = load_prompt_dataset(
        script_args.dataset_name,
        script_args.dataset_train_split,
        script_args.prompt_column,
        script_args.dataset_config,
        family,
        training_args.max_prompt_length,
    )
    eval_dataset = None
    if training_args.eval_strategy != "no":
        if script_args.dataset_test_split is None and script_args.eval_dataset_name is None:
            raise ValueError(
                "`eval_strategy` is set: also set `eval_dataset_name` (held-out prompts) or `dataset_test_split` (the "
                "evaluation split of `dataset_name`)."
            )
        eval_dataset = load_prompt_dataset(
            script_args.eval_dataset_name or script_args.dataset_name,
            script_args.dataset_test_split or "train",
            script_args.prompt_column,
            script_args.dataset_config,
            family,
            training_args.max_prompt_length,
        )
    rewards = get_rewards([*script_args.reward_funcs, *script_args.eval_reward_funcs], script_args.reward_kwargs)
    trained = len(script_args.reward_funcs)
    reward_funcs, eval_reward_funcs = rewards[:trained], rewards[trained:]

    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    claimed = output_dir.claimed(
        training_args.output_dir, new_run=resume is None, overwrite=script_args.overwrite_output_dir
    )
    with claimed if writer else contextlib.nullcontext():
        trainer = T2IGRPOTrainer(
            model=model_args.model_name_or_path,
            reward_funcs=reward_funcs,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=family.processing_class,
            quantization_config=get_quantization_config(model_args),
            peft_config=get_peft_config(model_args),
            eval_reward_funcs=eval_reward_funcs,
        )
        preemption = PreemptionCallback()
        trainer.add_callback(preemption)
        with preemption.catching_signals():
            trainer.train(resume_from_checkpoint=resume)
        if preemption.stopped_at is not None:  # it printed how to resume; a final save would look like a finished run
            preemption.exit()  # with the signal's status: an unfinished run must not look like a finished one
        trainer.save_model(training_args.output_dir)
        trainer.save_state()  # trainer_state.json: every logged metric
        trainer.create_model_card(dataset_name=script_args.dataset_name)
        if training_args.push_to_hub:
            trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()  # as TRL's script: finish the trackers and destroy the process group, every process done
    if trainer.accelerator.is_main_process:
        output = Path(training_args.output_dir).resolve()
        print(f"\nSaved {'the adapter' if model_args.use_peft else 'the model'} and model card to {output}")
        print(f"Image grids: {output / 'samples'}")
        trackers = ", ".join(training_args.report_to) or "none"
        print(f"Metrics: {output / 'trainer_state.json'} (log_history; trackers: {trackers})")
    return trainer


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
