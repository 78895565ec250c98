"""Shared fixtures and helpers. Every registered model family has a `FamilyCase`: the family contract tests
(`test_family_contract.py`) run for each, so a new family gets them by adding its case here."""

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from trl_t2i import TINY_JANUS, T2IGRPOConfig, T2IGRPOTrainer
from trl_t2i.cli import grpo
from trl_t2i.models import build_tiny_janus, build_tiny_llamagen, get_family
from trl_t2i.rewards import colour_match
from trl_t2i.sampling import SamplingConfig


PROMPTS = ["a red cat", "a big blue dog on the beach", "sky", "a photo of two green apples"]

DEMO_RECIPE = Path(__file__).parents[1] / "recipes" / "tiny" / "cpu_demo.yaml"
QUICK_FLAGS = [
    "--max_steps",
    "2",
    "--per_device_train_batch_size",
    "8",
    "--num_generations",
    "4",
    "--logging_steps",
    "1",
]
"""Two quick LoRA steps (2 prompts × 4 images) of the tiny demo recipe."""


@dataclass
class FamilyCase:
    """How the contract tests build a tiny model of a family and what they compare its sampler with.

    Attributes:
        build: `seed -> (model, processing_class)`, a tiny random model built locally.
        reference_generate: `(model, family, conditioning, sampling, do_sample) -> image tokens`, an implementation
            of CFG generation that is not ours (Janus: transformers' `generate`).
        language_model_prefix: module-path fragment of the language model, where LoRA and 4-bit layers belong.
    """

    build: Callable
    reference_generate: Callable
    language_model_prefix: str


def _janus_generate(model, family, conditioning, sampling: SamplingConfig, do_sample: bool) -> torch.Tensor:
    return model.generate(
        **conditioning.tensors,
        generation_mode="image",
        guidance_scale=sampling.cfg_scale,
        do_sample=do_sample,
        temperature=sampling.temperature,
        top_k=sampling.top_k,  # generate's own default is 50; ours (and TRL's) 0 = disabled
        top_p=sampling.top_p,
    )


def _llamagen_generate(model, family, conditioning, sampling: SamplingConfig, do_sample: bool) -> torch.Tensor:
    """LlamaGen's generation loop (`autoregressive/models/generate.py`) without a KV cache: the whole sequence is
    recomputed at every step; CFG rows are the captions then the same captions with the null caption; logits
    `u + s·(c − u)`, then transformers' warpers in `generate`'s order, then multinomial (or argmax)."""
    ids, mask = conditioning.tensors["input_ids"], conditioning.tensors["attention_mask"]
    rows = 2 if sampling.guided else 1
    inputs = {
        "input_ids": ids.repeat(rows, 1),
        "attention_mask": mask.repeat(rows, 1),
        "null_caption": torch.arange(rows * len(ids)) >= len(ids),
    }
    warpers = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature)])
    if sampling.top_k:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    tokens = ids.new_zeros(len(ids), 0)
    for _ in range(family.num_image_tokens):
        logits = model(**inputs, image_tokens=tokens.repeat(rows, 1)).logits[:, -1]
        if sampling.guided:
            conditional, unconditional = logits.chunk(2)
            logits = unconditional + (conditional - unconditional) * sampling.cfg_scale
        scores = warpers(tokens, logits)
        token = torch.multinomial(scores.softmax(-1), 1) if do_sample else scores.argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, token], dim=1)
    return tokens


FAMILY_CASES = {
    "janus": FamilyCase(
        build=lambda seed=0: build_tiny_janus(seed=seed),
        reference_generate=_janus_generate,
        language_model_prefix=".language_model.layers.",
    ),
    "llamagen": FamilyCase(
        build=lambda seed=0: build_tiny_llamagen(seed=seed),
        reference_generate=_llamagen_generate,
        language_model_prefix=".transformer.layers.",
    ),
}


@pytest.fixture(autouse=True, scope="session")
def _isolated_tiny_cache(tmp_path_factory):
    """Tiny models resolved by name are built into a per-session temporary cache, never into the user's (also for
    module-scoped fixtures, which run before function-scoped ones)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRL_T2I_CACHE", str(tmp_path_factory.getbasetemp() / "trl_t2i_cache"))
        yield


@pytest.fixture
def no_model_loading(monkeypatch):
    """Bad input must be caught before any model is loaded: loading one fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    for module in ("trl_t2i.trainer", "trl_t2i.models.loading", "trl_t2i.evaluation", "trl_t2i.cli.sample"):
        monkeypatch.setattr(f"{module}.load_model", refuse)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def _built(case: FamilyCase):
    model, processor = case.build()
    model.eval()
    family = get_family(model, processor)
    family.patch_forward(model)
    return model, processor, family


@pytest.fixture
def tiny_janus():
    """A fresh tiny Janus (eval mode, forward patched), its processor and family."""
    return _built(FAMILY_CASES["janus"])


@pytest.fixture(params=sorted(FAMILY_CASES))
def tiny_family(request):
    """For every registered family: a fresh tiny model (eval mode, forward patched), its processor, family and case."""
    case = FAMILY_CASES[request.param]
    return (*_built(case), case)


@pytest.fixture
def prompts():
    return list(PROMPTS)


TRAINING_PROMPTS = ["a red cat", "a blue car", "a green bird", "a yellow hat", "a pink ball", "a white house"]


def make_config(tmp_path, **overrides) -> T2IGRPOConfig:
    """A quick CPU training configuration: 2 LoRA steps of 2 prompts × 4 images, no saving or trackers."""
    settings = {
        "output_dir": str(tmp_path),
        "use_cpu": True,
        "bf16": False,
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_steps": 2,
        "logging_steps": 1,
        "learning_rate": 1e-2,
        "report_to": [],
        "activation_checkpointing": False,
        "save_strategy": "no",
        "disable_tqdm": True,
        "image_log_steps": 0,
        "seed": 0,
    }
    return T2IGRPOConfig(**{**settings, **overrides})


def make_trainer(tmp_path, model=TINY_JANUS, lora=True, reward=colour_match, dataset=None, **overrides):
    """A trainer on the tiny Janus (LoRA unless `lora=False`) with `make_config(tmp_path, **overrides)`."""
    return T2IGRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=make_config(tmp_path, **overrides),
        train_dataset=dataset or Dataset.from_dict({"prompt": TRAINING_PROMPTS}),
        peft_config=LoraConfig(r=4, lora_alpha=8) if lora else None,
    )


def first_batch(trainer):
    """The first training micro-batch, as `compute_loss` receives it (rollouts, rewards, log-probs)."""
    trainer.model.train()
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def loss_with_gradients(trainer, inputs):
    """`_compute_loss` of one micro-batch (no gradient accumulation), its gradients and the trainable parameters."""
    trainer.current_gradient_accumulation_steps = 1
    parameters = [p for p in trainer.model.parameters() if p.requires_grad]
    loss = trainer._compute_loss(trainer.model, inputs)
    return loss, torch.autograd.grad(loss, parameters), parameters


def policy_token_logps(trainer, inputs):
    """The policy's teacher-forced log-probs `(B, N)` of a micro-batch's image tokens, differentiable."""
    ids, mask, tokens = inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"]
    logps = trainer._teacher_forced_logits(trainer.model, ids, mask, tokens).log_softmax(-1)
    return logps.gather(-1, tokens[..., None]).squeeze(-1)


def clone_parameters(model):
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def perturb_adapters(model, std=0.5):
    """Random LoRA B matrices: the policy moves away from the reference (and from the old policy)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, std)


def train_tiny_recipe(output_dir, *flags) -> T2IGRPOTrainer:
    """`trl-t2i grpo` on the tiny demo recipe with `QUICK_FLAGS`, then `flags` (which win), into `output_dir`."""
    argv = ["--config", str(DEMO_RECIPE), *QUICK_FLAGS, "--output_dir", str(output_dir), *flags]
    return grpo.main(*grpo.make_parser().parse_args_and_config(argv))


def make_dry_run(target: str, env: dict[str, str] | None = None) -> str:
    """What `make --dry-run <target>` would run, as printed, with this environment's venv (`-o`: no reinstall).

    Under `make test` the variables of the outer make would turn this into a sub-make that prints "make[1]: Entering
    directory" lines; dropping them keeps the output the recipe's alone."""
    env = {key: value for key, value in (env or os.environ).items() if key not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    venv = Path(sys.prefix)
    command = ["make", "--dry-run", "--no-print-directory", "-o", str(venv / ".installed"), target, f"VENV={venv}"]
    return subprocess.run(
        command, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, check=True
    ).stdout


def load_script(name: str):
    """A module of `scripts/` (not a package), imported from its file."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prompt_limit(family) -> int:
    """The most prompt tokens a tiny model takes, from its config: Janus' context less its image tokens, or T5's
    caption length for LlamaGen."""
    if family.model_type == "janus":
        return family.config.text_config.max_position_embeddings - family.config.vision_config.num_image_tokens
    return family.config.caption_length


def prompt_length(family, caption: str) -> int:
    """A caption's prompt length as the model reads it, untruncated (LlamaGen's T5 reads it lowercased)."""
    if family.model_type == "janus":
        return int(family.tokenize_prompts([caption])[1].sum())
    return len(family.processing_class(caption.lower(), verbose=False)["input_ids"])
