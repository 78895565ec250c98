"""Every use of the private surface of TRL's `GRPOTrainer` and of transformers' `Trainer`, in one place.

`T2IGRPOTrainer` overrides private methods of both and relies on some of their private state. Each such assumption
lives here, as a small function or class, and has a contract test in `tests/test_trl_boundary.py`: an upgrade that
changes one fails loudly there, not as a silently wrong loss. Written against trl 1.16 and transformers 5.24 (pinned
in `pyproject.toml`). Imported as `boundary`, never as `trl`: what it names is private to those packages.

TRL's `GRPOTrainer`:

* `_generate` returns an 8-tuple (`Rollout.to_trl` lays it out), whose `tool_mask` slot masks the loss only;
* `_generate_and_score_completions` returns a batch of tensors under TRL's private key names (`Batch` reads them),
  which TRL splits into micro-batches by rows, tensors added to it included (`set_reference_logps`, the trainer's
  `sampler_correction` weights);
* `_compute_loss` gets the policy's per-token log-probs and entropies from one call of
  `_get_per_token_logps_and_entropies` (`policy_scores_given` answers it with scores computed already), and accepts
  `(B, N)` advantages (`with_advantages`);
* `_metrics[mode][name]` is a list of floats that `log` averages (and clears);
* `_calculate_rewards` returns the rewards of every rank, gathered in rank order, of which TRL keeps this rank's rows
  as `local_rows` does;
* `_logs["completion"]` / `_logs["images"]` feed the completions table when `log_completions=True`;
* `_dist.summon_full_params` gathers FSDP parameters for generation;
* the importance ratio and the per-`loss_type` loss normalisers of `_compute_loss`, reproduced by `importance_ratio`
  and `aggregate_like_trl` so our penalty is weighted and normalised exactly like TRL's own KL term;
* `__init__` reads `args.beta`, `args.sync_ref_model` and `args.model_init_kwargs` to decide about the reference
  model (see `init_settings`).

transformers' `Trainer` (the second section below):

* `_save_checkpoint(model, trial)` writes `checkpoint-N` into the folder `_get_output_dir(trial)` names and pushes
  through `_push_from_checkpoint` only (`checkpoint_saved_into`, `push_checkpoint`: atomic checkpoints);
* every save of the weights, `save_model` and checkpoints alike, goes through `_save(output_dir, state_dict)` (the
  trainer's override refuses non-finite weights and writes `run_settings.json`);
* the training loop calls `_get_grad_norm(model, grad_norm)` once per optimizer step, with the gradients of every
  micro-batch accumulated (and clipped), before `optimizer.step()` (the trainer's override checks there that the step
  is finite, `trl_t2i.nonfinite`).
"""

import contextlib
from dataclasses import dataclass

import torch
from PIL import Image


# ---------------------------------------------------------------------------------------------- TRL's GRPOTrainer


@dataclass
class Rollout:
    """One batch of sampled images, as our `_generate` produces it.

    Attributes:
        prompt_ids: unpadded prompt token ids, one list per image.
        image_tokens: image tokens, one list of `N` per image.
        images: the decoded images, which the reward functions score.
        sampling_logps: log-prob of every image token under the distribution it was sampled from.
        loss_mask: 1 for the image tokens the loss covers, 0 for the others; `None`: all of them.
    """

    prompt_ids: list[list[int]]
    image_tokens: list[list[int]]
    images: list[Image.Image]
    sampling_logps: list[list[float]]
    loss_mask: list[list[int]] | None = None

    def to_trl(self) -> tuple:
        """TRL's `_generate` return: `(prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields,
        images, tool_images)`. TRL's `tool_mask` marks the completion tokens its loss covers (for text: not tool
        output) without changing attention: it carries our `loss_mask`. The `images` slot holds *prompt* images (a
        non-`None` value would run the processor on them), so ours stay in `completions`."""
        return self.prompt_ids, self.image_tokens, self.loss_mask, self.images, self.sampling_logps, {}, None, []


@dataclass(frozen=True)
class Batch:
    """A batch as TRL's `_generate_and_score_completions` returns it and `_compute_loss` reads it a micro-batch at a
    time (a dict of tensors, one row per image, under TRL's private key names), read by name: `Batch.of(inputs)`.

    Attributes:
        prompt_ids, prompt_mask: `(B, P)` left-padded prompt ids (`Rollout.prompt_ids`) and their mask.
        image_tokens: `(B, N)` the sampled image tokens (TRL's completion ids).
        image_mask: `(B, N)` ones: every image token is real (TRL's completion mask; images have no EOS).
        loss_mask: `(B, N)` the tokens TRL's loss covers: the image mask times TRL's tool mask, which carries our
            `Rollout.loss_mask`.
        advantages: `(B,)` TRL's advantages.
        sampling_logps: `(B, N)` the log-probs the sampler recorded (`Rollout.sampling_logps`).
        old_logps: `(B, N)` the policy's teacher-forced log-probs at sampling time, when TRL computes them (the
            policy moves before the batch's last update); `None` otherwise: the policy has not moved since.
        reference_logps: `(B, N)` the reference's log-probs, when the trainer added them (`set_reference_logps`).
        num_items_in_batch: the tokens the loss covers in the whole generation batch, over every process.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    image_tokens: torch.Tensor
    image_mask: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    sampling_logps: torch.Tensor
    old_logps: torch.Tensor | None
    reference_logps: torch.Tensor | None
    num_items_in_batch: torch.Tensor

    @classmethod
    def of(cls, inputs: dict) -> "Batch":
        image_mask = inputs["completion_mask"]
        return cls(
            prompt_ids=inputs["prompt_ids"],
            prompt_mask=inputs["prompt_mask"],
            image_tokens=inputs["completion_ids"],
            image_mask=image_mask,
            loss_mask=image_mask if "tool_mask" not in inputs else image_mask * inputs["tool_mask"],
            advantages=inputs["advantages"],
            sampling_logps=inputs["sampling_per_token_logps"],
            old_logps=inputs.get("old_per_token_logps"),
            reference_logps=inputs.get("ref_per_token_logps"),
            num_items_in_batch=inputs["num_items_in_batch"],
        )


def set_reference_logps(inputs: dict, reference_logps: torch.Tensor) -> None:
    """Add the reference's per-token log-probs `(B, N)` to a generation batch, where TRL's own KL would read them."""
    inputs["ref_per_token_logps"] = reference_logps


def with_advantages(inputs: dict, advantages: torch.Tensor) -> dict:
    """A micro-batch with other advantages for TRL's loss: `(B,)`, or `(B, N)` to weigh each token's term (TRL's
    loss is linear in them). A copy: the buffered batch keeps TRL's, for the next iteration over it."""
    return {**inputs, "advantages": advantages}


@contextlib.contextmanager
def policy_scores_given(trainer, logps: torch.Tensor, entropies: torch.Tensor):
    """Context in which TRL's `_compute_loss` gets these policy log-probs and entropies `(B, N)`, computed already,
    from its one call of `_get_per_token_logps_and_entropies` instead of running the forward again. The trainer's
    own scorer is back in place when the block ends."""

    def given(*args, **kwargs):
        return logps, entropies, None

    trainer._get_per_token_logps_and_entropies = given
    try:
        yield
    finally:
        del trainer._get_per_token_logps_and_entropies


@contextlib.contextmanager
def init_settings(args, *, uses_adapters: bool, own_reference: bool):
    """The `args` that TRL's `__init__` must see, restored afterwards.

    * `model_init_kwargs`: already used to load the model (TRL would warn that it ignores them).
    * `beta`: TRL builds a reference of its own when `beta != 0` and there are no adapters, from
      `config.architectures[0]`, which fails for in-memory models; we attach ours (`own_reference`) and hide `beta`.
      With a model that already has a PEFT adapter, TRL copies it as a frozen "ref" adapter only when `beta != 0`:
      that copy is the reference (the divergences are logged even at β = 0), so TRL sees a non-zero `beta`.
    * `sync_ref_model`: TRL rejects it when `beta == 0`; we attach the callback to our own reference.
    """
    overrides = {"model_init_kwargs": None}
    if own_reference:
        overrides.update(beta=0.0, sync_ref_model=False)
    elif uses_adapters:
        overrides["beta"] = 1.0
    saved = {name: getattr(args, name) for name in overrides}
    for name, value in overrides.items():
        setattr(args, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(args, name, value)


def reference_adapter_name(peft_model) -> str | None:
    """The adapter that holds the reference: TRL's frozen "ref" copy, or `None` (adapters disabled)."""
    return "ref" if "ref" in peft_model.peft_config else None


def mode(trainer) -> str:
    return "train" if trainer.model.training else "eval"


def record_metric(trainer, name: str, value: float, in_mode: str | None = None) -> None:
    """Append to TRL's metric buffer of `in_mode` ("train" or "eval"; default: the current mode): `log` averages it
    and sends it to every tracker."""
    trainer._metrics[in_mode or mode(trainer)][name].append(value)


def recorded_metric(trainer, name: str) -> list[float]:
    """The values of a metric recorded since the last `log` (e.g. one per call of a timed stage)."""
    return list(trainer._metrics[mode(trainer)].get(name, []))


def set_metric(trainer, name: str, value: float) -> None:
    """Replace a metric's buffer with one value (a running total such as `num_tokens`, as TRL sets it)."""
    trainer._metrics[mode(trainer)][name] = [value]


def gathered_parameters(trainer):
    """Context in which FSDP's sharded parameters are gathered for generation (a no-op elsewhere)."""
    return trainer._dist.summon_full_params(trainer.model_wrapped, recurse=False)


def local_rows(trainer, gathered: torch.Tensor, num_local: int) -> torch.Tensor:
    """This rank's rows of a tensor that `_calculate_rewards` gathered from every rank (in rank order)."""
    start = trainer.accelerator.process_index * num_local
    return gathered[start : start + num_local]


def global_masked_mean(trainer, values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of `values` over the masked tokens of every rank, as TRL's `_compute_loss` logs its metrics."""
    totals = trainer.accelerator.reduce(
        torch.stack([(values.detach() * mask).sum(), mask.sum().float()]), reduction="sum"
    )
    return (totals[0] / totals[1].clamp(min=1.0)).item()


def global_masked_max(trainer, values: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest masked value over every rank (0 when nothing is masked in)."""
    local = torch.where(mask.bool(), values.detach(), -torch.inf).max()
    largest = trainer.accelerator.gather(local[None]).max()
    return largest.item() if largest > -torch.inf else 0.0


def global_masked_min(trainer, values: torch.Tensor, mask: torch.Tensor) -> float:
    """Smallest masked value over every rank (0 when nothing is masked in)."""
    return -global_masked_max(trainer, -values, mask)


def importance_ratio(trainer, logps: torch.Tensor, old_logps: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """π/π_old at TRL's `importance_sampling_level`, differentiable through π: TRL's `coef_1` for
    `old_logps=inputs.get("old_per_token_logps")` (`None`: the policy has not moved since sampling)."""
    log_ratio = logps - (logps.detach() if old_logps is None else old_logps)
    if trainer.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    return torch.exp(log_ratio)


def aggregate_like_trl(trainer, per_token: torch.Tensor, mask: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Reduce a per-token term exactly as TRL's `_compute_loss` reduces its per-token loss for `loss_type`."""
    train = trainer.model.training
    accumulation = trainer.current_gradient_accumulation_steps if train else 1.0
    masked = per_token * mask
    loss_type = trainer.loss_type
    if loss_type in ("grpo", "sapo"):
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
    if loss_type == "dr_grpo":
        return masked.sum() / (per_token.size(0) * trainer.max_completion_length) / accumulation
    if loss_type in ("cispo", "dapo", "vespo"):
        normalizer = batch.num_items_in_batch.clamp(min=1.0) / trainer.accelerator.num_processes
        if train:
            normalizer = normalizer * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
        return masked.sum() / normalizer
    if loss_type == "luspo":
        return masked.sum(-1).mean() / accumulation
    raise ValueError(f"Unknown loss type: {loss_type}")


def completions_as_images(trainer) -> None:
    """Before TRL's `log`: its completions table holds text, so move our PIL completions to its image column and
    leave a placeholder caption in their place."""
    completions = trainer._logs["completion"]
    if trainer.log_completions and completions and isinstance(completions[0], Image.Image):
        trainer._logs["images"].clear()
        trainer._logs["images"].extend([image] for image in completions)
        placeholders = [f"<image {image.width}x{image.height}>" for image in completions]
        completions.clear()
        completions.extend(placeholders)


# ---------------------------------------------------------------------------------------------- transformers' Trainer


@contextlib.contextmanager
def checkpoint_saved_into(trainer, run_dir: str):
    """Context in which transformers' `_save_checkpoint` writes its `checkpoint-N` into `run_dir` (it finds the run's
    folder through `_get_output_dir`) and pushes nothing (it pushes through `_push_from_checkpoint`)."""
    trainer._get_output_dir = lambda trial=None: run_dir
    trainer._push_from_checkpoint = lambda folder: None
    try:
        yield
    finally:
        del trainer._get_output_dir, trainer._push_from_checkpoint


def run_dir(trainer, trial=None) -> str:
    """The folder of a run's checkpoints (`output_dir`, or a trial's folder in it in a hyperparameter search)."""
    return trainer._get_output_dir(trial)


def push_checkpoint(trainer, checkpoint: str) -> None:
    """Push a checkpoint as `_save_checkpoint` does when `push_to_hub` is set (following `hub_strategy`)."""
    trainer._push_from_checkpoint(checkpoint)
