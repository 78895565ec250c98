"""Estimate the GPU memory of every Janus-Pro and LlamaGen-T2I recipe with `trl_t2i.memory`, or check the model
against what a CPU run allocates.

    python scripts/memory_model.py            # one markdown table per recipe (docs/memory.md pastes them)
    python scripts/memory_model.py --write_headers   # the recipes' memory comment blocks
    python scripts/memory_model.py --check    # a real-width Janus-Pro-1B with 2 layers, random weights, fp32, CPU

A recipe is read as `trl-t2i plan` reads it (`trl_t2i.cli.plan.read_recipe`): its YAML through the parser of
`trl-t2i grpo`, the number of processes and the ZeRO stage from the accelerate config its header launches with
(`--config_file`, `--num_processes`). `--check` runs one step of `T2IGRPOTrainer` and counts the bytes of the live
tensors at the peak of each phase (`LiveTensorBytes`, what `torch.cuda.max_memory_allocated` would say), next to the
model's prediction for the same reduced model. `LiveTensorBytes` and `phase_peaks` are the instruments
`tests/test_memory.py` measures the code with too.
"""

import contextlib
import functools
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
from datasets import Dataset
from peft import LoraConfig
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import HfArgumentParser, JanusForConditionalGeneration

import trl_t2i.trainer as trainer_module
from trl_t2i.cli.plan import read_recipe
from trl_t2i.config import T2IGRPOConfig
from trl_t2i.memory import (
    BACKWARD,
    DECODING,
    GB,
    LOSS,
    PHASES,
    REWARDS,
    SAMPLING,
    SCORING,
    Architecture,
    TrainingSetup,
    estimate,
    janus_pro_1b_config,
)
from trl_t2i.models import build_tiny_janus
from trl_t2i.rewards import colour_match
from trl_t2i.trainer import T2IGRPOTrainer


RECIPES = Path(__file__).resolve().parents[1] / "trl_t2i" / "recipes"
RECIPE_DIRS = ("janus_pro_1b", "janus_pro_7b", "llamagen_t2i")
MB = 1e6


@dataclass
class ScriptArguments:
    """Arguments of `scripts/memory_model.py`.

    Args:
        check (`bool`, *optional*, defaults to `False`):
            Measure a reduced real-width Janus-Pro-1B on CPU instead of printing the recipes' tables.
        write_headers (`bool`, *optional*, defaults to `False`):
            Rewrite each recipe's memory comment block from the model instead of printing the tables.
        check_layers (`int`, *optional*, defaults to `2`):
            Language-model layers of the reduced model (every width stays Janus-Pro-1B's).
        check_images (`int`, *optional*, defaults to `2`):
            Images sampled (two rows each with CFG), one prompt group; each is a training micro-batch.
    """

    check: bool = field(default=False, metadata={"help": "Measure a reduced Janus-Pro-1B on CPU."})
    write_headers: bool = field(default=False, metadata={"help": "Rewrite the recipes' memory comment blocks."})
    check_layers: int = field(default=2, metadata={"help": "Language-model layers of the reduced model."})
    check_images: int = field(default=2, metadata={"help": "Images sampled by the check."})


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(ScriptArguments)


def recipe_setup(path: Path) -> tuple[Architecture, TrainingSetup]:
    """The architecture and per-process setup a recipe trains with (as `trl-t2i plan` reads it)."""
    recipe = read_recipe(path)
    return recipe.architecture, recipe.setup


def describe(architecture: Architecture, setup: TrainingSetup) -> str:
    """One line: what is trained, how, and the batch sizes."""
    training = f"LoRA r={setup.lora_r}" if setup.lora_r is not None else "full fine-tuning"
    weights = f"NF4{' + double quant' if setup.double_quant else ''}" if setup.load_in_4bit else setup.weight_dtype
    zero = f", ZeRO-{setup.zero_stage}" if setup.zero_stage else ""
    rows = 2 if setup.guided_sampling else 1
    train_rows = 2 if setup.guided_scoring else 1
    estimator = f"{setup.divergence_estimator} estimator"
    return (
        f"{architecture.name} ({architecture.num_params / 1e9:.2f} B params), {training}, {weights} weights, "
        f"{setup.num_processes} process{'es' if setup.num_processes > 1 else ''}{zero}; "
        f"per process: rollout of {setup.rollout_images} images "
        f"({rows * setup.rollout_images} rows), micro-batch of {setup.micro_batch} images "
        f"({train_rows * setup.micro_batch} rows), {estimator}, "
        f"reward model: {setup.reward or 'none'}; prompts of {architecture.prompt_length} positions."
    )


def print_recipes() -> None:
    """One table per distinct estimate (the divergence does not change the memory)."""
    groups = {}
    for directory in RECIPE_DIRS:
        for path in sorted((RECIPES / directory).glob("*.yaml")):
            architecture, setup = recipe_setup(path)
            groups.setdefault((architecture, setup), []).append(f"`{directory}/{path.name}`")
    for (architecture, setup), names in groups.items():
        print(f"### {', '.join(names)}\n\n{describe(architecture, setup)}\n")
        print(estimate(architecture, setup).to_markdown() + "\n")


HEADER_MARKER = (
    "# Memory per GPU (estimated, not measured on a GPU; `python scripts/memory_model.py --write_headers` writes this"
)
HEADER_LINE = "#   "


def memory_header(architecture: Architecture, setup: TrainingSetup, largest: int = 4) -> list[str]:
    """A recipe's memory comment: the peak, where it falls, and the largest items (see docs/memory.md)."""
    result = estimate(architecture, setup)
    lines = [
        HEADER_MARKER,
        f"{HEADER_LINE}block, docs/memory.md explains it): "
        f"peak {result.peak / GB:.1f} GB in the {result.peak_phase} phase, "
        f"training {result.training_peak / GB:.1f} GB. Largest items:",
    ]
    for item in sorted(result.items, key=lambda item: -item.bytes)[:largest]:
        lines.append(f"{HEADER_LINE}- {item.name}: {item.bytes / GB:.2f} GB")
    return lines


def with_memory_header(text: str, header: list[str]) -> str:
    """`text` (a recipe) with its memory block replaced by `header`, or `header` added before the first blank comment
    line when it has none."""
    lines = text.splitlines()
    if HEADER_MARKER in lines:
        start = lines.index(HEADER_MARKER)
        end = start + 1
        while end < len(lines) and lines[end].startswith(HEADER_LINE):
            end += 1
    else:
        start = end = lines.index("#")
    return "\n".join(lines[:start] + header + lines[end:]) + "\n"


def write_headers() -> None:
    for directory in RECIPE_DIRS:
        for path in sorted((RECIPES / directory).glob("*.yaml")):
            path.write_text(with_memory_header(path.read_text(), memory_header(*recipe_setup(path))))
            print(f"wrote the memory block of {path}")


# ---------------------------------------------------------------------------------------------- --check


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensors that the ops run inside it allocate, while they are alive, and their peak: what
    `torch.cuda.max_memory_allocated` would report, for CPU runs. Tensors made before it was entered, and outputs that
    alias an input (views, in-place ops), are not counted.

    Example:
        >>> with LiveTensorBytes() as live:
        ...     y = torch.ones(1000).exp()  # `ones` is freed once `exp` has read it
        >>> live.current, live.peak
        (4000, 8000)
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._counted = {}  # id of each counted storage → a weak reference whose callback uncounts it

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now."""
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(output):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self._count(tensor.untyped_storage())
        return output

    def _count(self, storage: torch.UntypedStorage) -> None:
        key, size = id(storage), storage.nbytes()
        if key in self._counted or size == 0:
            return
        self.current += size
        self.peak = max(self.peak, self.current)
        self._counted[key] = weakref.ref(storage, lambda _, key=key, size=size: self._uncount(key, size))

    def _uncount(self, key: int, size: int) -> None:
        self.current -= size
        self._counted.pop(key, None)


def dynamic_bytes(result, phase: str) -> float:
    """What a phase adds to the memory that every phase holds (weights, optimizer, context)."""
    return sum(item.bytes for item in result.items if phase in item.phases and set(item.phases) != set(PHASES))


@contextlib.contextmanager
def phase_peaks(trainer: T2IGRPOTrainer) -> Iterator[dict[str, int]]:
    """The live tensor bytes (`LiveTensorBytes`) at the peak of each phase of the training steps run inside it, by
    phase name (`trl_t2i.memory.PHASES`): the trainer's own calls of the sampler, the VQ decoder, the rewards, the
    sampled estimator's re-scoring of the rollout, the loss and the backward. Tensors made before it was entered
    (weights, adapters) are not counted; what an earlier phase left alive is."""
    peaks = {}
    live = LiveTensorBytes()

    def probed(phase, function):
        @functools.wraps(function)
        def probe(*args, **kwargs):
            live.reset_peak()
            try:
                return function(*args, **kwargs)
            finally:
                peaks[phase] = max(peaks.get(phase, 0), live.peak)

        return probe

    probes = [
        (trainer_module, "sample_image_tokens", SAMPLING),
        (trainer.family, "decode", DECODING),
        (trainer, "_calculate_rewards", REWARDS),
        (trainer, "_reference_logps", SCORING),
        (trainer, "compute_loss", LOSS),
        (trainer.accelerator, "backward", BACKWARD),
    ]
    with contextlib.ExitStack() as stack:
        for owner, name, phase in probes:
            stack.enter_context(mock.patch.object(owner, name, probed(phase, getattr(owner, name))))
        stack.enter_context(live)
        yield peaks


def measure_training_step(
    model, processor, prompts: list[str], args: T2IGRPOConfig, lora_r: int
) -> tuple[dict[str, int], int]:
    """`phase_peaks` of `T2IGRPOTrainer.train()` on `model` with LoRA of rank `lora_r` and `colour_match` on `prompts`
    (each with a colour word), and the positions of those prompts (the rollout's `prompt_length`)."""
    trainer = T2IGRPOTrainer(
        model=model,
        reward_funcs=colour_match,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=processor,
        peft_config=LoraConfig(r=lora_r, lora_alpha=2 * lora_r),
    )
    with phase_peaks(trainer) as measured:
        trainer.train()
    return measured, trainer.family.tokenize_prompts(prompts)[0].size(1)


def check(args: ScriptArguments) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = janus_pro_1b_config()
    config.text_config.num_hidden_layers = args.check_layers
    _, processor = build_tiny_janus()  # a small tokenizer with Janus' special tokens: its ids fit the real vocab
    with LiveTensorBytes() as building:
        model = JanusForConditionalGeneration(config)
    prompts = ["a red fox and a rabbit reading a book together"]  # a colour for `colour_match`
    training_args = T2IGRPOConfig(
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=args.check_images,
        num_generations=args.check_images,
        max_steps=1,
        divergence="js",
        divergence_estimator="exact",
        activation_checkpointing=True,
        report_to=[],
        save_strategy="no",
        image_log_steps=0,
        disable_tqdm=True,
    )
    start = time.perf_counter()
    measured, prompt_length = measure_training_step(model, processor, prompts, training_args, lora_r=32)
    seconds = time.perf_counter() - start
    architecture = Architecture.from_janus_config(config, name="reduced Janus-Pro-1B", prompt_length=prompt_length)
    setup = TrainingSetup(
        rollout_images=args.check_images,
        micro_batch=1,
        lora_r=32,
        reward=None,
        weight_dtype="float32",
        mixed_precision=False,
        compiled_rollouts=False,  # on CPU rollouts are eager (`compile_rollouts: auto`)
    )
    result = estimate(architecture, setup)

    print(
        f"{architecture.name}: {args.check_layers} layers, {architecture.num_params / 1e9:.3f} B params, fp32, CPU, "
        f"1 thread; one T2IGRPOTrainer step ({seconds:.0f} s): {args.check_images} images sampled and decoded, "
        f"{args.check_images} micro-batches of 1 image, LoRA r=32, exact js\n"
    )
    print("| phase | predicted MB | live tensors MB |\n|---|---:|---:|")
    print(f"| building the model: weights | {architecture.num_params * 4 / MB:,.0f} | {building.peak / MB:,.0f} |")
    for phase in (SAMPLING, DECODING):
        print(f"| {phase} | {dynamic_bytes(result, phase) / MB:,.0f} | {measured[phase] / MB:,.0f} |")
    # The model counts the backward through the (B, N, V) tables in `loss`; the trainer runs it in `backward`.
    predicted = max(dynamic_bytes(result, LOSS), dynamic_bytes(result, BACKWARD))
    print(f"| loss and backward | {predicted / MB:,.0f} | {max(measured[LOSS], measured[BACKWARD]) / MB:,.0f} |")


def main(args: ScriptArguments) -> None:
    if args.check:
        check(args)
    elif args.write_headers:
        write_headers()
    else:
        print_recipes()


if __name__ == "__main__":
    (script_args,) = make_parser().parse_args_into_dataclasses()
    main(script_args)
