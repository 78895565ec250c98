import math
from dataclasses import dataclass, field, fields

from trl import GRPOConfig

from .decoding import compile_setting
from .divergences import DIVERGENCES, get_divergence
from .sampling import CFG_LOGPROBS, SamplingConfig


DIVERGENCE_ESTIMATORS = ("sampled", "exact")
DIVERGENCE_IN = ("loss", "reward")
BETA_SCHEDULES = ("constant", "linear", "cosine", "adaptive")
TOKEN_SELECTIONS = ("all", "critical")
SAMPLER_CORRECTION_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

FINITE_SETTINGS = (
    "beta",
    "beta_end",
    "beta_min",
    "beta_max",
    "beta_adaptive_rate",
    "divergence_alpha",
    "divergence_target",
    "cfg_scale",
    "temperature",
    "top_p",
    "dynamic_advantage_clamp",
    "learning_rate",
)
"""Settings that must be finite numbers: an infinite one means nothing (NaN is refused in every numeric setting)."""

# Settings of GRPOConfig that cannot apply to image tokens: (field, value that means "off", why). The config rejects
# them instead of ignoring them, and `trl-t2i grpo --help` hides them.
UNSUPPORTED_SETTINGS = [
    ("use_vllm", False, "vLLM does not generate Janus/LlamaGen image tokens; images are sampled by trl_t2i's sampler"),
    ("use_transformers_continuous_batching", False, "image tokens are sampled by trl_t2i's own batched sampler"),
    ("use_transformers_paged", False, "image tokens are sampled by trl_t2i's own batched sampler"),
    ("mask_truncated_completions", False, "images have no EOS token, so every image would count as truncated"),
    ("max_tool_calling_iterations", None, "there is no tool calling in image generation"),
    ("min_p", None, "the image sampler supports temperature, top_k and top_p"),
    ("repetition_penalty", 1.0, "the image sampler supports temperature, top_k and top_p"),
    ("generation_kwargs", None, "set cfg_scale, temperature, top_k and top_p instead"),
    ("cache_implementation", None, "the image sampler manages its own KV cache"),
    ("cast_lm_head_to_fp32", False, "images are scored by the image head, never the text lm_head"),
    ("use_liger_kernel", False, "Liger's fused loss works on the text lm_head, not the image head"),
    ("log_completions_hub_repo", None, "completions are images: they are logged as image grids instead"),
    ("pad_to_multiple_of", None, "images have a fixed number of tokens; padding would score pad ids as image codes"),
]


@dataclass
class T2IGRPOConfig(GRPOConfig):
    r"""
    Configuration class for [`T2IGRPOTrainer`]: GRPO on the image tokens of an autoregressive text-to-image model,
    with an f-divergence penalty towards the reference model in place of TRL's k3 KL.

    Only the parameters specific to text-to-image training are listed here; every [`~trl.GRPOConfig`] parameter
    applies too, with these differences: `beta` (the penalty coefficient) defaults to `0.04`, `disable_dropout` to
    `True` (sampling and scoring must see the same network), `max_completion_length` defaults to `None`, which the
    trainer sets to the model's number of image tokens (any other value is rejected), and the text-generation
    settings that cannot apply to images (vLLM, tools, `mask_truncated_completions`, `min_p`, `repetition_penalty`,
    …) are rejected with a message instead of being silently ignored. `temperature`, `top_k` and `top_p` are the image
    sampler's; with `cfg_scale` they make up `sampling`, the `SamplingConfig` that the trainer samples and scores with.
    NaN is refused in every numeric setting, and infinity wherever it means nothing (`FINITE_SETTINGS`).

    Parameters:
        > Parameters that control the divergence penalty

        divergence (`str`, *optional*, defaults to `"reverse_kl"`):
            f-divergence D(π‖π_ref) added to the loss as `beta · D`. One of `reverse_kl` (TRL's KL), `forward_kl`,
            `js` (Jensen–Shannon: keeps more diversity for the same reward), `jeffreys`, `hellinger`, `alpha`.
            Its curvature at π = π_ref differs (JS has ¼ of KL's), so tune `beta` per divergence.
        divergence_alpha (`float` or `None`, *optional*):
            The α of the `alpha` divergence (α → 1 is reverse KL, α → 0 forward KL), in [−1, 2]: beyond, its
            estimators overflow float32 (`trl_t2i.divergences.ALPHA_RANGE`). Only valid with `divergence="alpha"`,
            where it defaults to 0.5.
        divergence_estimator (`str`, *optional*, defaults to `"sampled"`):
            `"sampled"`: one unbiased term per sampled token (the paper's estimators; with
            `use_bias_correction_kl=True` its expected gradient is the gradient of the position's divergence given
            the sampled prefix). `"exact"`: the divergence summed over the whole codebook at every position — zero
            variance, and that same gradient exactly — for one extra no-grad reference forward per micro-batch.
            Neither includes the prefix term of the sequence-level gradient: see `divergence_in`.
        divergence_in (`str`, *optional*, defaults to `"loss"`):
            `"loss"`: `beta · D_t` is added to the loss at every position, differentiated with the sampled prefix
            held fixed (as TRL's k3 and the paper's code): its expected gradient is E[Σ_t ∇D_t(x_<t)], not the
            gradient of the sequence-level penalty E_π[Σ_t D_t(x_<t)], which also has the prefix term
            E[Σ_t D_t ∇log π(x_<t)] (how the policy's earlier tokens lead to positions where it diverges).
            `"reward"`: the penalty also acts as a reward: each token is charged, through its log-prob, with
            `beta ×` the divergences of the later positions (a reward-to-go), which adds that term, so the expected
            gradient is the sequence-level penalty's. No extra forward; more variance. With
            `divergence_estimator="sampled"` it needs `use_bias_correction_kl=True`.
        beta_schedule (`str`, *optional*, defaults to `"constant"`):
            How `beta` evolves over training: `"constant"`, `"linear"` / `"cosine"` from `beta` to `beta_end` over
            the run's optimizer steps, or `"adaptive"`: starting at `beta`, a proportional controller (PPO's adaptive
            KL) steers the measured divergence to `divergence_target` after every optimizer step,
            `β ← clip(β · (1 + beta_adaptive_rate · clip((D − target)/target, −0.2, 0.2)), beta_min, beta_max)`.
        beta_end (`float` or `None`, *optional*):
            Final coefficient of a `linear` or `cosine` schedule (required for them, invalid otherwise).
        divergence_target (`float` or `None`, *optional*):
            The divergence (per token, nats for the KLs) the `adaptive` schedule steers to; required for it.
        beta_adaptive_rate (`float`, *optional*, defaults to `0.1`):
            Gain of the `adaptive` controller: the largest relative change of β per optimizer step is 0.2 × this.
        beta_min (`float`, *optional*, defaults to `1e-4`) and beta_max (`float`, *optional*, defaults to `10.0`):
            Bounds of the `adaptive` β.

        > Parameters that control which tokens the loss covers (the paper's code)

        token_selection (`str`, *optional*, defaults to `"all"`):
            `"all"`: every image token. `"critical"`: GCPO's critical tokens, about 30% of each image (see
            `trl_t2i.gcpo`), chosen at rollout time; the policy-gradient term and the penalty cover only
            them. Needs the images of a prompt on one process (`per_device_train_batch_size × steps_per_generation`
            a multiple of `num_generations`).
        critical_first_fraction, critical_entropy_fraction, critical_similarity_fraction (`float`, *optional*,
            default to `0.1`):
            The fractions of the three rules: the first positions, the largest spatial entropy gradients (inside
            `[critical_first_fraction, critical_window_end)`), and the positions where the images of the group are
            least alike (mean cosine similarity over the group's pairs of sampled-token embeddings, as the paper's
            code: one score per position, shared by the group).
            The paper's Janus code effectively ran `critical_entropy_fraction=1.0` (see the Janus paper recipes).
        critical_window_end (`float`, *optional*, defaults to `0.9`):
            End of the window of the entropy rule, as a fraction of the positions.
        dynamic_advantage (`bool`, *optional*, defaults to `False`):
            Multiply the policy-gradient term at position t by the running mean over positions ≤ t of
            `exp(clamp(log π − log π_ref, ±dynamic_advantage_clamp))`, differentiably, as the paper's LlamaGen code
            does (its Janus code computes it but never applies it).
        dynamic_advantage_clamp (`float`, *optional*, defaults to `0.5`):
            Clamp of the log-ratio in the dynamic-advantage weight (0.5 in the LlamaGen code, 0.2 in the Janus code).

        > Parameters that control generation

        max_prompt_length (`int` or `None`, *optional*, defaults to `None`):
            The longest caption, in the model's prompt tokens (Janus: the chat-formatted prompt; LlamaGen: T5
            tokens), checked for every caption when the dataset is read, before the model loads. `None`: a caption
            longer than the model takes (Janus: its language model's context less the image tokens; LlamaGen:
            `caption_length`, 120) is an error naming its line (or row) and length. Set (at most that limit):
            longer captions are cut to their longest start of whole words that fits, with a warning, and the
            rewards score the cut caption the model saw. (TRL 1.16's `GRPOConfig` has no such field; older TRL
            truncated prompts silently and kept their end, where for captions the start matters.) Not checked for
            an `IterableDataset`.
        cfg_scale (`float`, *optional*, defaults to `5.0`):
            Classifier-free guidance scale `s` of the sampler: logits `l_u + s·(l_c − l_u)`. `1.0` turns guidance
            off and skips the unconditional rows (half the work).
        cfg_logprobs (`str`, *optional*, defaults to `"guided"`):
            Distribution that the policy gradient and the divergence use. `"guided"`: the guided distribution that
            was sampled (exactly on-policy; scoring runs the conditional and unconditional rows). `"conditional"`:
            the conditional branch only, as T2I-R1 and the paper's Janus code do — off-policy, hence biased, when
            `cfg_scale != 1`; supported for reproduction.
        merge_adapters_for_rollouts (`bool`, *optional*, defaults to `True`):
            With LoRA, fold the adapters into the base weights while sampling (one matmul per linear instead of
            three) and put the original weights back afterwards, bit for bit. Costs one extra copy of the adapted
            weights during rollouts (see `docs/memory.md`). Skipped, with a log line, where the base weights cannot
            take the fold (4-bit or 8-bit (QLoRA), DoRA, sharded by ZeRO-3 or FSDP) or the copy does not fit in the
            GPU's free memory at rollout time.
        compile_rollouts (`str`, *optional*, defaults to `"auto"`):
            Sample with a static KV cache and a `torch.compile`d decode step (a CUDA graph on GPU): the same tokens
            and log-probs as the eager decode, 6× faster on an H200 at Janus-Pro-1B (see the README). `"auto"`: on
            CUDA for families with a static decode (Janus, LlamaGen), eager on CPU, where it does not pay, and under
            ZeRO-3 or FSDP, whose weights are gathered anew (at new addresses) for every rollout. `"true"` /
            `"false"`: always / never. Compiled once per run and batch shape (one graph for every attended length, a
            CUDA graph per 128 attended positions; the first rollout says so and logs `time/compile`); smaller
            batches are padded to a compiled shape, and the KV cache and buffers are allocated once and kept between
            rollouts (see `docs/memory.md`).

        > Parameters that correct for the sampler's numerics

        sampler_correction (`bool`, *optional*, defaults to `False`):
            Weigh each token's policy-gradient term by the truncated importance ratio `π_old(x) / π_sampler(x)`
            between the trained model's teacher-forced log-prob of the token and the log-prob the sampler recorded:
            the semantics of TRL's `vllm_importance_sampling_correction` for our own sampler. In fp32 the two agree
            to 1e-5 and the ratio is 1; in bf16 the KV-cached decode and the full-sequence forward round differently
            (0.02–0.06 nats per token, more with folded LoRA), so the samples do not quite come from the policy the
            loss assumes. Costs one no-grad teacher-forced pass per rollout when TRL does not compute old log-probs
            anyway. Logs `sampling/importance_ratio/{min,mean,max}` and `sampling/importance_ratio/corrected`.
        sampler_correction_mode (`str`, *optional*, defaults to `"token_truncate"`):
            As TRL's `vllm_importance_sampling_mode`: `"token_truncate"` / `"token_mask"` clamp to / zero outside
            `[sampler_correction_clip_min, sampler_correction_clip_max]` per token; `"sequence_truncate"` /
            `"sequence_mask"` do the same with the image's ratio (the product over its tokens).
        sampler_correction_clip_max (`float`, *optional*, defaults to `2.0`):
            Upper bound of the ratio (truncated importance sampling uses 2).
        sampler_correction_clip_min (`float` or `None`, *optional*, defaults to `None`):
            Lower bound of the ratio (`None`: 0 for the truncating modes, no bound for the masking modes).

        > Parameters that control what a run does when training goes non-finite

        skip_nonfinite_steps (`int`, *optional*, defaults to `0`):
            An optimizer step whose policy log-probs, policy loss, divergence penalty or gradient norm is NaN or
            infinite stops the run with an error naming the term, before the weights are updated (non-finite weights
            are never saved). With a positive value, that many such steps are skipped instead (their gradients
            dropped, a warning naming the term, `nonfinite/skipped_steps` logged), and the next one stops the run.
            Under fp16 mixed precision a non-finite gradient is left to the loss scaler, which skips the step itself.
            Not with DeepSpeed, whose engine updates the weights inside the backward pass.

        > Parameters that control logging

        image_log_steps (`int`, *optional*, defaults to `50`):
            Every this many optimizer steps, write a grid of generated images captioned with their prompt and rewards
            to `output_dir/samples/` and send it to the trackers in `report_to`. `0` disables it.
        image_log_count (`int`, *optional*, defaults to `16`):
            Number of images in each logged grid.

        > Parameters that control the over-optimisation alarm (with evaluation: `eval_strategy`, `eval_steps`, held-out
        prompts as `eval_dataset`, and the trainer's watched `eval_reward_funcs`; see `trl_t2i.overoptimization`)

        overoptimization_window (`int`, *optional*, defaults to `3`):
            Evaluations the alarm looks back over (at least 2; `0` turns the alarm off, the held-out metrics are
            still logged). Every evaluation logs `overoptimization/alarm` (0 or 1) and each metric's change over the
            window, in standard deviations; the alarm also warns in the log. Its changes are least-squares fits over
            the window: 3 evaluations smooth one noisy evaluation out and still react within `2 × eval_steps`.
        overoptimization_threshold (`float`, *optional*, defaults to `0.5`):
            The alarm is raised when the trained reward (the weighted sum, TRL's `reward`) rose over the window while
            a watched reward or the diversity of the images of each prompt fell by more than this many of its
            standard deviations (across images, or prompts for the diversity, at the window's first evaluation) and
            by more than twice the standard error of that fall. Half a standard deviation is a large shift for the
            mean of a whole evaluation set; the standard-error guard keeps a small set from raising it by chance.

        > Parameters that control what a run does when a reward stops scoring

        max_unscored_steps (`int`, *optional*, defaults to `10`):
            A reward that returns None or NaN for every image of a step trains nothing there: the run goes on with
            the other rewards and the penalty alone. The fraction of images each reward scored is logged as
            `rewards/<name>/scored`; the first step a reward scores nothing in is warned about, and after this many
            steps in a row without a scored image the run stops with an error naming the reward and the latest
            checkpoint. A reward that scores nothing at the first step is an error at once.
    """

    # Parameters that control the divergence penalty
    divergence: str = field(
        default="reverse_kl",
        metadata={"help": "f-divergence penalty.", "choices": sorted(DIVERGENCES)},
    )
    divergence_alpha: float | None = field(
        default=None,
        metadata={"help": "α of the `alpha` divergence, in [-1, 2] (α→1: reverse KL, α→0: forward KL). Default 0.5."},
    )
    divergence_estimator: str = field(
        default="sampled",
        metadata={
            "help": "`sampled`: one unbiased term per sampled token; `exact`: summed over the whole codebook.",
            "choices": list(DIVERGENCE_ESTIMATORS),
        },
    )
    divergence_in: str = field(
        default="loss",
        metadata={
            "help": "`loss`: the per-position penalty (prefix held fixed); `reward`: also charged to earlier tokens "
            "as a reward-to-go, for the sequence-level penalty's gradient.",
            "choices": list(DIVERGENCE_IN),
        },
    )
    beta_schedule: str = field(
        default="constant",
        metadata={"help": "Schedule of `beta` over training.", "choices": list(BETA_SCHEDULES)},
    )
    beta_end: float | None = field(
        default=None,
        metadata={"help": "Final `beta` of a `linear` or `cosine` schedule."},
    )
    divergence_target: float | None = field(
        default=None,
        metadata={"help": "Divergence the `adaptive` beta schedule steers to (required for it)."},
    )
    beta_adaptive_rate: float = field(
        default=0.1,
        metadata={"help": "Gain of the `adaptive` beta controller per optimizer step."},
    )
    beta_min: float = field(default=1e-4, metadata={"help": "Lower bound of the `adaptive` beta."})
    beta_max: float = field(default=10.0, metadata={"help": "Upper bound of the `adaptive` beta."})

    # Parameters that control which tokens the loss covers (the paper's code)
    token_selection: str = field(
        default="all",
        metadata={
            "help": "Tokens the loss covers: `all`, or `critical` "
            "(GCPO's ~30%% critical tokens, as the paper's code).",
            "choices": list(TOKEN_SELECTIONS),
        },
    )
    critical_first_fraction: float = field(
        default=0.1, metadata={"help": "Critical tokens: fraction of first positions always trained on."}
    )
    critical_entropy_fraction: float = field(
        default=0.1, metadata={"help": "Critical tokens: fraction chosen by the largest spatial entropy gradient."}
    )
    critical_similarity_fraction: float = field(
        default=0.1,
        metadata={"help": "Critical tokens: fraction of positions where the group's images are least alike."},
    )
    critical_window_end: float = field(
        default=0.9, metadata={"help": "Critical tokens: end of the entropy rule's window (fraction of positions)."}
    )
    dynamic_advantage: bool = field(
        default=False,
        metadata={"help": "Weight the policy-gradient term by the running mean of exp(clamped log π/π_ref)."},
    )
    dynamic_advantage_clamp: float = field(
        default=0.5, metadata={"help": "Clamp of the log-ratio in the dynamic-advantage weight."}
    )

    # Parameters that control generation
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Cut captions longer than this many prompt tokens (with a warning); default: refuse captions "
            "longer than the model takes, naming their line."
        },
    )
    cfg_scale: float = field(
        default=5.0,
        metadata={"help": "Classifier-free guidance scale of the sampler (1.0 disables guidance)."},
    )
    cfg_logprobs: str = field(
        default="guided",
        metadata={
            "help": "Distribution used for the policy gradient and the divergence: `guided` (on-policy) or "
            "`conditional` (cond branch only; off-policy when cfg_scale != 1).",
            "choices": list(CFG_LOGPROBS),
        },
    )
    merge_adapters_for_rollouts: bool = field(
        default=True,
        metadata={"help": "Fold LoRA into the base weights while sampling (restored exactly afterwards)."},
    )
    compile_rollouts: str = field(
        default="auto",
        metadata={
            "help": "Sample with a static KV cache and a torch.compile'd decode step (CUDA graphs on GPU): `auto` (on "
            "CUDA), `true` or `false`."
        },
    )

    # Parameters that correct for the sampler's numerics
    sampler_correction: bool = field(
        default=False,
        metadata={"help": "Weigh each token by the truncated importance ratio π_old/π_sampler (bf16 numerics)."},
    )
    sampler_correction_mode: str = field(
        default="token_truncate",
        metadata={
            "help": "How the ratio is bounded: token_truncate, token_mask, sequence_truncate or sequence_mask.",
            "choices": list(SAMPLER_CORRECTION_MODES),
        },
    )
    sampler_correction_clip_max: float = field(
        default=2.0, metadata={"help": "Upper bound of the sampler-correction importance ratio."}
    )
    sampler_correction_clip_min: float | None = field(
        default=None, metadata={"help": "Lower bound of the sampler-correction importance ratio."}
    )

    # Parameters that control what a run does when training goes non-finite
    skip_nonfinite_steps: int = field(
        default=0,
        metadata={
            "help": "How many optimizer steps with a NaN/inf loss term or gradient to skip (with a warning) before "
            "stopping the run; 0: stop at the first."
        },
    )

    # Parameters that control logging
    image_log_steps: int = field(
        default=50,
        metadata={"help": "Log a captioned image grid every this many optimizer steps (0 disables it)."},
    )
    image_log_count: int = field(
        default=16,
        metadata={"help": "Number of images in each logged grid."},
    )

    # Parameters that control the over-optimisation alarm
    overoptimization_window: int = field(
        default=3,
        metadata={"help": "Evaluations the over-optimisation alarm looks back over (>= 2; 0: no alarm)."},
    )
    overoptimization_threshold: float = field(
        default=0.5,
        metadata={
            "help": "Alarm when the trained reward rises while a watched reward or the diversity falls by more than "
            "this many standard deviations over the window."
        },
    )

    # Parameters that control what a run does when a reward stops scoring
    max_unscored_steps: int = field(
        default=10,
        metadata={"help": "Stop the run after this many steps in a row in which a reward scores no image (None/NaN)."},
    )

    # Overridden defaults of GRPOConfig
    beta: float = field(
        default=0.04,
        metadata={
            "help": "Coefficient of the divergence penalty (initial value when `beta_schedule` is not constant)."
        },
    )
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Disable dropout so that sampling, old, reference and policy log-probs agree."},
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated alias of `activation_checkpointing` (on by default, as in TRL)."},
    )
    max_completion_length: int | None = field(
        default=None,
        metadata={"help": "Image tokens per image: leave unset, the trainer takes it from the model."},
    )

    def __post_init__(self):
        # TRL defaults the deprecated alias `gradient_checkpointing` to True, which warns on every run; default the
        # new name instead, and let an explicit alias still take effect (with transformers' warning).
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        self._validate_numbers()  # first: every comparison below is False for NaN, so it would pass them
        super().__post_init__()
        self._validate_choices()
        self._validate_divergence()
        self._validate_generation()
        self._validate_token_selection()
        self._validate_overoptimization()
        if self.max_unscored_steps < 1:
            raise ValueError(f"`max_unscored_steps` must be >= 1, got {self.max_unscored_steps}.")
        for name, off_value, reason in UNSUPPORTED_SETTINGS:
            if getattr(self, name, off_value) != off_value:
                raise ValueError(
                    f"`{name}={getattr(self, name)!r}` is not supported by T2IGRPOTrainer: {reason}. "
                    f"Leave it at its default ({off_value!r})."
                )

    def _validate_numbers(self):
        for setting in fields(self):
            value = getattr(self, setting.name)
            if not isinstance(value, float):
                continue
            if math.isnan(value) or (math.isinf(value) and setting.name in FINITE_SETTINGS):
                raise ValueError(f"`{setting.name}={value}`: {setting.name} must be a finite number.")

    def _validate_choices(self):
        for name, choices in [
            ("divergence", sorted(DIVERGENCES)),
            ("divergence_estimator", DIVERGENCE_ESTIMATORS),
            ("divergence_in", DIVERGENCE_IN),
            ("beta_schedule", BETA_SCHEDULES),
            ("token_selection", TOKEN_SELECTIONS),
            ("cfg_logprobs", CFG_LOGPROBS),
            ("sampler_correction_mode", SAMPLER_CORRECTION_MODES),
        ]:
            if getattr(self, name) not in choices:
                raise ValueError(f"Unknown {name} {getattr(self, name)!r}. Valid choices: {', '.join(choices)}.")

    def _validate_divergence(self):
        if self.divergence_alpha is not None and self.divergence != "alpha":
            raise ValueError(
                f"`divergence_alpha={self.divergence_alpha}` only applies to `divergence='alpha'`, "
                f"not {self.divergence!r}."
            )
        get_divergence(self.divergence, alpha=self.divergence_alpha)  # its parameters, with its own messages
        if (
            self.divergence_in == "reward"
            and self.divergence_estimator == "sampled"
            and not self.use_bias_correction_kl
        ):
            raise ValueError(
                "`divergence_in='reward'` adds the prefix term to a per-token penalty whose gradient is the "
                "position's divergence gradient; the sampled estimator has that gradient only with "
                "`use_bias_correction_kl=True` (or use `divergence_estimator='exact'`)."
            )
        if self.beta < 0 or (self.beta_end is not None and self.beta_end < 0):
            raise ValueError(f"`beta` and `beta_end` must be >= 0, got beta={self.beta}, beta_end={self.beta_end}.")
        ramps = self.beta_schedule in ("linear", "cosine")
        if not ramps and self.beta_end is not None:
            raise ValueError(
                f"`beta_end={self.beta_end}` has no effect with `beta_schedule={self.beta_schedule!r}`; "
                "use beta_schedule='linear' or 'cosine', or drop beta_end."
            )
        if ramps and self.beta_end is None:
            raise ValueError(f"`beta_schedule={self.beta_schedule!r}` needs `beta_end` (the final beta).")
        adaptive = self.beta_schedule == "adaptive"
        if adaptive != (self.divergence_target is not None):
            raise ValueError(
                f"`divergence_target={self.divergence_target}` goes with `beta_schedule='adaptive'` and only with it "
                f"(got beta_schedule={self.beta_schedule!r})."
            )
        if adaptive and not (0 < self.beta_min <= self.beta <= self.beta_max and self.divergence_target > 0):
            raise ValueError(
                f"The adaptive schedule needs 0 < beta_min <= beta <= beta_max and divergence_target > 0, got "
                f"beta_min={self.beta_min}, beta={self.beta}, beta_max={self.beta_max}, "
                f"divergence_target={self.divergence_target}."
            )

    @property
    def sampling(self) -> SamplingConfig:
        """The distribution images are sampled from and scored under: guidance, temperature, top-k, top-p."""
        return SamplingConfig(self.cfg_scale, self.temperature, self.top_k, self.top_p)

    @property
    def needs_reference(self) -> bool:
        """Whether training scores a reference even without adapters (where it is free): a penalty at some point of
        the β schedule, or the dynamic-advantage weight. Full fine-tuning then holds a frozen copy of the model."""
        return self.beta > 0 or (self.beta_end or 0) > 0 or self.dynamic_advantage

    def _validate_token_selection(self):
        fractions = {
            name: getattr(self, name)
            for name in ("critical_first_fraction", "critical_similarity_fraction", "critical_window_end")
        }
        if not all(0 <= value <= 1 for value in fractions.values()) or self.critical_entropy_fraction < 0:
            raise ValueError(
                f"Critical-token fractions must lie in [0, 1], got {fractions} and "
                f"critical_entropy_fraction={self.critical_entropy_fraction}."
            )
        if self.critical_window_end < self.critical_first_fraction:
            raise ValueError("`critical_window_end` must not lie before `critical_first_fraction`.")
        if self.dynamic_advantage_clamp <= 0:
            raise ValueError(f"`dynamic_advantage_clamp` must be > 0, got {self.dynamic_advantage_clamp}.")

    def _validate_generation(self):
        self.sampling  # noqa: B018 -- validates the four fields with SamplingConfig's messages
        self.compile_rollouts = compile_setting(self.compile_rollouts)
        low, high = self.sampler_correction_clip_min, self.sampler_correction_clip_max
        if not (0 < high and (low is None or 0 <= low < high)):
            raise ValueError(
                "The sampler-correction bounds must satisfy 0 <= sampler_correction_clip_min < "
                f"sampler_correction_clip_max, got {low} and {high}."
            )
        if self.sampler_correction and self.loss_type == "vespo":
            raise ValueError(
                "`sampler_correction=True` weighs the policy-gradient term, which loss_type='vespo' computes from "
                "the importance ratio itself; use another loss_type or leave sampler_correction off."
            )
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"`max_prompt_length` must be >= 1 (or unset), got {self.max_prompt_length}.")
        if self.skip_nonfinite_steps < 0:
            raise ValueError(
                f"`skip_nonfinite_steps` must be >= 0 (0: stop at the first), got {self.skip_nonfinite_steps}."
            )
        if self.image_log_steps < 0 or self.image_log_count < 1:
            raise ValueError(
                f"`image_log_steps` must be >= 0 and `image_log_count` >= 1, got {self.image_log_steps} and "
                f"{self.image_log_count}."
            )

    def _validate_overoptimization(self):
        window, threshold = self.overoptimization_window, self.overoptimization_threshold
        if not (window == 0 or window >= 2) or not threshold > 0:
            raise ValueError(
                "`overoptimization_window` must be 0 (no alarm) or at least 2 evaluations, and "
                f"`overoptimization_threshold` > 0; got {window} and {threshold}."
            )
