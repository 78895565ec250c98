import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from peft import LoraConfig, PeftConfig
from PIL import Image
from transformers import BitsAndBytesConfig, PreTrainedModel, TrainerCallback
from transformers.utils import logging
from trl import GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp, unwrap_model_for_generation
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import disable_dropout_in_model, use_adapter

from . import checkpoints, hub
from . import trl_boundary as boundary
from .beta_schedule import BetaSchedule
from .config import T2IGRPOConfig
from .data import fit_prompts
from .decoding import resolve_compile, sample_image_tokens, static_decoder
from .divergences import MAX_LOG_RATIO, get_divergence, with_prefix_term
from .gcpo import critical_token_mask, dynamic_advantage_weight
from .image_logging import ImageGridCallback
from .images import save_whole, to_pil
from .merged_adapters import folded_bytes, merged_adapters, why_not_mergeable
from .models import (
    disable_bnb_cpu_repack,
    family_class,
    get_family,
    load_config,
    load_model,
    load_processor,
    unwrap_model,
)
from .nonfinite import NonFiniteGuard, NonFiniteTrainingError, check_weights
from .overoptimization import HeldOutScores
from .reward_scoring import RewardScoring
from .run_settings import RunSettings, check_resume
from .sampling import (
    MIN_LOGP,
    gather_logps,
    position_entropy,
    teacher_forced_logits,
    truncate_logits,
    truncates,
)
from .sharding import check_sharding
from .stage_times import StageTimes


logger = logging.get_logger(__name__)

METRIC_DIVERGENCES = ("reverse_kl", "forward_kl", "js")
"""Divergences logged at every step whatever is optimised."""

SAMPLER_WEIGHTS = "sampler_importance_weights"
"""Our key in TRL's buffered batch: the `sampler_correction` weights, `(B, N)` or `(B, 1)`."""


@dataclass
class PolicyScores:
    """Teacher-forced scores of a batch's image tokens under a model, from one forward (`T2IGRPOTrainer._score`).

    Attributes:
        logps: `(B, N)` per-token log-probs of the sampled (possibly truncated) distribution, floored at `MIN_LOGP`
            outside its support: what TRL's loss uses. Differentiable when scored with gradient.
        entropies: `(B, N)` the entropy of that distribution at every position (TRL's loss logs it), when asked for.
        untruncated_logps: the same tokens' log-probs before top-k/top-p, which the penalty uses, when asked for.
        untruncated_table: the `(B, N, V)` log-probs before top-k/top-p (the exact estimator), when asked for.
    """

    logps: torch.Tensor
    entropies: torch.Tensor | None = None
    untruncated_logps: torch.Tensor | None = None
    untruncated_table: torch.Tensor | None = None


class T2IGRPOTrainer(GRPOTrainer):
    """GRPO for autoregressive text-to-image models, with an f-divergence penalty towards the reference model.

    Example:

    ```python
    from datasets import Dataset
    from peft import LoraConfig

    from trl_t2i import T2IGRPOConfig, T2IGRPOTrainer
    from trl_t2i.rewards import colour_match

    dataset = Dataset.from_dict({"prompt": ["a red cat", "a blue car", "a green bird", "a yellow hat"]})
    trainer = T2IGRPOTrainer(
        model="tiny:janus",  # or "deepseek-community/Janus-Pro-7B"
        reward_funcs=colour_match,
        args=T2IGRPOConfig(output_dir="tiny-grpo-js", divergence="js", beta=0.04, use_cpu=True),
        train_dataset=dataset,
        peft_config=LoraConfig(r=8, lora_alpha=16),  # LoRA targets default to the language-model linears
    )
    trainer.train()
    ```

    The subclass overrides these parts of TRL's `GRPOTrainer` and reuses the rest (grouping, buffering, old
    log-probs, rewards, advantages, every `loss_type`, clipping, checkpointing):

    * `_generate`: KV-cached classifier-free-guidance sampling of image tokens, VQ decoding, PIL images to the
      reward functions;
    * `_calculate_rewards`: TRL's, plus the images and rewards kept for the logged image grids, and at evaluation
      the watched rewards and the diversity (`trl_t2i.overoptimization`);
    * `_generate_and_score_completions`: TRL's, plus the per-token reference log-probs when the sampled estimator
      needs them (TRL's own KL, and so its reference pass, is always off: `self.beta == 0`);
    * `_get_per_token_logps_and_entropies`: teacher-forced image-token log-probs through the (wrapped) model's
      forward — TRL's own scorer would run image ids through the text head;
    * `_compute_loss`: the policy forward, the advantages' weights (`sampler_correction`, `dynamic_advantage`), TRL's
      loss over those scores, plus `current_beta() · D` normalised like TRL's loss;
    * `log`: images in `log_completions`; the over-optimisation alarm when an evaluation closes;
    * `_get_grad_norm`: a step whose loss or gradient is not finite stops the run (or is skipped) before the update;
    * `train`: resuming compares the checkpoint's `run_settings.json` with the run's settings;
    * `_save_checkpoint` / `_save`: atomic checkpoints, never non-finite weights, and `run_settings.json` at every
      save.

    Every use of TRL's and transformers' private surface goes through `trl_t2i.trl_boundary`.

    Args:
        model (`str` or `PreTrainedModel`):
            Hub id or local path of a supported text-to-image model (Janus, or LlamaGen converted with
            `trl-t2i convert_llamagen`; loaded with `args.model_init_kwargs` and `quantization_config`), or an
            instantiated model. `"tiny:janus"` and `"tiny:llamagen"` are built locally.
        reward_funcs (callable or list of callables):
            Reward functions `f(prompts, completions, **kwargs) -> list[float | None]`, where `completions` are PIL
            images and `prompts` the raw captions. Each gets the other dataset columns as keyword arguments.
        eval_reward_funcs (callable or list of callables, *optional*):
            Rewards that are only watched, never trained on: at every evaluation (`eval_strategy`, `eval_steps`,
            `eval_dataset`: held-out prompts) they score the sampled images, logged as `eval_rewards/<name>/mean`,
            next to the images' diversity (`eval_diversity/pairwise_distance`); the over-optimisation alarm
            (`overoptimization_window`, `overoptimization_threshold`) watches them. See `trl_t2i.overoptimization`.
        args (`T2IGRPOConfig`, *optional*):
            Training configuration. Defaults to `T2IGRPOConfig(f"{model_name}-T2I-GRPO")`.
        train_dataset, eval_dataset (`Dataset`, *optional*):
            Prompt datasets with a `prompt` column of captions (strings).
        processing_class (`ProcessorMixin`, *optional*):
            The model's processor (Janus) or caption tokenizer (LlamaGen); loaded from `model` when omitted.
        callbacks, optimizers:
            As in `transformers.Trainer`.
        quantization_config (`BitsAndBytesConfig`, *optional*):
            4-bit/8-bit loading of a `model` given by name (QLoRA). The model family's unquantized modules (image
            head, aligners, vision tower, caption encoder, VQ model) are added to its skip list.
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
        eval_reward_funcs=None,
    ):
        model_id = model if isinstance(model, str) else unwrap_model(model).config._name_or_path
        self._base_model_id = model_id
        if args is None:
            args = T2IGRPOConfig(f"{(model_id or 'model').rstrip('/').split('/')[-1].replace(':', '-')}-T2I-GRPO")
        if not isinstance(args, T2IGRPOConfig):
            raise TypeError(f"`args` must be a T2IGRPOConfig, got {type(args).__name__}.")
        check_sharding(args)  # before any model is loaded
        reward_funcs = _check_reward_funcs(reward_funcs)
        eval_reward_funcs = _check_eval_reward_funcs(eval_reward_funcs, reward_funcs, args)
        for dataset in (train_dataset, eval_dataset):
            _check_prompt_dataset(dataset)
        if processing_class is None and not model_id:
            raise ValueError("The model was built in memory (no checkpoint path): pass its `processing_class` too.")
        processing_class = processing_class or load_processor(model_id, padding_side="left")
        # Every caption must fit the model: checked with its config and processor, before its weights load.
        config = load_config(model, args.trust_remote_code) if isinstance(model, str) else unwrap_model(model).config
        prompt_family = get_family(config, processing_class)
        train_dataset = _fit_prompts(train_dataset, prompt_family, args, "train")
        eval_dataset = _fit_prompts(eval_dataset, prompt_family, args, "eval")

        model_init_kwargs = self._model_init_kwargs(args, quantization_config) if isinstance(model, str) else None
        if isinstance(model, str):
            model = load_model(model, **model_init_kwargs)
        disable_bnb_cpu_repack(model)
        if args.distributed_state.distributed_type != "FSDP":  # FSDP flattens parameters of one dtype
            family_class(unwrap_model(model).config).upcast_image_head(model)
        self.family = get_family(model, processing_class)
        _set_completion_length(args, self.family.num_image_tokens)
        peft_config = self._prepare_lora_config(peft_config, model)
        self.divergence = get_divergence(args.divergence, alpha=args.divergence_alpha)
        self.metric_divergences = {name: get_divergence(name) for name in METRIC_DIVERGENCES}

        # The reference: with adapters, the same model with its adapters disabled (free, so it is always there and
        # the divergences are logged even at β = 0); without, a frozen copy of the initial model, only for a penalty.
        uses_adapters = peft_config is not None or is_peft_model(model)
        self.has_reference = uses_adapters or args.needs_reference
        reference = None
        if self.has_reference and not uses_adapters:
            reference = self._build_reference(model, model_init_kwargs)
        with boundary.init_settings(args, uses_adapters=uses_adapters, own_reference=reference is not None):
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
        # `self.beta` is the coefficient of TRL's own k3 KL, which stays off: TRL then computes no reference
        # log-probs either. Our penalty is `current_beta() · D`, added in `_compute_loss`, and
        # `_generate_and_score_completions` adds the reference log-probs that the sampled estimator needs.
        self.beta = 0.0
        if reference is not None:
            self.ref_model = self._prepare_reference(reference)
            if args.sync_ref_model:
                self.add_callback(SyncRefModelCallback(ref_model=self.ref_model, accelerator=self.accelerator))
        self.family.patch_forward(self.model)
        self.compile_rollouts = resolve_compile(
            args.compile_rollouts, self.family, args.device, "compile_rollouts", self._gathers_weights_for_rollouts()
        )
        self.image_grids = ImageGridCallback(
            every=args.image_log_steps,
            count=args.image_log_count,
            columns=min(self.num_generations, 8),
            output_dir=args.output_dir,
            report_to=args.report_to,
            callback_handler=self.callback_handler,
        )
        self.add_callback(self.image_grids)
        self.add_callback(BetaSchedule.from_config(args))
        self.held_out = None  # watched rewards, diversity and the over-optimisation alarm, at evaluation
        if args.eval_strategy != "no":
            self.held_out = HeldOutScores(
                eval_reward_funcs,
                [_reward_name(reward) for reward in eval_reward_funcs],
                args.overoptimization_window,
                args.overoptimization_threshold,
            )
        self.reward_scoring = RewardScoring(self.reward_func_names, args.max_unscored_steps, args.output_dir)
        self._nonfinite = NonFiniteGuard(
            {
                "logps": "the policy's log-probs of the sampled tokens",
                "loss": "the policy loss (TRL's GRPO term)",
                "penalty": f"the divergence penalty (β · {args.divergence}, {args.divergence_estimator} estimator)",
            },
            self.accelerator.device,
        )
        self._stage_times = StageTimes(self.accelerator.device)
        self.resumes: list[dict] = []
        """The resumes of this run under other settings (`run_settings.check_resume`), recorded in its settings."""

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        # Before the checkpoint loads: refuse one of another model or adapter, name (and record) every other change.
        checkpoint = checkpoints.resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None:
            self.resumes = check_resume(checkpoint, RunSettings.from_trainer(self))
        return super().train(checkpoint, trial, ignore_keys_for_eval, **kwargs)

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
        model_init_kwargs["fp32_image_head"] = args.distributed_state.distributed_type != "FSDP"
        return model_init_kwargs

    def _prepare_lora_config(self, peft_config: PeftConfig | None, model: PreTrainedModel) -> PeftConfig | None:
        """Default LoRA targets: the family's language-model linears. PEFT's causal-LM wrapper (TRL's default task
        type) needs `prepare_inputs_for_generation`, which an image-only model (LlamaGen) lacks: it gets the plain
        wrapper, which trains the same adapters."""
        if not isinstance(peft_config, LoraConfig):
            return peft_config
        peft_config = copy.deepcopy(peft_config)
        if not peft_config.target_modules:
            peft_config.target_modules = self.family.lora_target_modules
        if peft_config.task_type == "CAUSAL_LM" and not hasattr(unwrap_model(model), "prepare_inputs_for_generation"):
            peft_config.task_type = None
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
        self.family.patch_forward(reference)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(reference, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(reference, self.accelerator)
        return self.accelerator.prepare_model(reference, evaluation_mode=True)

    # ------------------------------------------------------------------ generation

    def _generate(self, prompts: list):
        # Image tokens come from our CFG sampler, not `model.generate` (text mode for Janus).
        device = self.accelerator.device
        prompt_ids, prompt_mask = self.family.tokenize_prompts([_caption(prompt) for prompt in prompts])
        conditioning = self.family.build_conditioning(prompt_ids, prompt_mask).to(device)
        # TRL compares these log-probs with the trained distribution's (`off_policy_mask_threshold`), so with
        # `cfg_logprobs="conditional"` under guidance it gets the conditional log-prob of every sampled token.
        conditional = self.args.cfg_logprobs == "conditional" and self.args.sampling.guided
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.activation_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            boundary.gathered_parameters(self),
            self.accelerator.autocast(),  # the same numerics as the scoring forward
        ):
            compiled_before = static_decoder(self.family).compile_seconds if self.compile_rollouts else 0.0
            # Evaluation mode: the same (compiled) step for training and evaluation rollouts; dropout is off in both
            # anyway by default (`disable_dropout`).
            with self._timed("sampling"), self._rollout_weights(unwrapped_model), _evaluation_mode(unwrapped_model):
                sample = sample_image_tokens(
                    self.family,
                    unwrapped_model,
                    conditioning,
                    self.args.sampling,
                    return_conditional_logps=conditional,
                    return_entropies=self.args.token_selection == "critical",
                    compile=self.compile_rollouts,
                )
            if self.compile_rollouts and static_decoder(self.family).compile_seconds > compiled_before:
                boundary.record_metric(
                    self, "time/compile", static_decoder(self.family).compile_seconds - compiled_before
                )
            bare_model = unwrap_model(unwrapped_model)
            with self._timed("decoding"):  # a micro-batch at a time: the decoder's activations dwarf its weights
                chunks = sample.image_tokens.split(self.args.per_device_train_batch_size)
                images = [image for chunk in chunks for image in to_pil(self.family.decode(bare_model, chunk))]
            loss_mask = self._critical_tokens(bare_model, sample) if sample.entropies is not None else None

        if self.model.training:
            self.state.num_input_tokens_seen += self.accelerator.gather(prompt_mask.sum().to(device)).sum().item()
        boundary.set_metric(self, "num_tokens", self.state.num_input_tokens_seen)
        rollout = boundary.Rollout(
            prompt_ids=[ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask, strict=True)],
            image_tokens=sample.image_tokens.tolist(),
            images=images,
            sampling_logps=(sample.conditional_logps if conditional else sample.logps).tolist(),
            loss_mask=None if loss_mask is None else loss_mask.int().tolist(),
        )
        return rollout.to_trl()

    def _gathers_weights_for_rollouts(self) -> bool:
        """Whether each rollout gathers sharded weights anew (ZeRO-3's `ds3_gather_for_generation`, FSDP)."""
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        return self.is_fsdp_enabled or zero3

    def _rollout_weights(self, model):
        """The adapters folded into the base weights for sampling (`merge_adapters_for_rollouts`), where they can
        be and the copies fit on the GPU; the reason is logged once where they cannot."""
        if not (self.args.merge_adapters_for_rollouts and is_peft_model(model)):
            return contextlib.nullcontext()
        reason = "the weights are sharded by FSDP" if self.is_fsdp_enabled else why_not_mergeable(model)
        if reason is None and self.accelerator.device.type == "cuda":
            reason = _fold_does_not_fit(folded_bytes(model), self.accelerator.device)
        if reason is None:
            return merged_adapters(model)
        logger.info_once(f"Sampling with the adapters unmerged: {reason}.")
        return contextlib.nullcontext()

    def _critical_tokens(self, model, sample) -> torch.Tensor:
        """The rollout's critical tokens `(B, N)` (`token_selection="critical"`), from the sampled distributions'
        entropies and the sampled tokens' similarity embeddings; every group of images must be on this process."""
        if len(sample.image_tokens) % self.num_generations:
            raise ValueError(
                f"token_selection='critical' compares the {self.num_generations} images of a prompt, but this process "
                f"generated {len(sample.image_tokens)} images: make per_device_train_batch_size × "
                "steps_per_generation (and per_device_eval_batch_size) multiples of num_generations."
            )
        args = self.args
        return critical_token_mask(
            sample.entropies,
            self.family.similarity_embeddings(model, sample.image_tokens),
            self.num_generations,
            first_fraction=args.critical_first_fraction,
            entropy_fraction=args.critical_entropy_fraction,
            similarity_fraction=args.critical_similarity_fraction,
            window_end=args.critical_window_end,
        )

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL's rewards; the main process also keeps its images and their rewards for the logged image grids.
        with self._timed("rewards"):
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.model.training:  # the rewards are gathered: every process decides alike
            for name, fraction in self.reward_scoring.update(rewards, self.state.global_step).items():
                boundary.record_metric(self, f"rewards/{name}/scored", fraction)
        if self.model.training and self.accelerator.is_main_process and self.args.image_log_steps:
            local = boundary.local_rows(self, rewards, len(prompts)).cpu()
            values = {name: local[:, index].tolist() for index, name in enumerate(self.reward_func_names)}
            self.image_grids.add(completions, prompts, values)
        if not self.model.training and self.held_out is not None:
            self.held_out.add(self, inputs, prompts, completions, rewards)
        return rewards

    def _generate_and_score_completions(self, inputs):
        # TRL's, plus the per-token reference log-probs of the sampled estimator (the exact one recomputes the whole
        # reference distribution in `_compute_loss` instead).
        generated = super()._generate_and_score_completions(inputs)
        batch = boundary.Batch.of(generated)
        if self.has_reference and (self.args.divergence_estimator == "sampled" or self.args.dynamic_advantage):
            with self._timed("reference"):
                boundary.set_reference_logps(generated, self._reference_logps(batch))
        if self.args.sampler_correction:
            generated[SAMPLER_WEIGHTS] = self._sampler_weights(batch)
        return generated

    def _sampler_weights(self, batch: boundary.Batch) -> torch.Tensor:
        """`sampler_correction`: the truncated importance weight `π_old/π_sampler` of each token `(B, N)` (or each
        image `(B, 1)` at sequence level), as TRL's `vllm_importance_sampling_correction` computes it for vLLM's
        samples. `π_old` is the teacher-forced log-prob with the sampling weights: TRL's old log-probs, or computed
        here."""
        old_logps = batch.old_logps
        if old_logps is None:
            with self._timed("old_logps"), torch.no_grad():
                old_logps = self._score(
                    self.model, batch.prompt_ids, batch.prompt_mask, batch.image_tokens, self._device_batch_size()
                ).logps
        mask = batch.loss_mask
        log_ratio = (old_logps - batch.sampling_logps) * mask
        args = self.args
        if args.sampler_correction_mode.startswith("sequence"):
            log_ratio, mask = log_ratio.sum(-1, keepdim=True), mask.amax(-1, keepdim=True)
        ratio = log_ratio.exp()
        low, high = args.sampler_correction_clip_min, args.sampler_correction_clip_max
        if args.sampler_correction_mode.endswith("truncate"):
            weights = ratio.clamp(min=low, max=high)
        else:
            weights = ratio.masked_fill((ratio < (low or 0.0)) | (ratio > high), 0.0)
        for name, value in (
            ("min", boundary.global_masked_min(self, ratio, mask)),
            ("mean", boundary.global_masked_mean(self, ratio, mask)),
            ("max", boundary.global_masked_max(self, ratio, mask)),
            ("corrected", boundary.global_masked_mean(self, (weights != ratio).float(), mask)),
        ):
            boundary.record_metric(self, f"sampling/importance_ratio/{name}", value)
        return weights

    def _device_batch_size(self) -> int:
        """Images per forward when a whole generation batch is scored: the device batch size of the current mode."""
        training = self.model.training
        return self.args.per_device_train_batch_size if training else self.args.per_device_eval_batch_size

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
        scores = self._score(
            model,
            input_ids[:, :-logits_to_keep],
            attention_mask[:, :-logits_to_keep],
            input_ids[:, -logits_to_keep:],
            batch_size or input_ids.size(0),
            entropies=compute_entropy,
        )
        return scores.logps, scores.entropies, None

    def _score(
        self,
        model,
        prompt_ids,
        prompt_mask,
        image_tokens,
        batch_size: int,
        *,
        entropies: bool = False,
        untruncated: bool = False,
        tables: bool = False,
    ) -> PolicyScores:
        """Teacher-forced scores of image tokens `(B, N)` under `model` (possibly wrapped), `batch_size` images per
        forward, changing nothing: their log-probs and, where asked for, their entropies (`entropies`), their
        untruncated log-probs (`untruncated`) and with these the untruncated `(B, N, V)` tables (`tables`)."""
        chunks = []
        for start in range(0, image_tokens.size(0), batch_size):
            rows = slice(start, start + batch_size)
            tokens = image_tokens[rows]
            logits = self._teacher_forced_logits(model, prompt_ids[rows], prompt_mask[rows], tokens)
            truncated = truncate_logits(logits, self.args.sampling, self.args.cfg_logprobs)
            logp_table = truncated.log_softmax(dim=-1)
            # a token outside the current truncated support: log-prob -inf, floored (no gradient, ratio 0)
            chunk = {"logps": gather_logps(logp_table, tokens).clamp(min=MIN_LOGP)}
            if entropies:
                chunk["entropies"] = position_entropy(logp_table)
            if untruncated:
                untruncated_table = logp_table if truncated is logits else logits.log_softmax(dim=-1)
                chunk["untruncated_logps"] = gather_logps(untruncated_table, tokens)
                if tables:
                    chunk["untruncated_table"] = untruncated_table
            chunks.append(chunk)
        return PolicyScores(**{name: _joined([chunk[name] for chunk in chunks]) for name in chunks[0]})

    def _teacher_forced_logits(self, model, prompt_ids, prompt_mask, image_tokens) -> torch.Tensor:
        """Teacher-forced `(B, N, V)` logits of the distribution `cfg_logprobs` names, before top-k/top-p."""
        conditioning = self.family.build_conditioning(prompt_ids, prompt_mask)
        with self.accelerator.autocast():
            return teacher_forced_logits(
                self.family, model, conditioning, image_tokens, self.args.sampling, self.args.cfg_logprobs
            )

    @torch.no_grad()
    def _reference_logp_table(self, prompt_ids, prompt_mask, image_tokens) -> torch.Tensor:
        """The reference's untruncated `(B, N, V)` log-probs: our frozen copy, or the policy with its adapters
        disabled. Untruncated, like the policy's in the penalty: the two then share their support."""
        if self.ref_model is not None:
            model, context = self.ref_model, contextlib.nullcontext()
        else:
            peft_model = self.accelerator.unwrap_model(self.model)
            model, context = self.model, use_adapter(peft_model, boundary.reference_adapter_name(peft_model))
        with context, _activation_checkpointing_disabled(self.model, self.args.activation_checkpointing_kwargs):
            return self._teacher_forced_logits(model, prompt_ids, prompt_mask, image_tokens).log_softmax(dim=-1)

    def _reference_logps(self, batch: boundary.Batch) -> torch.Tensor:
        """Per-token reference log-probs `(B, N)` of a generation batch, scored in chunks of the device batch size."""
        batch_size, image_tokens = self._device_batch_size(), batch.image_tokens
        chunks = []
        for start in range(0, image_tokens.size(0), batch_size):
            rows = slice(start, start + batch_size)
            logp_table = self._reference_logp_table(
                batch.prompt_ids[rows], batch.prompt_mask[rows], image_tokens[rows]
            )
            chunks.append(gather_logps(logp_table, image_tokens[rows]))
        return torch.cat(chunks)

    # ------------------------------------------------------------------ loss

    @property
    def beta_schedule(self) -> BetaSchedule:
        # looked up, not kept: resuming with `restore_callback_states_from_checkpoint` replaces the callback
        return next(callback for callback in self.callback_handler.callbacks if isinstance(callback, BetaSchedule))

    def current_beta(self) -> float:
        """The penalty coefficient at the current optimizer step, following `beta_schedule`."""
        return self.beta_schedule.value(self.state.global_step, self.state.max_steps)

    def _compute_loss(self, model, inputs):
        # TRL's loss (clipping, importance sampling, `loss_type`) without its k3 KL, plus our divergence penalty, in
        # explicit steps: the policy forward, the advantages' weights (which need its log-probs), TRL's loss over it.
        batch = boundary.Batch.of(inputs)
        with self._timed("policy_loss"):
            policy = self._score(
                model,
                batch.prompt_ids,
                batch.prompt_mask,
                batch.image_tokens,
                len(batch.image_tokens),
                entropies=True,
                untruncated=True,
                tables=self.args.divergence_estimator == "exact",
            )
            weighted = boundary.with_advantages(inputs, self._weighted_advantages(inputs, batch, policy))
            with boundary.policy_scores_given(self, policy.logps, policy.entropies):
                loss = super()._compute_loss(model, weighted)
        policy.entropies = None  # TRL's loss alone reads them: their graph (about four (B, N, V) tables) goes now
        if self.model.training:
            self._nonfinite.record("logps", policy.logps)
            self._nonfinite.record("loss", loss)
        self._log_sampling_agreement(batch, policy.logps.detach())
        boundary.record_metric(
            self,
            "tokens/trained_fraction",
            boundary.global_masked_mean(self, batch.loss_mask.float(), batch.image_mask),
        )
        if not self.has_reference:
            return loss
        with self._timed("penalty"):
            penalty = self._divergence_penalty(batch, policy)
        if self.model.training:
            self._nonfinite.record("penalty", penalty)
        return loss + penalty

    def _weighted_advantages(self, inputs: dict, batch: boundary.Batch, policy: PolicyScores) -> torch.Tensor:
        """The advantages TRL's loss weighs each token's term by: TRL's, per token `(B, N)` times the
        `sampler_correction` weights and GCPO's differentiable `dynamic_advantage` weight (see `trl_t2i.gcpo`), where
        they are on. TRL's loss is linear in the advantages, and both weights are positive, so under its clipping too
        this weighs each token's term."""
        advantages = batch.advantages
        if SAMPLER_WEIGHTS in inputs:
            advantages = _per_token(advantages) * inputs[SAMPLER_WEIGHTS]
        if self.args.dynamic_advantage:
            weight = dynamic_advantage_weight(
                policy.untruncated_logps, batch.reference_logps, self.args.dynamic_advantage_clamp
            )
            advantages = advantages.reshape(len(weight), -1) * weight
            boundary.record_metric(
                self, "dynamic_advantage/weight", boundary.global_masked_mean(self, weight, batch.image_mask)
            )
        return advantages

    def _divergence_penalty(self, batch: boundary.Batch, policy: PolicyScores) -> torch.Tensor:
        """`current_beta() · D`, normalised like TRL's loss; logs β, the penalty and every metric divergence.

        D is between the untruncated policy and reference distributions (with the sampler's guidance and
        temperature, without its top-k/top-p), which share their support, so it is finite for every divergence:
        exactly with the exact estimator, else one term per sampled token (see `_penalty_importance_ratio`).
        """
        mask, image_mask = batch.loss_mask, batch.image_mask
        untruncated_logps, untruncated_table = policy.untruncated_logps, policy.untruncated_table
        ref_logps, ref_table = batch.reference_logps, None
        if untruncated_table is not None:
            with self._timed("reference"):
                ref_table = self._reference_logp_table(batch.prompt_ids, batch.prompt_mask, batch.image_tokens)
            per_token = self.divergence.exact_penalty(untruncated_table, ref_table)
        else:
            per_token = self.divergence.sampled(untruncated_logps, ref_logps)
            if self.args.use_bias_correction_kl:  # makes the expected gradient that of the divergence
                ratio = self._penalty_importance_ratio(batch.old_logps, mask, policy.logps, untruncated_logps)
                per_token = per_token * ratio

        beta = self.current_beta()
        boundary.record_metric(self, "beta", beta)
        penalty_mean = boundary.global_masked_mean(self, per_token, mask)
        boundary.record_metric(self, f"divergence/{self.args.divergence}_penalty", penalty_mean)
        with torch.no_grad():  # over every image token, whichever the loss covers
            for name, divergence in self.metric_divergences.items():
                if ref_table is None:
                    value = divergence.sampled(untruncated_logps, ref_logps)
                elif name == self.args.divergence:  # the penalty is this very divergence
                    value = per_token
                elif self._logs_this_step():  # a full-codebook pass: only for the steps that are logged
                    value = divergence.exact_penalty(untruncated_table, ref_table)  # chunked: no big temporaries
                else:
                    continue
                boundary.record_metric(
                    self, f"divergence/{name}", boundary.global_masked_mean(self, value, image_mask)
                )
            if self.model.training and self.args.beta_schedule == "adaptive":
                measured = (
                    per_token if ref_table is not None else self.divergence.sampled(untruncated_logps, ref_logps)
                )
                self.beta_schedule.measure(boundary.global_masked_mean(self, measured, image_mask))
        boundary.record_metric(self, "divergence/exact", float(ref_table is not None))
        if self.args.divergence_in == "reward":  # the prefix term: the sequence-level penalty's gradient
            old_logps = policy.logps.detach() if batch.old_logps is None else batch.old_logps
            per_token = with_prefix_term(per_token, policy.logps, old_logps, mask)
        return beta * boundary.aggregate_like_trl(self, per_token, mask, batch)

    def _logs_this_step(self) -> bool:
        """Whether the optimizer step being computed will be logged (always in evaluation)."""
        if not self.model.training or self.args.logging_strategy != "steps":
            return True
        step = self.state.global_step + 1
        return step % max(int(self.state.logging_steps), 1) == 0 or (step == 1 and self.args.logging_first_step)

    def _penalty_importance_ratio(self, old_logps, mask, policy_logps, untruncated_logps) -> torch.Tensor:
        """The sampled penalty's importance weight π/π_old, which makes its expected gradient the divergence's.

        Without top-k/top-p it is TRL's ratio (`coef_1`). With them, π is the untruncated policy and π_old the
        truncated distribution that sampled, on the codes S it could draw: the term then estimates
        Σ_{v∈S} π_ref(v)[f(u(v)) − f′(1)(u(v) − 1)] (u = π/π_ref), which is the part Σ_S π_ref f(u) of D(π‖π_ref) on
        S only where f′(1) = 0 (JS, Jeffreys, Hellinger, α) or π and π_ref give S the same mass (not for either KL),
        and keeps pulling tokens that have since left the policy's truncated support. Its log is capped at
        `MAX_LOG_RATIO` (as the sampled estimator's), and a token outside π_old's support counts 0. `old_logps`: TRL's
        (`None`: the policy has not moved since sampling); `mask`: the tokens the loss covers.
        """
        if not truncates(self.args.sampling, self.args.cfg_logprobs):
            return boundary.importance_ratio(self, policy_logps, old_logps, mask)
        old_logps = policy_logps.detach() if old_logps is None else old_logps
        sampled = old_logps > MIN_LOGP
        capped = untruncated_logps.clamp(max=old_logps + MAX_LOG_RATIO)
        return boundary.importance_ratio(self, capped, old_logps, mask) * sampled

    def _log_sampling_agreement(self, batch: boundary.Batch, policy_logps) -> None:
        """How far the sampler's recorded log-probs are from teacher forcing with the same weights (numerics: ~1e-6
        in fp32, ~1e-2 under bf16 autocast), and the fraction of tokens outside the current truncated support."""
        mask = batch.image_mask.bool()
        outside = policy_logps <= MIN_LOGP
        boundary.record_metric(
            self, "sampling/outside_support", boundary.global_masked_mean(self, outside.float(), mask)
        )
        # TRL's old log-probs are teacher-forced with the sampling weights; without them the policy is those weights
        same_weights = policy_logps if batch.old_logps is None else batch.old_logps
        gap = (same_weights - batch.sampling_logps).abs()
        inside = mask & ~outside & (same_weights > MIN_LOGP)
        boundary.record_metric(self, "sampling/logp_gap_mean", boundary.global_masked_mean(self, gap, inside))
        boundary.record_metric(self, "sampling/logp_gap_max", boundary.global_masked_max(self, gap, inside))

    # ------------------------------------------------------------------ non-finite training

    def _get_grad_norm(self, model, grad_norm=None):
        # Called between clipping and the optimizer step: a step whose loss or gradient is not finite stops the run
        # (or is skipped) before it updates the weights. With a loss scaler (fp16) a non-finite gradient is routine:
        # the scaler skips the step itself and lowers its scale.
        grad_norm = super()._get_grad_norm(model, grad_norm)
        problems = self._nonfinite.problems(self.accelerator, grad_norm if self.accelerator.scaler is None else None)
        if problems:
            self._skip_or_stop(model, problems)
        return grad_norm

    def _skip_or_stop(self, model, problems: list[str]) -> None:
        """Drop the step's gradients while `skip_nonfinite_steps` allows it, else stop the run naming the terms."""
        step, what, guard = self.state.global_step + 1, "; ".join(problems), self._nonfinite
        if guard.skipped < self.args.skip_nonfinite_steps:
            model.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient
            guard.skipped += 1
            logger.warning(f"Skipped step {step}: {what} ({guard.skipped} of {self.args.skip_nonfinite_steps}).")
            boundary.record_metric(self, "nonfinite/skipped_steps", guard.skipped)
            return
        latest = checkpoints.latest_checkpoint(self.args.output_dir)
        raise NonFiniteTrainingError(
            f"Training went non-finite at step {step}: {what}. This step's update is not saved; the latest "
            f"checkpoint is {latest or 'none: none was saved yet'}. Lower learning_rate or beta, check the rewards, "
            "or set `skip_nonfinite_steps` to skip such steps."
            + (f" ({guard.skipped} were skipped already.)" if guard.skipped else "")
        )

    # ------------------------------------------------------------------ logging

    def _timed(self, stage: str):
        """Log the seconds a stage of the step takes as `time/<stage>` (averaged over its calls between logs); on
        CUDA measured with CUDA events and read at logging time, so the step never waits for the GPU to be timed."""
        return self._stage_times.time(stage, boundary.mode(self))

    def flush_stage_times(self) -> None:
        """Record the stage times measured since the last call into TRL's metrics (`log` calls it)."""
        for mode, stage, seconds in self._stage_times.flush():
            boundary.record_metric(self, f"time/{stage}", seconds, in_mode=mode)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self.flush_stage_times()
        if self.held_out is not None and self.held_out.pending:  # the log that closes an evaluation
            for name, value in self.held_out.end_evaluation(self.state.global_step).items():
                boundary.record_metric(self, name, value, in_mode="eval")
        # TRL writes completions to parquet/tables as text: give it captions and move the images to its image column.
        boundary.completions_as_images(self)
        super().log(logs, start_time)

    # ------------------------------------------------------------------ saving and sharing

    def _save_checkpoint(self, model, trial):
        # Atomic checkpoints: written into a staging folder, renamed to checkpoint-N once complete, so that a crash or
        # a full disk never leaves a checkpoint-N that resuming would take for a complete one.
        with checkpoints.staged(self, trial):
            super()._save_checkpoint(model, trial)

    def _save(self, output_dir: str | None = None, state_dict=None):
        # Never non-finite weights; and also the run's resolved settings, at every save (checkpoints too): evaluate,
        # frontier and the model card read them as JSON instead of unpickling training_args.bin.
        trained = state_dict.items() if state_dict is not None else _trainable_parameters(self.model)
        check_weights(trained, output_dir or self.args.output_dir)
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            RunSettings.from_trainer(self).save(output_dir or self.args.output_dir)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        # Our card: the divergence settings, rewards, final metrics, the command line and a trl_t2i usage snippet.
        if not self.is_world_process_zero():
            return
        output_dir = Path(self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        grids = sorted((output_dir / "samples").glob("step_*.png"))
        if grids:
            save_whole(Image.open(grids[-1]), output_dir / hub.SAMPLE_GRID)
        final = {}
        for entry in self.state.log_history:
            final.update({k: v for k, v in entry.items() if k.startswith(("reward", "divergence/", "entropy"))})
        card = hub.model_card(
            settings=RunSettings.from_trainer(self),
            output_dir=output_dir,
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


def _trainable_parameters(model) -> list[tuple[str, torch.Tensor]]:
    """The parameters that training changes (the adapters, with LoRA)."""
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


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


def _fit_prompts(dataset, family, args: T2IGRPOConfig, split: str):
    """`fit_prompts` for the trainer's datasets (a dict of them too); an `IterableDataset` cannot be read up front."""
    if isinstance(dataset, dict):
        return {name: _fit_prompts(part, family, args, f"{split} ({name})") for name, part in dataset.items()}
    if not isinstance(dataset, Dataset):
        return dataset
    return fit_prompts(dataset, family, args.max_prompt_length, f"The {split} dataset")


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
def _evaluation_mode(model):
    """`model` in evaluation mode inside the block, back in its mode after."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


@contextlib.contextmanager
def _activation_checkpointing_disabled(model, checkpointing_kwargs: dict | None):
    """No activation checkpointing inside the block (a no-grad pass gains nothing from it): TRL's
    `disable_gradient_checkpointing` on transformers' current method names (TRL's calls deprecated aliases)."""
    enabled = model.is_activation_checkpointing
    if enabled:
        model.activation_checkpointing_disable()
    try:
        yield
    finally:
        if enabled:
            model.activation_checkpointing_enable(checkpointing_kwargs)


def _fold_does_not_fit(needed: int, device: torch.device) -> str | None:
    """Why the folded weights would not fit in the GPU's free memory (with 1 GB to spare), or `None`."""
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by PyTorch, reusable
    if needed + 2**30 > free:
        return f"the folded weights need {needed / 2**30:.1f} GiB and the GPU has {free / 2**30:.1f} GiB free"
    return None


def _per_token(advantages: torch.Tensor) -> torch.Tensor:
    """TRL's advantages `(B,)` as `(B, 1)`, ready to weigh per token; `(B, N)` ones (already weighted) as they are."""
    return advantages[:, None] if advantages.dim() == 1 else advantages


def _joined(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Scores of consecutive chunks of rows as one tensor, without copying the usual single chunk (a micro-batch's
    `(B, N, V)` table)."""
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def _check_eval_reward_funcs(eval_reward_funcs, reward_funcs: list, args: T2IGRPOConfig) -> list:
    """The watched rewards as a list: callables, scored at evaluation, named apart from the trained rewards."""
    if not eval_reward_funcs:
        return []
    eval_reward_funcs = _check_reward_funcs(eval_reward_funcs)
    if args.eval_strategy == "no":
        raise ValueError(
            "`eval_reward_funcs` are scored at evaluation, which is off: set `eval_strategy` ('steps'), `eval_steps` "
            "and an `eval_dataset` of held-out prompts."
        )
    shared = sorted({_reward_name(reward) for reward in eval_reward_funcs} & {_reward_name(r) for r in reward_funcs})
    if shared:
        raise ValueError(
            f"The rewards {shared} are both trained on and watched: a watched reward must not be trained on (the "
            "trained rewards are scored at evaluation anyway)."
        )
    return eval_reward_funcs


def _reward_name(reward) -> str:
    """A reward function's name, as TRL names its metrics."""
    return getattr(reward, "__name__", type(reward).__name__)


def _set_completion_length(args: T2IGRPOConfig, num_image_tokens: int) -> None:
    """`max_completion_length` is the model's number of image tokens: set it when unset, reject any other value."""
    if args.max_completion_length not in (None, num_image_tokens):
        raise ValueError(
            f"`max_completion_length={args.max_completion_length}` does not match the model, whose images have "
            f"{num_image_tokens} tokens. Leave it unset: the trainer takes it from the model."
        )
    args.max_completion_length = num_image_tokens
