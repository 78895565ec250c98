import contextlib
import copy
import math
import shutil
from pathlib import Path

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from peft import LoraConfig, PeftConfig
from PIL import Image
from transformers import BitsAndBytesConfig, PreTrainedModel, TrainerCallback
from trl import GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp, unwrap_model_for_generation
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import disable_dropout_in_model, use_adapter

from . import hub
from .config import T2IGRPOConfig
from .divergences import get_divergence
from .images import make_grid, to_pil
from .metrics import position_entropy
from .models import disable_bnb_cpu_repack, get_adapter, load_model, load_processor, unwrap_model
from .sampling import image_token_logprobs, sample_image_tokens


METRIC_DIVERGENCES = ("reverse_kl", "forward_kl", "js")
"""Divergences logged at every step whatever is optimised."""


class T2IGRPOTrainer(GRPOTrainer):
    """GRPO for autoregressive text-to-image models, with an f-divergence penalty towards the reference model.

    Example:

    ```python
    from datasets import Dataset
    from peft import LoraConfig

    from trl_t2i import T2IGRPOConfig, T2IGRPOTrainer
    from trl_t2i.rewards import prompt_colour_match

    dataset = Dataset.from_dict({"prompt": ["a red cat", "a blue car", "a green bird", "a yellow hat"]})
    trainer = T2IGRPOTrainer(
        model="trl-t2i/tiny-janus",  # or "deepseek-community/Janus-Pro-7B"
        reward_funcs=prompt_colour_match,
        args=T2IGRPOConfig(output_dir="tiny-grpo-js", divergence="js", beta=0.04, use_cpu=True),
        train_dataset=dataset,
        peft_config=LoraConfig(r=8, lora_alpha=16),  # LoRA targets default to the language-model linears
    )
    trainer.train()
    ```

    The subclass overrides four parts of TRL's `GRPOTrainer` and reuses the rest (grouping, buffering, old and
    reference log-probs, rewards, advantages, every `loss_type`, clipping, checkpointing):

    * `_generate`: KV-cached classifier-free-guidance sampling of image tokens, VQ decoding, PIL images to the
      reward functions;
    * `_get_per_token_logps_and_entropies`: teacher-forced image-token log-probs through the (wrapped) model's
      forward — TRL's own scorer would run image ids through the text head;
    * `_compute_loss`: TRL's loss with its k3 KL switched off, plus `beta · D` with TRL's normalisation;
    * `log`: images in `log_completions`, and the divergence metrics.

    Args:
        model (`str` or `PreTrainedModel`):
            Hub id or local path of a supported text-to-image model (loaded with `args.model_init_kwargs` and
            `quantization_config`), or an instantiated model. `"trl-t2i/tiny-janus"` is built locally.
        reward_funcs (callable or list of callables):
            Reward functions `f(prompts, completions, **kwargs) -> list[float | None]`, where `completions` are PIL
            images and `prompts` the raw captions. Each gets the other dataset columns as keyword arguments.
        args (`T2IGRPOConfig`, *optional*):
            Training configuration. Defaults to `T2IGRPOConfig(f"{model_name}-T2I-GRPO")`.
        train_dataset, eval_dataset (`Dataset`, *optional*):
            Prompt datasets with a `prompt` column of captions (strings).
        processing_class (`ProcessorMixin`, *optional*):
            The model's processor; loaded from `model` when omitted.
        callbacks, optimizers:
            As in `transformers.Trainer`.
        quantization_config (`BitsAndBytesConfig`, *optional*):
            4-bit/8-bit loading of a `model` given by name (QLoRA). The model family's unquantized modules (image
            head, aligners, vision tower, VQ model) are added to its skip list.
        peft_config (`PeftConfig`, *optional*):
            LoRA configuration. With adapters, the reference is the same model with adapters disabled (no copy in
            memory). A `LoraConfig` without `target_modules` gets the family's language-model linears.
    """

    _tag_names = ["trl", "grpo", "trl-t2i", "text-to-image"]

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs,
        args: T2IGRPOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | None = None,
        processing_class=None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers=(None, None),
        quantization_config: BitsAndBytesConfig | None = None,
        peft_config: PeftConfig | None = None,
    ):
        model_id = model if isinstance(model, str) else unwrap_model(model).config._name_or_path
        self._base_model_id = model_id
        if args is None:
            args = T2IGRPOConfig(f"{(model_id or 'model').rstrip('/').split('/')[-1]}-T2I-GRPO")
        if not isinstance(args, T2IGRPOConfig):
            raise TypeError(f"`args` must be a T2IGRPOConfig, got {type(args).__name__}.")
        reward_funcs = _check_reward_funcs(reward_funcs)
        for dataset in (train_dataset, eval_dataset):
            _check_prompt_dataset(dataset)

        model_init_kwargs = self._model_init_kwargs(args, quantization_config) if isinstance(model, str) else None
        if isinstance(model, str):
            model = load_model(model, **model_init_kwargs)
        disable_bnb_cpu_repack(model)
        if processing_class is None and not model_id:
            raise ValueError("The model was built in memory (no checkpoint path): pass its `processing_class` too.")
        processing_class = processing_class or load_processor(model_id, padding_side="left")
        self.adapter = get_adapter(model, processing_class)
        args.max_completion_length = self.adapter.num_image_tokens
        peft_config = self._with_default_lora_targets(peft_config)
        self.divergence = get_divergence(args.divergence, alpha=args.divergence_alpha)
        self.metric_divergences = {name: get_divergence(name) for name in METRIC_DIVERGENCES}

        uses_adapters = peft_config is not None or is_peft_model(model)
        wants_penalty = args.beta > 0 or (args.beta_end or 0) > 0
        reference = None if uses_adapters or not wants_penalty else self._build_reference(model, model_init_kwargs)
        # TRL would rebuild the reference from `config.architectures[0]`, which fails for in-memory models; ours is
        # attached below. TRL's `self.beta` keeps its meaning "compute reference log-probs" (the penalty coefficient
        # is `current_beta()`): with adapters the reference is free, so the divergences are always logged.
        hidden = {"model_init_kwargs": None}  # already used above; TRL would warn that they are ignored
        if reference is not None:  # keep TRL from building (and syncing) a reference of its own
            hidden.update(beta=0.0, sync_ref_model=False)
        with _temporarily(args, **hidden):
            super().__init__(
                model=model,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                callbacks=callbacks,
                optimizers=optimizers,
                peft_config=peft_config,
            )
        self.beta = 1.0 if uses_adapters or wants_penalty else 0.0
        if reference is not None:
            self.ref_model = self._prepare_reference(reference)
            if args.sync_ref_model:
                self.add_callback(SyncRefModelCallback(ref_model=self.ref_model, accelerator=self.accelerator))
        self.adapter.patch_forward(self.model)
        self._stash_policy_logprobs = False
        self._policy_logprobs = None
        self._last_image_log_step = None

    # ------------------------------------------------------------------ set-up

    @staticmethod
    def _model_init_kwargs(args: T2IGRPOConfig, quantization_config) -> dict:
        """`from_pretrained` kwargs for a model given by name, as TRL builds them."""
        model_init_kwargs = dict(args.model_init_kwargs or {})
        if quantization_config is not None:
            model_init_kwargs["quantization_config"] = quantization_config
        # Distributed training places each rank's copy itself ("auto" device maps fail)
        if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED", "FSDP"]:
            model_init_kwargs["device_map"] = None
        model_init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        return model_init_kwargs

    def _with_default_lora_targets(self, peft_config: PeftConfig | None) -> PeftConfig | None:
        if isinstance(peft_config, LoraConfig) and not peft_config.target_modules:
            peft_config = copy.deepcopy(peft_config)
            peft_config.target_modules = self.adapter.lora_target_modules
        return peft_config

    def _build_reference(self, model: PreTrainedModel, model_init_kwargs: dict | None) -> PreTrainedModel:
        """A frozen copy of the policy at its initial weights (full fine-tuning): loaded again when the policy was
        given by name (so DeepSpeed ZeRO-3 partitions it at load, as it did the policy), else a deep copy."""
        if model_init_kwargs is not None:
            reference = load_model(self._base_model_id, **model_init_kwargs)
        else:
            reference = copy.deepcopy(unwrap_model(model))
        return reference.eval().requires_grad_(False)

    def _prepare_reference(self, reference: PreTrainedModel) -> torch.nn.Module:
        if self.args.disable_dropout:
            disable_dropout_in_model(reference)
        self.adapter.patch_forward(reference)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(reference, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(reference, self.accelerator)
        return self.accelerator.prepare_model(reference, evaluation_mode=True)

    # ------------------------------------------------------------------ generation

    def _generate(self, prompts: list):
        # Image tokens come from our CFG sampler, not `model.generate` (text mode for Janus).
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        input_ids, attention_mask = self.adapter.prepare_prompts([_caption(prompt) for prompt in prompts])
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
            self.accelerator.autocast(),  # the same numerics as the scoring forward
        ):
            sample = sample_image_tokens(
                self.adapter, unwrapped_model, input_ids, attention_mask, **self._distribution_kwargs
            )
            images = to_pil(self.adapter.decode(unwrap_model(unwrapped_model), sample.image_tokens))

        prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)]
        if mode == "train":
            self.state.num_input_tokens_seen += self.accelerator.gather(attention_mask.sum()).sum().item()
        self._metrics[mode]["num_tokens"] = [self.state.num_input_tokens_seen]
        return prompt_ids, sample.image_tokens.tolist(), None, images, sample.logprobs.tolist(), {}, None, []

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self._maybe_log_image_grid()
        return output

    # ------------------------------------------------------------------ scoring

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal_kwargs,
    ):
        # TRL's scorer would embed image ids with the text embedding and score them with the text head.
        batch_size = batch_size or input_ids.size(0)
        all_logps, all_entropies, all_full = [], [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            full = self._image_logprobs(
                model, ids[:, :-logits_to_keep], mask[:, :-logits_to_keep], ids[:, -logits_to_keep:]
            )
            all_logps.append(full.gather(-1, ids[:, -logits_to_keep:, None]).squeeze(-1))
            if compute_entropy:
                all_entropies.append(position_entropy(full))
            if self._stash_policy_logprobs:
                all_full.append(full)
        if self._stash_policy_logprobs:  # the policy forward of `_compute_loss`: keep the full distributions
            self._policy_logprobs = torch.cat(all_full)
        entropies = torch.cat(all_entropies) if compute_entropy else None
        return torch.cat(all_logps), entropies, None

    def _image_logprobs(self, model, prompt_ids, prompt_mask, image_tokens) -> torch.Tensor:
        with self.accelerator.autocast():
            return image_token_logprobs(
                self.adapter,
                model,
                prompt_ids,
                prompt_mask,
                image_tokens,
                cfg_logprobs=self.args.cfg_logprobs,
                **self._distribution_kwargs,
            )

    @property
    def _distribution_kwargs(self) -> dict:
        """The guidance and warping that define the sampled distribution, shared by sampling and scoring."""
        args = self.args
        return {"cfg_scale": args.cfg_scale, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}

    @torch.no_grad()
    def _reference_logprobs(self, inputs) -> torch.Tensor:
        """Full reference distributions `(B, N, V)` for one micro-batch, recomputed rather than stored."""
        if self.ref_model is not None:
            model, context = self.ref_model, contextlib.nullcontext()
        else:
            peft_model = self.accelerator.unwrap_model(self.model)
            model = self.model
            context = use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None)
        with context, disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            return self._image_logprobs(model, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"])

    # ------------------------------------------------------------------ loss

    def current_beta(self) -> float:
        """The penalty coefficient at the current optimizer step, following `beta_schedule`."""
        args = self.args
        if args.beta_schedule == "constant":
            return args.beta
        progress = min(self.state.global_step / max(self.state.max_steps, 1), 1.0)
        if args.beta_schedule == "linear":
            return args.beta + (args.beta_end - args.beta) * progress
        return args.beta_end + (args.beta - args.beta_end) * 0.5 * (1 + math.cos(math.pi * progress))

    def _compute_loss(self, model, inputs):
        # TRL's loss (clipping, importance sampling, loss_type) with its own k3 KL switched off; ours added below.
        reference_wanted, self.beta = self.beta, 0.0
        self._stash_policy_logprobs = True
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self.beta, self._stash_policy_logprobs = reference_wanted, False
        policy_full, self._policy_logprobs = self._policy_logprobs, None
        if not reference_wanted:
            return loss

        mask = inputs["completion_mask"]
        completion_ids = inputs["completion_ids"]
        policy_logps = policy_full.gather(-1, completion_ids[..., None]).squeeze(-1)
        exact = self.args.divergence_estimator == "exact"
        reference_full = self._reference_logprobs(inputs) if exact else None
        if exact:
            per_token = self.divergence.exact(policy_full, reference_full)
        else:
            per_token = self.divergence.sampled(policy_logps, inputs["ref_per_token_logps"])
            if self.args.use_bias_correction_kl:  # makes the expected gradient that of the divergence
                per_token = per_token * self._importance_ratio(policy_logps, inputs, mask)

        beta = self.current_beta()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["beta"].append(beta)
        self._metrics[mode][f"divergence/{self.args.divergence}_penalty"].append(self._global_mean(per_token, mask))
        self._log_divergences(mode, mask, policy_full, reference_full, policy_logps, inputs.get("ref_per_token_logps"))
        if beta == 0.0:
            return loss
        return loss + beta * self._aggregate(per_token, mask, inputs)

    def _importance_ratio(self, policy_logps, inputs, mask) -> torch.Tensor:
        """π/π_old at TRL's `importance_sampling_level`, differentiable through π (as TRL's `coef_1`)."""
        old = inputs.get("old_per_token_logps")
        log_ratio = policy_logps - (policy_logps.detach() if old is None else old)
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        return torch.exp(log_ratio)

    def _aggregate(self, per_token, mask, inputs) -> torch.Tensor:
        """Reduce a per-token term exactly as TRL reduces its per-token loss for `self.loss_type`."""
        train = self.model.training
        accumulation = self.current_gradient_accumulation_steps if train else 1.0
        masked = per_token * mask
        if self.loss_type in ("grpo", "sapo"):
            return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if self.loss_type == "bnpo":
            return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
        if self.loss_type == "dr_grpo":
            return masked.sum() / (per_token.size(0) * self.max_completion_length) / accumulation
        if self.loss_type in ("cispo", "dapo", "vespo"):
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if train:
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return masked.sum() / normalizer
        if self.loss_type == "luspo":
            return masked.sum(-1).mean() / accumulation
        raise ValueError(f"Unknown loss type: {self.loss_type}")

    # ------------------------------------------------------------------ logging

    def _global_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        totals = self.accelerator.reduce(
            torch.stack([(values.detach() * mask).sum(), mask.sum().float()]), reduction="sum"
        )
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _log_divergences(self, mode, mask, policy_full, reference_full, policy_logps, reference_logps):
        """Reverse KL, forward KL and JS to the reference: exact when the full distributions are at hand."""
        exact = reference_full is not None
        with torch.no_grad():
            for name, divergence in self.metric_divergences.items():
                if exact:
                    value = divergence.exact(policy_full, reference_full)
                else:
                    value = divergence.sampled(policy_logps, reference_logps)
                self._metrics[mode][f"divergence/{name}"].append(self._global_mean(value, mask))
        self._metrics[mode]["divergence/exact"].append(float(exact))

    def _maybe_log_image_grid(self):
        step, every = self.state.global_step, self.args.image_log_steps
        if not self.model.training or not every or step % every or step == self._last_image_log_step:
            return
        self._last_image_log_step = step
        if not self.accelerator.is_main_process:
            return
        count = self.args.image_log_count
        images = list(self._logs["completion"])[-count:]
        prompts = list(self._logs["prompt"])[-count:]
        rewards = {name: list(values)[-count:] for name, values in self._logs["rewards"].items()}
        captions = [
            f"{prompt}\n" + " ".join(f"{name}={values[i]:.3f}" for name, values in rewards.items())
            for i, prompt in enumerate(prompts)
        ]
        grid = make_grid(images, captions, columns=min(self.num_generations, 8))
        path = Path(self.args.output_dir) / "samples" / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        self._send_image_to_trackers("samples", grid, step)

    def _send_image_to_trackers(self, tag: str, image: Image.Image, step: int):
        report_to = self.args.report_to or []
        for callback in self.callback_handler.callbacks:
            writer = getattr(callback, "tb_writer", None)
            if "tensorboard" in report_to and writer is not None:
                import numpy as np

                writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
        if "wandb" in report_to:
            import wandb

            if wandb.run is not None:
                wandb.log({tag: wandb.Image(image)}, commit=False)
        if "trackio" in report_to:
            import trackio

            trackio.log({tag: trackio.Image(image)})

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # TRL writes completions to parquet/tables as text: give it captions and move the images to its image column.
        completions = self._logs["completion"]
        if self.log_completions and completions and isinstance(completions[0], Image.Image):
            self._logs["images"].clear()
            self._logs["images"].extend([image] for image in completions)
            placeholders = [f"<image {image.width}x{image.height}>" for image in completions]
            completions.clear()
            completions.extend(placeholders)
        super().log(logs, start_time)

    # ------------------------------------------------------------------ saving and sharing

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        # Our card: the divergence settings, rewards, final metrics, the command line and a trl_t2i usage snippet.
        if not self.is_world_process_zero():
            return
        output_dir = Path(self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        grids = sorted((output_dir / "samples").glob("step_*.png"))
        if grids:
            shutil.copyfile(grids[-1], output_dir / hub.SAMPLE_GRID)
        final = {}
        for entry in self.state.log_history:
            final.update({k: v for k, v in entry.items() if k.startswith(("reward", "divergence/", "entropy"))})
        card = hub.model_card(
            base_model=self._base_model_id,
            args=self.args,
            reward_names=list(self.reward_func_names),
            is_adapter=is_peft_model(self.model),
            metrics=final,
            dataset_name=dataset_name,
            hub_model_id=self.args.hub_model_id,
            has_sample_grid=bool(grids),
        )
        (output_dir / "README.md").write_text(card)

    def push_to_hub(
        self, commit_message: str = "End of training", blocking: bool = True, token=None, revision=None, **kwargs
    ):
        # Upload the adapter (never the base weights), processor files, card and sample grid in one commit.
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(dataset_name=kwargs.get("dataset_name"))
        return hub.push_output(
            self.args.output_dir,
            self.args.hub_model_id or Path(self.args.output_dir).name,
            token=token or self.args.hub_token,
            private=self.args.hub_private_repo,
            revision=revision or self.args.hub_revision,
            commit_message=commit_message,
        )


def _caption(prompt) -> str:
    if not isinstance(prompt, str):
        raise ValueError(
            f"T2IGRPOTrainer expects plain-text captions in the `prompt` column, got {type(prompt).__name__}: "
            f"{prompt!r:.80}. The chat template is applied by the trainer."
        )
    return prompt


def _check_prompt_dataset(dataset) -> None:
    if dataset is None or isinstance(dataset, dict):
        for split in (dataset or {}).values():
            _check_prompt_dataset(split)
        return
    columns = dataset.column_names or []
    if "prompt" not in columns:
        raise ValueError(
            f"The prompt dataset needs a `prompt` column of captions; its columns are {columns}. Rename the caption "
            "column, e.g. `dataset.rename_column('caption', 'prompt')`."
        )


def _check_reward_funcs(reward_funcs) -> list:
    reward_funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
    if not reward_funcs:
        raise ValueError("T2IGRPOTrainer needs at least one reward function.")
    for reward_func in reward_funcs:
        if isinstance(reward_func, (str, torch.nn.Module)) or not callable(reward_func):
            raise TypeError(
                f"Reward functions must be callables f(prompts, completions, **kwargs) -> list[float] that score PIL "
                f"images, got {reward_func!r:.80}. TRL's text reward models and model ids do not apply to images."
            )
    return reward_funcs


@contextlib.contextmanager
def _temporarily(args, **overrides):
    """Set attributes of `args` for the duration of the block (the parent's `__init__` reads them)."""
    saved = {name: getattr(args, name) for name in overrides}
    for name, value in overrides.items():
        setattr(args, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(args, name, value)
