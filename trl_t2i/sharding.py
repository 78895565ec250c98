"""The sharded set-ups (FSDP, DeepSpeed) a run can train with, checked before the model loads."""

import os

from transformers import TrainingArguments
from transformers.utils import strtobool


def check_sharding(args: TrainingArguments) -> None:
    """Refuse the sharded set-ups that would not train as asked.

    * FSDP or DeepSpeed with `use_cpu`: accelerate 1.15 enables DeepSpeed only when not on CPU (`accelerate/state.py`
      line 974: `... == "true" and not cpu`) and FSDP only for GPU-like distributed types (line 986), which a CPU
      process is not (`MULTI_CPU`): the run would silently be plain DDP, every process holding the whole model.
    * FSDP2 (`fsdp_version: 2`): the image sampler calls the model's submodules directly, and FSDP2 gathers the
      parameters of the root module (embeddings, image head, aligners) only in the root's own `forward`. FSDP1 is
      gathered around generation (TRL's `summon_full_params`), DeepSpeed ZeRO-3 too (`ds3_gather_for_generation`).
    * `skip_nonfinite_steps` with DeepSpeed: the engine steps inside the backward pass, before the step could be
      skipped.

    The set-up is read where transformers and accelerate read it: `args.fsdp`/`args.deepspeed`, else the variables
    that `accelerate launch` sets from its config file.
    """
    fsdp_version = _fsdp_version(args)
    deepspeed = args.deepspeed is not None or strtobool(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false"))
    if args.use_cpu and (fsdp_version or deepspeed):
        raise ValueError(
            f"{'FSDP' if fsdp_version else 'DeepSpeed'} is set up but so is `use_cpu`: accelerate enables FSDP and "
            "DeepSpeed only on GPUs (accelerate/state.py), so on CPU this run would be plain DDP, every process "
            "holding the whole model. On CPU, launch with recipes/accelerate/cpu_ddp.yaml; on GPUs, leave `use_cpu` "
            "unset."
        )
    if deepspeed and getattr(args, "skip_nonfinite_steps", 0):
        raise ValueError(
            "`skip_nonfinite_steps` cannot skip a step under DeepSpeed: its engine updates the weights inside the "
            "backward pass, before a step with a non-finite loss could be dropped. Leave it at 0: such a step then "
            "stops the run, and nothing of it is saved."
        )
    if fsdp_version == 2:
        raise ValueError(
            "FSDP2 (`fsdp_version: 2`) does not gather the parameters that the image sampler uses outside the "
            "model's forward (embeddings, image head, aligners). Launch with recipes/accelerate/deepspeed_zero3.yaml "
            "(DeepSpeed ZeRO-3), or with FSDP1: `fsdp_version: 1` in the accelerate config."
        )


def _fsdp_version(args: TrainingArguments) -> int | None:
    """The FSDP version the run would use, `None` without FSDP."""
    if args.fsdp_plugin_args is not None:  # `--fsdp`, whose version defaults to 2
        return args.fsdp_plugin_args["fsdp_version"]
    if strtobool(os.environ.get("ACCELERATE_USE_FSDP", "false")):  # accelerate's plugin: FSDP_VERSION, else 1
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None
