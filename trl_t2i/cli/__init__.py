"""`trl-t2i <command>`: the scripts of this package for installed users (no checkout needed).

trl-t2i grpo --config recipe.yaml --divergence js       # train (one process)
accelerate launch -m trl_t2i.cli grpo --config ...     # train (any accelerate set-up)
trl-t2i sample --model_name_or_path ... --adapter ...  # sample images
trl-t2i plan --config recipe.yaml --gpu_memory_gb 24   # batch sizes and LoRA/QLoRA that fit a GPU
trl-t2i push --output_dir ... --hub_model_id ...       # upload a training output
trl-t2i serve_reward pickscore --port 8000             # a reward behind HTTP: reward_funcs: [http://host:8000/score]
"""

import importlib
import logging
import sys
import warnings


# PEFT imports bitsandbytes whenever it is installed; on CPU, bitsandbytes then logs that an inference kernel is
# missing, on every run. trl_t2i never uses that kernel: it disables the repack that would need it
# (`disable_bnb_cpu_repack`). Installed here, before a command imports PEFT, and only for the commands: importing the
# library changes no logging.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")
)

# PEFT 0.21 (`PeftModel.__init__`) and TRL 1.16 (`unwrap_model_for_generation`, `disable_gradient_checkpointing`) call
# transformers' deprecated `*gradient_checkpointing*` aliases on every run: nothing a user of these commands can act on
# (both are pinned in pyproject.toml). Remove once they call the `activation_checkpointing` names.
warnings.filterwarnings(
    "ignore",
    message=r"`(is_gradient_checkpointing|gradient_checkpointing_enable|gradient_checkpointing_disable)` "
    r"is deprecated",
    category=FutureWarning,
    module="transformers.modeling_utils",
)

COMMANDS = {
    "grpo": "Train with GRPO.",
    "sample": "Sample images.",
    "evaluate": "Evaluate runs on reward and diversity; draw the frontier.",
    "frontier": "Sweep divergences × beta, then evaluate.",
    "plan": "Plan batch sizes and LoRA/QLoRA for a GPU's memory.",
    "push": "Upload a training output to the Hub.",
    "serve_reward": "Serve a reward over HTTP for training runs elsewhere.",
    "convert_llamagen": "Convert official LlamaGen-T2I checkpoints into a model folder.",
}


def usage() -> str:
    width = max(map(len, COMMANDS)) + 2
    listing = "\n".join(f"  {name:<{width}}{help}" for name, help in COMMANDS.items())
    return (
        "usage: trl-t2i <command> [--config recipe.yaml] [--option value ...]\n\n"
        f"commands:\n{listing}\n\n"
        "Run `trl-t2i <command> --help` for the options of a command."
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return
    if not argv or argv[0] not in COMMANDS:
        problem = f"Unknown command {argv[0]!r}." if argv else "No command given."
        sys.exit(f"{problem} Valid commands: {', '.join(COMMANDS)}.\n\n{usage()}")
    command = importlib.import_module(f"{__name__}.{argv[0]}")
    parser = command.make_parser()
    parser.prog = f"trl-t2i {argv[0]}"
    command.main(*parser.parse_args_and_config(argv[1:]))
