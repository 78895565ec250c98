"""Plan a training recipe for the GPUs at hand with the memory model: the largest batches that fit, whether LoRA or
QLoRA is needed, and the flags that train it so.

    trl-t2i plan --config recipes/janus_pro_7b/qlora_single_gpu.yaml --gpu_memory_gb 24
    trl-t2i plan --config my_recipe.yaml --gpu_memory_gb 80 --num_processes 4 --zero_stage 3

The recipe is parsed as `trl-t2i grpo` parses it. The processes and the DeepSpeed ZeRO stage are those of the
`accelerate launch` command in its header (else one process, no ZeRO) unless given; every number is per GPU. The
plan keeps the recipe's images per optimizer step (see `trl_t2i.memory_plan`, which does the work).
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from ..memory_plan import MemoryPlan, RecipeMemory, plan, recipe_memory
from . import grpo
from .parsing import find_recipe


@dataclass
class PlanArguments:
    """Arguments of `trl-t2i plan`."""

    config: str = field(
        metadata={
            "help": "Training recipe to plan (a YAML of `trl-t2i grpo`); a `recipes/...` path that does not exist "
            "here names a recipe shipped with trl_t2i."
        }
    )
    gpu_memory_gb: float = field(
        metadata={"help": "Memory of each GPU, in GB of 10⁹ bytes (a '24 GB' card has 24 GiB, 25.8 GB)."}
    )
    num_processes: int | None = field(
        default=None,
        metadata={
            "help": "Processes (GPUs) training together; default: the recipe header's `accelerate launch`, or 1."
        },
    )
    zero_stage: int | None = field(
        default=None,
        metadata={"help": "DeepSpeed ZeRO stage, 0 (none), 2 or 3; default: the recipe header's accelerate config."},
    )


class PlanParser(HfArgumentParser):
    """The parser of `trl-t2i plan`, whose `--config` is the recipe to plan: one of its arguments, not a file of its
    options as for the other commands (`TrlParser` reserves the name for that)."""

    def parse_args_and_config(self, args: list[str] | None = None) -> tuple[PlanArguments]:
        return self.parse_args_into_dataclasses(args)


def make_parser() -> PlanParser:
    return PlanParser(PlanArguments, usage="%(prog)s --config recipe.yaml --gpu_memory_gb GB [--option value ...]")


def read_recipe(recipe: str | Path, num_processes: int | None = None, zero_stage: int | None = None) -> RecipeMemory:
    """A recipe parsed as `trl-t2i grpo` parses it, on the processes and ZeRO stage of the `accelerate launch`
    command in its header unless `num_processes` / `zero_stage` are given."""
    path = find_recipe(recipe)
    text = path.read_text()
    launched_processes, launched_stage = launch(text)
    # GPU recipes ask for bf16, which transformers refuses on a machine without a GPU: planning needs none.
    script_args, training_args, model_args = grpo.make_parser().parse_args_and_config(
        ["--config", str(path), "--use_cpu", "true"]
    )
    return recipe_memory(
        script_args,
        training_args,
        model_args,
        num_processes=launched_processes if num_processes is None else num_processes,
        zero_stage=launched_stage if zero_stage is None else zero_stage,
        sets_generation_batch_size="generation_batch_size" in yaml.safe_load(text),
    )


def launch(recipe_text: str) -> tuple[int, int]:
    """`(processes, ZeRO stage)` of the `accelerate launch` command in a recipe's header; `(1, 0)` without one."""
    config_file = re.search(r"--config_file (\S+)", recipe_text)
    if config_file is None:
        return 1, 0
    accelerate = yaml.safe_load(find_recipe(config_file.group(1)).read_text())
    if accelerate["distributed_type"] == "FSDP":
        raise ValueError("The memory model does not cover FSDP: it covers one GPU, DDP and DeepSpeed ZeRO-2/3.")
    processes = re.search(r"--num_processes (\d+)", recipe_text)
    processes = int(processes.group(1)) if processes else accelerate["num_processes"]
    zero_stage = accelerate["deepspeed_config"]["zero_stage"] if accelerate["distributed_type"] == "DEEPSPEED" else 0
    return processes, zero_stage


def main(args: PlanArguments) -> MemoryPlan:
    recipe = read_recipe(args.config, args.num_processes, args.zero_stage)
    result = plan(recipe, args.gpu_memory_gb)
    print(result.report())
    processes = recipe.batch.num_processes
    launched = f" (on {processes} processes: the `accelerate launch` of the recipe's header)" if processes > 1 else ""
    print(f"\nTrain with{launched}:\n  " + " ".join(["trl-t2i grpo --config", args.config, *result.flags()]))
    return result


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
