"""Plans a training recipe for a GPU of a given size with the memory model (`trl_t2i.memory`): what `trl-t2i plan`
prints.

The plan keeps what the recipe trains on per optimizer step, `per_device_train_batch_size ×
gradient_accumulation_steps × processes` images (its prompts × `num_generations`), and among the batch sizes that
do, finds the largest that fit on each GPU. A micro-batch is a divisor of the images each process trains on per
optimizer step, and the generation batch a whole number of micro-batches that divides an optimizer step's, so a
rollout never spans two optimizer steps (the first update after it stays on-policy, as TRL's default does).

Example (a LoRA run of Janus-Pro-7B does not fit in 24 GB; as QLoRA it does):
    >>> from trl_t2i.memory import TrainingSetup, janus_pro_7b
    >>> from trl_t2i.memory_plan import BatchSettings, RecipeMemory, plan
    >>> batch = BatchSettings(micro_batch=2, steps_per_generation=4, gradient_accumulation_steps=16, num_generations=8)
    >>> recipe = RecipeMemory(
    ...     janus_pro_7b(), batch.apply(TrainingSetup(rollout_images=8, micro_batch=2, lora_r=16)), batch
    ... )
    >>> result = plan(recipe, gpu_memory_gb=24)
    >>> result.mode, result.flags()  # doctest: +NORMALIZE_WHITESPACE
    ('QLoRA', ['--per_device_train_batch_size', '8', '--steps_per_generation', '2',
     '--gradient_accumulation_steps', '4', '--load_in_4bit', 'true', '--use_bnb_nested_quant', 'true'])
"""

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, JanusConfig

from .memory import (
    GB,
    REWARD_MODELS,
    Architecture,
    MemoryEstimate,
    TrainingSetup,
    estimate,
    janus_pro_1b,
    janus_pro_7b,
    llamagen_t2i_xl,
)
from .models.llamagen import LlamaGenConfig
from .models.loading import resolve_name


MODELS = {
    "deepseek-community/Janus-Pro-1B": janus_pro_1b,
    "deepseek-community/Janus-Pro-7B": janus_pro_7b,
    "llamagen-t2i-xl-256": llamagen_t2i_xl,  # the folder `trl-t2i convert_llamagen` writes for the official GPT-XL
}
"""The models the memory model knows by name, without their files."""

MODES = ("full fine-tuning", "LoRA", "QLoRA")
"""How a recipe can train, from the most memory to the least."""


def architecture_for(model_name_or_path: str) -> Architecture:
    """The architecture of a recipe's `model_name_or_path`: a local Janus or LlamaGen folder (or a tiny model) from its
    `config.json`, else one of `MODELS`."""
    path = Path(resolve_name(model_name_or_path))
    if (path / "config.json").is_file():
        config = AutoConfig.from_pretrained(path)
        if isinstance(config, JanusConfig):
            return Architecture.from_janus_config(config, name=model_name_or_path)
        if isinstance(config, LlamaGenConfig):
            return Architecture.from_llamagen_config(config, name=model_name_or_path)
        raise ValueError(f"The memory model covers Janus and LlamaGen, not {config.model_type!r} ({path}).")
    if model_name_or_path not in MODELS:
        raise ValueError(
            f"The memory model does not know {model_name_or_path!r}: it knows {', '.join(MODELS)}, and local Janus "
            "or LlamaGen model folders (their config.json)."
        )
    return MODELS[model_name_or_path]()


@dataclass(frozen=True)
class BatchSettings:
    """The batch sizes of a recipe on one process, as TRL's `GRPOConfig` resolves them.

    Args:
        micro_batch (`int`): `per_device_train_batch_size`, images per forward and backward.
        steps_per_generation (`int`): micro-batches per generation batch (the rollout, sampled at once).
        gradient_accumulation_steps (`int`): micro-batches per optimizer step.
        num_generations (`int`): images per prompt.
        num_iterations (`int`, *optional*, defaults to `1`): optimizer passes over each generation batch.
        num_processes (`int`, *optional*, defaults to `1`): processes (GPUs) training together.
        whole_groups (`bool`, *optional*, defaults to `False`): each process's generation batch must hold whole
            prompt groups (`token_selection="critical"` compares the images of a prompt).
    """

    micro_batch: int
    steps_per_generation: int
    gradient_accumulation_steps: int
    num_generations: int
    num_iterations: int = 1
    num_processes: int = 1
    whole_groups: bool = False

    @property
    def rollout_images(self) -> int:
        """Images one process samples at once: the generation batch on that process."""
        return self.micro_batch * self.steps_per_generation

    @property
    def images_per_step(self) -> int:
        """Images of an optimizer step, every process together."""
        return self.micro_batch * self.gradient_accumulation_steps * self.num_processes

    def problem(self) -> str | None:
        """Why TRL (or trl_t2i) would refuse these batches, or `None`."""
        if self.rollout_images * self.num_processes % self.num_generations:
            return f"the generation batch must hold whole prompt groups of {self.num_generations} images"
        if self.whole_groups and self.rollout_images % self.num_generations:
            return f"token_selection='critical' needs whole prompt groups of {self.num_generations} on each process"
        return None

    def apply(self, setup: TrainingSetup) -> TrainingSetup:
        """`setup` with these batches: their sizes, and what TRL re-scores or keeps because of them."""
        generate_every = self.steps_per_generation * self.num_iterations
        return dataclasses.replace(
            setup,
            rollout_images=self.rollout_images,
            micro_batch=self.micro_batch,
            old_logps=self.gradient_accumulation_steps % generate_every != 0,
            grads_during_rollout=self.gradient_accumulation_steps > generate_every,
        )


@dataclass(frozen=True)
class RecipeMemory:
    """A training recipe as the memory model sees it, per process.

    Args:
        architecture (`Architecture`): The model it trains.
        setup (`TrainingSetup`): How it trains (its batch fields are those of `batch`).
        batch (`BatchSettings`): Its batch sizes.
        lora_r (`int`, *optional*, defaults to `16`): The LoRA rank a plan uses when it switches to adapters (the
            recipe's `lora_r`).
        penalty (`bool`, *optional*, defaults to `True`): Whether full fine-tuning would hold a frozen reference copy
            (a penalty or the dynamic-advantage weight; adapters always have their reference for free).
        sets_generation_batch_size (`bool`, *optional*, defaults to `False`): Whether the recipe gives its generation
            batch as `generation_batch_size` (every process together) rather than `steps_per_generation`.
    """

    architecture: Architecture
    setup: TrainingSetup
    batch: BatchSettings
    lora_r: int = 16
    penalty: bool = True
    sets_generation_batch_size: bool = False

    @property
    def mode(self) -> str:
        if self.setup.lora_r is None:
            return "full fine-tuning"
        return "QLoRA" if self.setup.load_in_4bit else "LoRA"

    def setup_for(self, mode: str, batch: BatchSettings) -> TrainingSetup:
        """The recipe trained in `mode` (one of `MODES`) with `batch`."""
        if mode == self.mode:
            setup = self.setup
        elif mode == "full fine-tuning":
            setup = dataclasses.replace(
                self.setup, lora_r=None, load_in_4bit=False, double_quant=False, reference=self.penalty
            )
        else:
            lora_r = self.setup.lora_r or self.lora_r
            quantized = mode == "QLoRA"
            setup = dataclasses.replace(
                self.setup, lora_r=lora_r, load_in_4bit=quantized, double_quant=quantized, reference=True
            )
        return batch.apply(setup)

    def estimate(self, mode: str | None = None, batch: BatchSettings | None = None) -> MemoryEstimate:
        return estimate(self.architecture, self.setup_for(mode or self.mode, batch or self.batch))


def recipe_memory(
    script_args,
    training_args,
    model_args,
    num_processes: int = 1,
    zero_stage: int = 0,
    sets_generation_batch_size: bool = False,
) -> RecipeMemory:
    """A recipe as `trl-t2i grpo` parses it (`T2IScriptArguments`, `T2IGRPOConfig`, `ModelConfig`), trained by
    `num_processes` processes with DeepSpeed ZeRO stage `zero_stage` (`0`: none). TRL resolved the generation batch
    for the processes of the parsing one; `sets_generation_batch_size` says the recipe sets `generation_batch_size`,
    which TRL divides among the processes (else each samples `steps_per_generation` micro-batches)."""
    if num_processes < 1:
        raise ValueError(f"`num_processes` must be at least 1, got {num_processes}.")
    if model_args.load_in_8bit:
        raise ValueError("The memory model covers bf16/fp32 and 4-bit (NF4) weights, not `load_in_8bit`.")
    micro_batch = training_args.per_device_train_batch_size
    steps = training_args.steps_per_generation
    if sets_generation_batch_size:
        if training_args.generation_batch_size % (micro_batch * num_processes):
            raise ValueError(
                f"generation_batch_size ({training_args.generation_batch_size}) must be divisible by the global batch "
                f"size ({micro_batch} × {num_processes} processes)."
            )
        steps = training_args.generation_batch_size // (micro_batch * num_processes)
    batch = BatchSettings(
        micro_batch=micro_batch,
        steps_per_generation=steps,
        gradient_accumulation_steps=training_args.gradient_accumulation_steps,
        num_generations=training_args.num_generations,
        num_iterations=training_args.num_iterations,
        num_processes=num_processes,
        whole_groups=training_args.token_selection == "critical",
    )
    if batch.problem():
        raise ValueError(f"TRL would refuse the recipe's batches on {num_processes} processes: {batch.problem()}.")
    guided = training_args.sampling.guided
    setup = TrainingSetup(
        rollout_images=batch.rollout_images,
        micro_batch=micro_batch,
        weight_dtype="bfloat16" if model_args.dtype in ("bfloat16", "auto") else "float32",  # auto: the checkpoint's
        load_in_4bit=model_args.load_in_4bit,
        double_quant=model_args.use_bnb_nested_quant,
        lora_r=model_args.lora_r if model_args.use_peft else None,
        mixed_precision=training_args.bf16,
        guided_sampling=guided,
        guided_scoring=guided and training_args.cfg_logprobs == "guided",
        activation_checkpointing=training_args.activation_checkpointing,
        divergence_estimator=training_args.divergence_estimator,
        reference=model_args.use_peft or training_args.needs_reference,
        num_processes=num_processes,
        zero_stage=zero_stage,
        reward=next((name for name in script_args.reward_funcs if name in REWARD_MODELS), None),
        compiled_rollouts=training_args.compile_rollouts != "false",  # `auto` compiles on a GPU
    )
    return RecipeMemory(
        architecture=architecture_for(model_args.model_name_or_path),
        setup=batch.apply(setup),
        batch=batch,
        lora_r=model_args.lora_r,
        penalty=training_args.needs_reference,
        sets_generation_batch_size=sets_generation_batch_size,
    )


def candidate_batches(batch: BatchSettings) -> list[BatchSettings]:
    """The batch sizes that keep `batch`'s images per optimizer step, that TRL accepts, with rollouts that never span
    two optimizer steps; smallest first."""
    per_process = batch.micro_batch * batch.gradient_accumulation_steps
    candidates = []
    for micro_batch in _divisors(per_process):
        accumulation = per_process // micro_batch
        for steps in _divisors(accumulation):
            candidate = dataclasses.replace(
                batch, micro_batch=micro_batch, steps_per_generation=steps, gradient_accumulation_steps=accumulation
            )
            if candidate.problem() is None:
                candidates.append(candidate)
    return sorted(candidates, key=lambda candidate: (candidate.rollout_images, candidate.micro_batch))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class MemoryPlan:
    """What fits of a recipe on a GPU of `gpu_memory_gb` (see `plan`).

    Args:
        recipe (`RecipeMemory`): The recipe planned.
        gpu_memory_gb (`float`): The memory of each GPU, in GB (10⁹ bytes, the estimate's unit).
        least (`dict[str, MemoryEstimate]`): For each of `MODES`, the batches that need the least memory.
        mode (`str`): The mode the plan trains in: the recipe's when it fits, else the first lighter one that does.
        batch (`BatchSettings`): The planned batches: the largest generation batch that fits, then the largest
            micro-batch with it.
        largest_micro_batch (`BatchSettings`): The batches with the largest micro-batch that fits, with the largest
            generation batch that fits beside it.
    """

    recipe: RecipeMemory
    gpu_memory_gb: float
    least: dict[str, MemoryEstimate]
    mode: str
    batch: BatchSettings
    largest_micro_batch: BatchSettings

    @property
    def estimate(self) -> MemoryEstimate:
        return self.recipe.estimate(self.mode, self.batch)

    def flags(self) -> list[str]:
        """The `trl-t2i grpo` flags that train the recipe as planned (the generation batch in the recipe's own terms:
        `generation_batch_size` or `steps_per_generation`)."""
        batch = self.batch
        flags = ["--per_device_train_batch_size", str(batch.micro_batch)]
        if self.recipe.sets_generation_batch_size:
            flags += ["--generation_batch_size", str(batch.rollout_images * batch.num_processes)]
        else:
            flags += ["--steps_per_generation", str(batch.steps_per_generation)]
        flags += ["--gradient_accumulation_steps", str(batch.gradient_accumulation_steps)]
        if self.mode != self.recipe.mode:  # only ever to a lighter one
            if self.recipe.mode == "full fine-tuning":
                flags += ["--use_peft", "true", "--lora_r", str(self.recipe.lora_r)]
            if self.mode == "QLoRA":
                flags += ["--load_in_4bit", "true", "--use_bnb_nested_quant", "true"]
        return flags

    def report(self) -> str:
        """The plan in words: the recipe's peak, the least each mode needs, the planned batches and their peak."""
        recipe, budget = self.recipe, self.gpu_memory_gb
        batch, planned = self.batch, self.estimate
        written = recipe.estimate()
        processes = recipe.batch.num_processes
        gpus = f"{processes} GPUs of {budget:g} GB each" if processes > 1 else f"one {budget:g} GB GPU"
        lines = [
            f"{_describe(recipe)} on {gpus}.",
            f"As written (micro-batch {recipe.batch.micro_batch}, generation batch {recipe.batch.rollout_images}, "
            f"accumulation {recipe.batch.gradient_accumulation_steps}): peak {_gb(written.peak)} in the "
            f"{written.peak_phase} phase per GPU: "
            + ("fits." if written.peak <= budget * GB else f"does not fit ({_gb(written.peak - budget * GB)} over)."),
            "",
            "Least memory per GPU of each way to train (smallest batches that keep the recipe's optimizer step):",
        ]
        for mode, least in self.least.items():
            fits = "fits" if least.peak <= budget * GB else "does not fit"
            lines.append(
                f"  {mode:<17}{_gb(least.peak):>9}  (micro-batch {least.setup.micro_batch}, generation batch "
                f"{least.setup.rollout_images}): {fits}"
            )
        lines.append(f"Adapters needed: {_adapters_needed(self.least, budget)}.")
        prompts = batch.images_per_step // batch.num_generations
        lines += [
            "",
            f"Largest batches in {self.mode} that keep {batch.images_per_step} images = {prompts} prompts × "
            f"{batch.num_generations} per optimizer step:",
            f"  per_device_train_batch_size  {batch.micro_batch:>4}  (the largest that fits: "
            f"{self.largest_micro_batch.micro_batch})",
            f"  generation batch per GPU     {batch.rollout_images:>4}  images (steps_per_generation "
            f"{batch.steps_per_generation})",
            f"  gradient_accumulation_steps  {batch.gradient_accumulation_steps:>4}",
            f"  peak {_gb(planned.peak)} in the {planned.peak_phase} phase per GPU ({_gb(budget * GB - planned.peak)} "
            "to spare).",
        ]
        return "\n".join(lines)


def plan(recipe: RecipeMemory, gpu_memory_gb: float) -> MemoryPlan:
    """The largest batches of `recipe` that fit in `gpu_memory_gb` per GPU, keeping its images per optimizer step,
    in the recipe's way of training or, when nothing fits that way, the first lighter one (LoRA, then QLoRA)."""
    if not math.isfinite(gpu_memory_gb) or gpu_memory_gb <= 0:
        raise ValueError(f"`gpu_memory_gb` must be a positive number of GB, got {gpu_memory_gb}.")
    budget = gpu_memory_gb * GB
    candidates = candidate_batches(recipe.batch)
    if not candidates:
        raise ValueError(f"The recipe's batches cannot be planned: {recipe.batch.problem()}.")
    estimates = {mode: [(batch, recipe.estimate(mode, batch)) for batch in candidates] for mode in MODES}
    least = {mode: min((e for _, e in pairs), key=lambda e: e.peak) for mode, pairs in estimates.items()}
    lighter = MODES[MODES.index(recipe.mode) :]
    mode = next((mode for mode in lighter if least[mode].peak <= budget), None)
    if mode is None:
        needs = ", ".join(f"{mode} {_gb(least[mode].peak)}" for mode in MODES)
        raise ValueError(
            f"Nothing fits in {gpu_memory_gb:g} GB per GPU. The least this recipe needs per GPU, with its smallest "
            f"batches: {needs}. Use GPUs with more memory, or more of them."
        )
    fitting = [batch for batch, result in estimates[mode] if result.peak <= budget]
    return MemoryPlan(
        recipe=recipe,
        gpu_memory_gb=gpu_memory_gb,
        least=least,
        mode=mode,
        batch=max(fitting, key=lambda batch: (batch.rollout_images, batch.micro_batch)),
        largest_micro_batch=max(fitting, key=lambda batch: (batch.micro_batch, batch.rollout_images)),
    )


def _adapters_needed(least: dict[str, MemoryEstimate], gpu_memory_gb: float) -> str:
    too_large = [mode for mode in MODES if least[mode].peak > gpu_memory_gb * GB]
    if not too_large:
        return "none, full fine-tuning fits"
    fitting = next(mode for mode in MODES if mode not in too_large)
    return f"{fitting} ({' and '.join(too_large)} {'does' if len(too_large) == 1 else 'do'} not fit)"


def _describe(recipe: RecipeMemory) -> str:
    setup = recipe.setup
    training = recipe.mode if setup.lora_r is None else f"{recipe.mode} r={setup.lora_r}"
    zero = f", ZeRO-{setup.zero_stage}" if setup.zero_stage else ""
    return f"{recipe.architecture.name}, {training}{zero}"


def _gb(size: float) -> str:
    return f"{size / GB:.1f} GB"
