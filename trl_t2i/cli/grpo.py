"""GRPO training of a text-to-image model with an f-divergence penalty.

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml \\
        scripts/grpo_t2i.py --config recipes/janus_pro_7b/qlora_single_gpu.yaml --divergence js

Every field of `T2IScriptArguments`, `T2IGRPOConfig` and TRL's `ModelConfig` is a `--flag` and a YAML key; flags
override the YAML. Installed users run the same thing as `trl-t2i grpo --config ...` (one process) or
`accelerate launch -m trl_t2i.cli grpo --config ...`.
"""

from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from ..config import UNSUPPORTED_SETTINGS, T2IGRPOConfig
from ..data import PROMPT_SETS, load_prompt_dataset
from ..rewards import get_reward
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
            Split used for evaluation when `eval_strategy` is not `"no"`.
        reward_funcs (`list[str]`, *optional*, defaults to `["colour_match"]`):
            Reward names (see `trl_t2i.rewards.REWARDS`) or import paths `package.module:function`. Weights go in
            `reward_weights`.
    """

    dataset_name: str = field(
        default="colour_objects",
        metadata={"help": f"Built-in prompt set ({', '.join(PROMPT_SETS)}), local prompt file or Hub dataset id."},
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the captions."})
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Split used for evaluation when `eval_strategy` is not 'no'."}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["colour_match"],
        metadata={"help": "Reward names or import paths `package.module:function`."},
    )


# Settings that T2IGRPOConfig rejects: hidden from `--help`, still parsed so that the config says why they are refused.


def make_parser() -> TrlParser:
    parser = RecipeParser((T2IScriptArguments, T2IGRPOConfig, ModelConfig))
    groups = [
        ("trl_t2i options", field_names(T2IGRPOConfig, own=True)),
        ("script options", field_names(T2IScriptArguments)),
        ("TRL/transformers training options", field_names(T2IGRPOConfig)),
        ("model options (TRL's ModelConfig)", field_names(ModelConfig)),
    ]
    return group_options(parser, groups, hidden=[name for name, _, _ in UNSUPPORTED_SETTINGS])


def check_model_args(model_args: ModelConfig, script_args: T2IScriptArguments, training_args: T2IGRPOConfig) -> None:
    """Catch bad combinations before any model or dataset is loaded."""
    if not model_args.model_name_or_path:
        raise ValueError("Set `model_name_or_path` (e.g. deepseek-community/Janus-Pro-7B or trl-t2i/tiny-janus).")
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
    check_model_args(model_args, script_args, training_args)
    train_dataset = load_prompt_dataset(
        script_args.dataset_name,
        script_args.dataset_train_split,
        script_args.prompt_column,
        script_args.dataset_config,
    )
    eval_dataset = None
    if training_args.eval_strategy != "no":
        if script_args.dataset_test_split is None:
            raise ValueError("`eval_strategy` is set: also set `dataset_test_split` (the evaluation split).")
        eval_dataset = load_prompt_dataset(
            script_args.dataset_name,
            script_args.dataset_test_split,
            script_args.prompt_column,
            script_args.dataset_config,
        )
    reward_funcs = [get_reward(name) for name in script_args.reward_funcs]

    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    trainer = T2IGRPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: every logged metric
    trainer.create_model_card(dataset_name=script_args.dataset_name)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if trainer.accelerator.is_main_process:
        output_dir = Path(training_args.output_dir).resolve()
        print(f"\nSaved {'the adapter' if model_args.use_peft else 'the model'} and model card to {output_dir}")
        print(f"Image grids: {output_dir / 'samples'}")
        trackers = ", ".join(training_args.report_to) or "none"
        print(f"Metrics: {output_dir / 'trainer_state.json'} (log_history; trackers: {trackers})")
    return trainer


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
