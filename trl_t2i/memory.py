"""An arithmetic model of the GPU memory of GRPO training of an image-token model (Janus-Pro, LlamaGen-T2I).

`estimate(architecture, setup)` itemises what one process holds, in bytes, and says in which phases of a training
step each item is live. The phases follow one another and their transient memory does not coexist, so the peak is
the largest phase total, not the sum of the items:

* `sampling`: the KV-cached CFG decode of the whole generation batch (`sampling.sample_image_tokens`);
* `decoding`: the VQ decoder turning those image tokens into pixels, a micro-batch at a time (`family.decode`);
* `rewards`: the reward model scoring the images;
* `scoring`: the no-gradient teacher-forced passes of the rollout (TRL's old log-probs, the sampled estimator's
  reference log-probs), one micro-batch at a time;
* `loss`: a training micro-batch's forward, the divergence penalty and the backward through the `(B, N, V)` tables;
* `backward`: the backward through the language model (a checkpointed layer recomputed at a time).

The first four make up the rollout, the last two the training step. The numbers are estimates of what PyTorch
allocates (`torch.cuda.max_memory_allocated` plus the CUDA context); allocator fragmentation and tensors of a few
tens of megabytes at most (masks, per-token log-probs, the sampler's per-step logits) are not modelled. See
`docs/memory.md` for the formulas, the recipes' tables and what was measured.
"""

import math
from dataclasses import dataclass, field

from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, T5Config

from . import divergences
from .models.base import static_cache_length
from .models.cache import SPARE_POSITIONS
from .models.llamagen import LlamaGenConfig


GB = 1e9

SAMPLING, DECODING, REWARDS, SCORING, LOSS, BACKWARD = "sampling", "decoding", "rewards", "scoring", "loss", "backward"
ROLLOUT_PHASES = (SAMPLING, DECODING, REWARDS, SCORING)
TRAINING_PHASES = (LOSS, BACKWARD)
PHASES = ROLLOUT_PHASES + TRAINING_PHASES

CUDA_CONTEXT_BYTES = 0.5 * GB
"""The CUDA context and kernels of one process: outside PyTorch's allocator, but counted by `nvidia-smi`."""

ZERO3_MAX_LIVE_PARAMETERS = 10**9
"""DeepSpeed's default `stage3_max_live_parameters`: the most parameters ZeRO-3 keeps gathered during a forward."""

NF4_BLOCK = 64
"""bitsandbytes quantizes 4-bit weights in blocks of 64 values, each with its own scale (absmax)."""

NESTED_BLOCK = 256
"""With double quantization, the 8-bit absmax values are themselves scaled in blocks of 256 (one fp32 each)."""

EXACT_PENALTY_TABLES = 4
"""`(B, N, V)` fp32 tables alive at the exact penalty's peak, the start of its backward: the policy's log-prob table,
the reference's (saved for the backward), the penalty's gradient and the gradient of the per-token gather. The
divergence's own intermediates live one chunk at a time (`EXACT_CHUNK_TEMPORARIES`). Recounted by
`tests/test_memory.py`, which fails when the code they describe changes."""

EXACT_CHUNK_TEMPORARIES = 12
"""Most chunk-sized temporaries `Divergence.exact_penalty` keeps at once (Jensen–Shannon's, the most; each chunk is
`divergences.EXACT_ROWS_PER_CHUNK` positions × the codebook, fp32)."""

POLICY_ENTROPY_TABLES = 4.25
"""`(B, N, V)` fp32 tables the entropy of the policy forward adds at its peak: TRL's loss asks for it
(`compute_entropy=True`) and `sampling.position_entropy` computes it with gradient from the log-prob table, next to
the logits and that table: a log-softmax, its exponential, the `p > 0` mask (1 byte an entry, ¼ table), the masked
log-probs and their product. Freed with the entropy when TRL's loss returns, before the penalty."""


@dataclass(frozen=True)
class Architecture:
    """The sizes of a text-to-image model that its memory depends on.

    The language model (LM) is a Llama-style decoder; everything else is counted in parameters. Janus-Pro fills
    the vision (understanding) fields, LlamaGen-T2I the caption fields.

    Args:
        name (`str`):
            Name shown in the tables.
        hidden_size (`int`), num_layers (`int`), num_heads (`int`), num_kv_heads (`int`), head_dim (`int`),
        intermediate_size (`int`):
            The LM decoder: width, layers, query and key/value heads, head width and SwiGLU width.
        text_vocab_size (`int`):
            Rows of the LM's text embedding (Janus); `0` when there is none (LlamaGen).
        tie_word_embeddings (`bool`):
            Whether `lm_head` shares the text embedding's weights (else it is a second `text_vocab_size × hidden`
            matrix).
        codebook_size (`int`):
            Image-token vocabulary `V`: the width of the image head's logits.
        num_image_tokens (`int`):
            Tokens per image `N`.
        prompt_length (`int`):
            Prompt positions `P` before the first image token (prompts are left-padded to the longest in a batch).
        static_prompt_length (`int` or `None`):
            The prompt positions of the compiled decode's static cache, when not `prompt_length` (LlamaGen pads every
            caption to `caption_length` there).
        vision_tower_params (`int`), vision_aligner_params (`int`):
            Janus' understanding encoder (SigLIP) and its aligner: loaded, never run by image generation.
        caption_encoder_params (`int`), caption_aligner_params (`int`):
            LlamaGen's frozen T5 encoder and its caption MLP.
        generation_embedding_params (`int`), generation_aligner_params (`int`), generation_head_params (`int`):
            The image-token input embedding (Janus: `generation_embeddings`; LlamaGen: `transformer.embed_tokens`),
            Janus' `generation_aligner` and the image head (Janus: `generation_head`; LlamaGen: `image_head`).
        generation_head_width (`int`):
            Hidden width of a two-layer image head (Janus' `generation_head.proj_out`); `0` for a single linear.
        vq_params (`int`), vq_decoder_params (`int`):
            The VQ-VAE (encoder, codebook, decoder), and its decoder part (`post_quant_conv` and the decoder).
        vq_decodes_in_fp32 (`bool`):
            Whether the VQ decoder runs in fp32 whatever the model's dtype (LlamaGen, as its reference code does: its
            VQ model keeps fp32 weights in a bf16 model, or decodes on fp32 copies where DeepSpeed cast them down);
            else in the weights' dtype (Janus). Never under autocast.
        vq_decoder_channels (`int`), image_size (`int`):
            Channels of the VQ decoder's last (full-resolution) level and pixels per image side: its largest
            activations.
        frozen_components (`tuple[str, ...]`):
            Components (keys of `components()`) that never train, even in full fine-tuning.
    """

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    text_vocab_size: int
    tie_word_embeddings: bool
    codebook_size: int
    num_image_tokens: int
    prompt_length: int
    static_prompt_length: int | None = None
    vision_tower_params: int = 0
    vision_aligner_params: int = 0
    caption_encoder_params: int = 0
    caption_aligner_params: int = 0
    generation_embedding_params: int = 0
    generation_aligner_params: int = 0
    generation_head_params: int = 0
    generation_head_width: int = 0
    vq_params: int = 0
    vq_decoder_params: int = 0
    vq_decodes_in_fp32: bool = False
    vq_decoder_channels: int = 0
    image_size: int = 0
    frozen_components: tuple[str, ...] = ()

    @classmethod
    def from_janus_config(cls, config: JanusConfig, name: str = "Janus", prompt_length: int = 32) -> "Architecture":
        """The architecture of `JanusForConditionalGeneration(config)`, its parameters counted from the config."""
        text, vision, vq = config.text_config, config.vision_config, config.vq_config
        return cls(
            name=name,
            hidden_size=text.hidden_size,
            num_layers=text.num_hidden_layers,
            num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            intermediate_size=text.intermediate_size,
            text_vocab_size=text.vocab_size,
            tie_word_embeddings=config.tie_word_embeddings,
            codebook_size=vq.num_embeddings,
            num_image_tokens=vision.num_image_tokens,
            prompt_length=prompt_length,
            vision_tower_params=_siglip_params(vision),
            vision_aligner_params=_mlp_params(vision.hidden_size, vision.projection_dim, vision.depth),
            generation_embedding_params=vq.num_embeddings * vq.embed_dim,
            generation_aligner_params=_mlp_params(vq.embed_dim, vq.projection_dim, vq.num_hidden_layers),
            generation_head_params=_linear(vq.image_token_embed_dim, vq.projection_dim)
            + _linear(vq.projection_dim, vq.num_embeddings),
            generation_head_width=vq.projection_dim,
            vq_params=_vqvae_params(vq),
            vq_decoder_params=_vq_decoder_params(vq),
            vq_decoder_channels=vq.base_channels * vq.channel_multiplier[0],
            image_size=vq.num_patches * 2 ** (len(vq.channel_multiplier) - 1),
        )

    @classmethod
    def from_llamagen_config(
        cls, config: LlamaGenConfig, name: str = "LlamaGen-T2I", prompt_length: int = 24
    ) -> "Architecture":
        """The architecture of `LlamaGenForImageGeneration(config)`, its parameters counted from the config."""
        vq = config.vq_config
        return cls(
            name=name,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_attention_heads,  # LlamaGen's T2I models use no grouped-query attention
            head_dim=config.hidden_size // config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            text_vocab_size=0,
            tie_word_embeddings=False,
            codebook_size=config.codebook_size,
            num_image_tokens=config.num_image_tokens,
            prompt_length=prompt_length,
            static_prompt_length=config.caption_length,
            caption_encoder_params=_t5_encoder_params(config.text_encoder_config),
            caption_aligner_params=(config.caption_dim + config.hidden_size) * config.hidden_size,  # fc1, fc2
            generation_embedding_params=config.codebook_size * config.hidden_size,
            generation_head_params=config.hidden_size * config.codebook_size,  # no bias
            vq_params=_vqvae_params(vq),
            vq_decoder_params=_vq_decoder_params(vq),
            vq_decodes_in_fp32=True,
            vq_decoder_channels=vq.base_channels * vq.channel_multiplier[0],
            image_size=vq.num_patches * 2 ** (len(vq.channel_multiplier) - 1),
            frozen_components=("caption encoder", "VQ-VAE"),
        )

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def lm_linear_shapes(self) -> dict[str, tuple[int, int]]:
        """`(in_features, out_features)` of the linears of one LM layer: what LoRA adapts and 4-bit quantizes."""
        h, m = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_width),
            "k_proj": (h, self.kv_width),
            "v_proj": (h, self.kv_width),
            "o_proj": (self.q_width, h),
            "gate_proj": (h, m),
            "up_proj": (h, m),
            "down_proj": (m, h),
        }

    @property
    def lm_linear_params(self) -> int:
        """Parameters of every LM linear (no biases in Llama-style decoders)."""
        return self.num_layers * sum(i * o for i, o in self.lm_linear_shapes().values())

    def components(self) -> dict[str, int]:
        """Parameters per component (no tied weight counted twice)."""
        lm_norms = (2 * self.num_layers + 1) * self.hidden_size  # two RMSNorms per layer and the final one
        text_embeddings = self.text_vocab_size * self.hidden_size
        components = {
            "LM linears": self.lm_linear_params,
            "LM norms": lm_norms,
            "text embeddings": text_embeddings,
            "lm_head": 0 if self.tie_word_embeddings else text_embeddings,
            "vision tower": self.vision_tower_params,
            "vision aligner": self.vision_aligner_params,
            "caption encoder": self.caption_encoder_params,
            "caption aligner": self.caption_aligner_params,
            "generation embeddings": self.generation_embedding_params,
            "generation aligner": self.generation_aligner_params,
            "generation head": self.generation_head_params,
            "VQ-VAE": self.vq_params,
        }
        return {name: params for name, params in components.items() if params}

    @property
    def num_params(self) -> int:
        return sum(self.components().values())

    def lora_params(self, r: int) -> int:
        """LoRA parameters of rank `r` on every LM linear: `r·(in + out)` each."""
        return self.num_layers * sum(r * (i + o) for i, o in self.lm_linear_shapes().values())


def janus_pro_1b_config() -> JanusConfig:
    """The `JanusConfig` of Janus-Pro-1B as transformers converts it (`deepseek-community/Janus-Pro-1B`)."""
    # The HF-format text config of Janus-Pro-1B, as in the config.json of hf-internal-testing/tiny-processor-janus, a
    # copy of the converted model's; transformers' convert_janus_weights_to_hf.py reads them from
    # deepseek-ai/Janus-Pro-1B's "language_config".
    return _janus_pro_config(width=2048, mlp_width=5632, num_layers=24, num_heads=16)


def janus_pro_7b_config() -> JanusConfig:
    """The `JanusConfig` of Janus-Pro-7B as transformers converts it (`deepseek-community/Janus-Pro-7B`)."""
    # deepseek-ai/Janus-Pro-7B config.json (as copied by fine-tunes such as YhangChen/iris-step200): its
    # "language_config" sets 30 layers and the 102400 vocabulary and keeps LlamaConfig's width 4096, SwiGLU 11008 and
    # 32 heads of 128. In bf16 these weights are 14.82 GB, the size of its two weight files (9.99 + 4.85 GB).
    return _janus_pro_config(width=4096, mlp_width=11008, num_layers=30, num_heads=32)


def _janus_pro_config(width: int, mlp_width: int, num_layers: int, num_heads: int) -> JanusConfig:
    text_config = {
        "model_type": "llama",
        "hidden_size": width,
        "intermediate_size": mlp_width,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "vocab_size": 102400,
    }
    # The conversion sets the vision aligner's `projection_dim`/`depth` from "aligner_config" (n_embed = width,
    # depth 2) and the VQ sizes from "gen_vision_config"/"gen_aligner_config"/"gen_head_config" (16384 codes of
    # dimension 8, n_embed = width); everything else is JanusVisionConfig / JanusVQVAEConfig's defaults (SigLIP-L/16
    # at 384 px, VQ-16). The checkpoints hold `language_model.lm_head.weight` apart from the text embedding
    # (DeepSeek-LLM does not tie them), so transformers keeps both whatever `tie_word_embeddings` says.
    return JanusConfig(
        text_config=text_config,
        vision_config={"projection_dim": width, "depth": 2},
        vq_config={"embed_dim": 8, "num_embeddings": 16384, "projection_dim": width, "image_token_embed_dim": width},
        tie_word_embeddings=False,
    )


def janus_pro_1b(prompt_length: int = 32) -> Architecture:
    """Janus-Pro-1B. `prompt_length`: Janus' chat template with BOS and `<begin_of_image>` puts the longest
    `simple_scenes` caption (13 words) at about 25 tokens; prompts are padded to the longest of a batch."""
    return Architecture.from_janus_config(janus_pro_1b_config(), name="Janus-Pro-1B", prompt_length=prompt_length)


def janus_pro_7b(prompt_length: int = 32) -> Architecture:
    """Janus-Pro-7B; `prompt_length` as for `janus_pro_1b`."""
    return Architecture.from_janus_config(janus_pro_7b_config(), name="Janus-Pro-7B", prompt_length=prompt_length)


def llamagen_t2i_xl(prompt_length: int = 24) -> Architecture:
    """LlamaGen-T2I GPT-XL at 256 px with FLAN-T5-XL (`LlamaGenConfig`'s defaults, `trl-t2i convert_llamagen`).

    `prompt_length`: T5 tokens of the longest `simple_scenes` caption with its end token, about 18 (at most
    `caption_length` = 120).
    """
    return Architecture.from_llamagen_config(LlamaGenConfig(), name="LlamaGen-T2I-XL", prompt_length=prompt_length)


# ---------------------------------------------------------------------------------------------- parameter counts


def _linear(in_features: int, out_features: int, bias: bool = True) -> int:
    return in_features * out_features + (out_features if bias else 0)


def _mlp_params(in_features: int, width: int, depth: int) -> int:
    """Janus' aligner MLPs: `in → width`, then `depth − 1` layers `width → width`, all with biases."""
    return _linear(in_features, width) + (depth - 1) * _linear(width, width)


def _siglip_params(vision: JanusVisionConfig) -> int:
    """`JanusVisionModel`: patch embedding, position embedding, pre-norm ViT layers, final LayerNorm."""
    h = vision.hidden_size
    patches = (vision.image_size // vision.patch_size) ** 2
    mlp = int(h * vision.mlp_ratio)
    embeddings = vision.num_channels * h * vision.patch_size**2 + h + patches * h  # conv with bias, positions
    attention = 3 * _linear(h, h, vision.attention_bias) + _linear(h, h)  # q, k, v and the output projection
    qk_norms = 4 * h if vision.use_qk_norm else 0
    layer = 2 * 2 * h + attention + qk_norms + _linear(h, mlp) + _linear(mlp, h)  # two LayerNorms, attention, MLP
    return embeddings + vision.num_hidden_layers * layer + 2 * h


def _conv(in_channels: int, out_channels: int, kernel: int) -> int:
    return in_channels * out_channels * kernel**2 + out_channels


def _resnet_block(in_channels: int, out_channels: int) -> int:
    """Two GroupNorms and 3×3 convolutions, and a 1×1 shortcut when the width changes."""
    shortcut = _conv(in_channels, out_channels, 1) if in_channels != out_channels else 0
    return (
        2 * in_channels
        + _conv(in_channels, out_channels, 3)
        + 2 * out_channels
        + _conv(out_channels, out_channels, 3)
        + shortcut
    )


def _attention_block(channels: int) -> int:
    return 2 * channels + 4 * _conv(channels, channels, 1)  # GroupNorm, q, k, v, proj_out


def _mid_block(channels: int) -> int:
    return 2 * _resnet_block(channels, channels) + _attention_block(channels)


def _vqvae_params(vq: JanusVQVAEConfig) -> int:
    """`JanusVQVAE` (LlamaGen's VQ-16): encoder, codebook, quant convolutions, decoder."""
    channels = [vq.base_channels * multiplier for multiplier in vq.channel_multiplier]
    levels = len(channels)

    encoder, block_in = _conv(vq.in_channels, vq.base_channels, 3), vq.base_channels
    for level, block_out in enumerate(channels):
        for _ in range(vq.num_res_blocks):
            encoder += _resnet_block(block_in, block_out) + (_attention_block(block_out) if level == levels - 1 else 0)
            block_in = block_out
        encoder += _conv(block_out, block_out, 3) if level < levels - 1 else 0  # downsampling
    latent_out = 2 * vq.latent_channels if vq.double_latent else vq.latent_channels
    encoder += _mid_block(block_in) + 2 * block_in + _conv(block_in, latent_out, 3)

    codebook = vq.num_embeddings * vq.embed_dim
    return encoder + codebook + _conv(vq.latent_channels, vq.embed_dim, 1) + _vq_decoder_params(vq)


def _vq_decoder_params(vq: JanusVQVAEConfig) -> int:
    """`JanusVQVAE`'s `post_quant_conv` and decoder: what decoding image tokens runs."""
    channels = [vq.base_channels * multiplier for multiplier in vq.channel_multiplier]
    levels = len(channels)
    decoder, block_in = _conv(vq.latent_channels, channels[-1], 3) + _mid_block(channels[-1]), channels[-1]
    for level in reversed(range(levels)):
        for _ in range(vq.num_res_blocks + 1):
            decoder += _resnet_block(block_in, channels[level])
            decoder += _attention_block(channels[level]) if level == levels - 1 else 0
            block_in = channels[level]
        decoder += _conv(block_in, block_in, 3) if level > 0 else 0  # upsampling
    decoder += 2 * block_in + _conv(block_in, vq.out_channels, 3)
    return _conv(vq.embed_dim, vq.latent_channels, 1) + decoder


def _t5_encoder_params(t5: T5Config) -> int:
    """`T5EncoderModel`: shared embedding, blocks of self-attention and (gated) feed-forward, final norm."""
    inner = t5.num_heads * t5.d_kv
    feed_forward = (3 if t5.is_gated_act else 2) * t5.d_model * t5.d_ff  # wi_0, wi_1, wo (no biases)
    block = 4 * t5.d_model * inner + feed_forward + 2 * t5.d_model  # q, k, v, o, and two RMS norms
    relative_bias = t5.relative_attention_num_buckets * t5.num_heads  # first block only
    return t5.vocab_size * t5.d_model + t5.num_layers * block + relative_bias + t5.d_model


# ---------------------------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class TrainingSetup:
    """How one process trains: what it holds and how large each batch is.

    Args:
        rollout_images (`int`):
            Images one process samples per generation batch (`per_device_train_batch_size × steps_per_generation`),
            all in one KV-cached batch: with CFG each takes two rows of the cache.
        micro_batch (`int`):
            Images per training micro-batch (`per_device_train_batch_size`), also the chunk of the rollout's VQ
            decoding and scoring passes.
        weight_dtype (`str`, *optional*, defaults to `"bfloat16"`):
            `"bfloat16"` or `"float32"`: the dtype of the weights that are not quantized.
        load_in_4bit (`bool`, *optional*, defaults to `False`):
            NF4 weights for the LM linears; every other module stays in `weight_dtype` (the families'
            `quantization_skip_modules`, and embeddings, which bitsandbytes never quantizes).
        double_quant (`bool`, *optional*, defaults to `False`):
            bitsandbytes' nested quantization of the 4-bit scales.
        lora_r (`int` or `None`, *optional*, defaults to `None`):
            LoRA rank on every LM linear; `None` is full fine-tuning.
        mixed_precision (`bool`, *optional*, defaults to `True`):
            bf16 autocast (`bf16: true`): activations in bf16, normalisations in fp32. `False` runs everything in
            `weight_dtype` (a CPU check in fp32).
        guided_sampling (`bool`, *optional*, defaults to `True`):
            `cfg_scale != 1`: an unconditional row per image while sampling.
        guided_scoring (`bool`, *optional*, defaults to `True`):
            Training scores the guided distribution (`cfg_logprobs="guided"` with guidance): both rows again.
        activation_checkpointing (`bool`, *optional*, defaults to `True`):
            Keep only each LM layer's input for the backward and recompute the layer there.
        divergence_estimator (`str`, *optional*, defaults to `"exact"`):
            The penalty's estimator; the exact one scores the reference over the whole codebook inside the training
            step (its memory is the same for every divergence).
        reference (`bool`, *optional*, defaults to `True`):
            Whether a reference is scored (always with adapters; with full fine-tuning only for a penalty, and then
            a frozen copy of the weights is held too).
        old_logps (`bool`, *optional*, defaults to `False`):
            TRL re-scores the rollout for the importance ratio (`gradient_accumulation_steps` not a multiple of
            `steps_per_generation × num_iterations`).
        grads_during_rollout (`bool`, *optional*, defaults to `False`):
            Gradients are being accumulated while a rollout runs (`steps_per_generation × num_iterations <
            gradient_accumulation_steps`).
        num_processes (`int`, *optional*, defaults to `1`), zero_stage (`int`, *optional*, defaults to `0`):
            Processes and DeepSpeed ZeRO stage (`0`: one GPU or DDP; `2`: gradients and optimizer sharded; `3`:
            weights too, gathered whole for generation as `ds3_gather_for_generation: true` asks).
        reward (`str` or `None`, *optional*, defaults to `"hpsv2"`):
            A key of `REWARD_MODELS`; `None` (or a reward without a model) holds nothing.
        reward_batch_size (`int`, *optional*, defaults to `32`):
            Images per reward forward (`ModelReward`'s default).
        compiled_rollouts (`bool`, *optional*, defaults to `True`):
            Rollouts decode compiled (`compile_rollouts: auto` on a GPU): the static KV cache holds the prompt and the
            image rounded up to a multiple of 64 positions, and stays allocated between rollouts (in every phase),
            so that the compiled step's CUDA graph keeps its addresses.
    """

    rollout_images: int
    micro_batch: int
    weight_dtype: str = "bfloat16"
    load_in_4bit: bool = False
    double_quant: bool = False
    lora_r: int | None = None
    mixed_precision: bool = True
    guided_sampling: bool = True
    guided_scoring: bool = True
    activation_checkpointing: bool = True
    divergence_estimator: str = "exact"
    reference: bool = True
    old_logps: bool = False
    grads_during_rollout: bool = False
    num_processes: int = 1
    zero_stage: int = 0
    reward: str | None = "hpsv2"
    reward_batch_size: int = 32
    compiled_rollouts: bool = True

    def __post_init__(self):
        if self.weight_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"`weight_dtype` must be 'bfloat16' or 'float32', got {self.weight_dtype!r}.")
        if self.divergence_estimator not in ("exact", "sampled"):
            raise ValueError(
                f"`divergence_estimator` must be 'exact' or 'sampled', got {self.divergence_estimator!r}."
            )
        if self.zero_stage not in (0, 2, 3):
            raise ValueError(f"`zero_stage` must be 0, 2 or 3, got {self.zero_stage}.")

    @property
    def weight_bytes(self) -> int:
        return 2 if self.weight_dtype == "bfloat16" else 4

    @property
    def act_bytes(self) -> int:
        """Activations (and the KV cache): bf16 under autocast, else the weights' dtype."""
        return 2 if self.mixed_precision else self.weight_bytes

    @property
    def keeps_fp32_modules(self) -> bool:
        """Whether the modules a bf16 model keeps in fp32 stay so: the image head (`ModelFamily.upcast_image_head`)
        and a VQ model that decodes in fp32 (LlamaGen's, `_keep_in_fp32_modules_strict`, as its reference code keeps
        it). DeepSpeed casts the whole model to bf16 (and FSDP, not modelled, keeps one dtype)."""
        return self.zero_stage == 0


@dataclass(frozen=True)
class RewardModel:
    """A reward model's size, and the ViT shape its forward's activations follow.

    Args:
        params (`int`): Parameters (held in bf16 on CUDA, `ModelReward`'s default).
        image_tokens (`int`), width (`int`), mlp_width (`int`): Its vision tower's tokens per image and widths.
    """

    params: int
    image_tokens: int
    width: int
    mlp_width: int


REWARD_MODELS = {
    # open_clip ViT-H-14: vision 632,076,800 (32 blocks of width 1280, MLP 5120, 16×16 patches + class token at
    # 224 px) + text 354,032,640 (24 blocks of width 1024) + the logit scale; HPSv2.1 only fine-tunes the weights.
    "hpsv2": RewardModel(params=986_109_441, image_tokens=257, width=1280, mlp_width=5120),
}


@dataclass(frozen=True)
class MemoryItem:
    """One allocation (or a group of them) and the phases it is live in.

    Args:
        name (`str`): What it is, with the numbers that size it.
        bytes (`float`): Its size.
        phases (`tuple[str, ...]`): Where it is live (see the module docstring).
    """

    name: str
    bytes: float
    phases: tuple[str, ...] = PHASES


@dataclass
class MemoryEstimate:
    """The items of `estimate` and the peaks they add up to.

    Args:
        architecture (`Architecture`), setup (`TrainingSetup`): What was estimated.
        items (`list[MemoryItem]`): The allocations.
    """

    architecture: Architecture
    setup: TrainingSetup
    items: list[MemoryItem] = field(default_factory=list)

    def phase_total(self, phase: str) -> float:
        """Bytes live at the peak of `phase`."""
        return sum(item.bytes for item in self.items if phase in item.phases)

    @property
    def phases(self) -> tuple[str, ...]:
        """The phases this setup runs (`scoring` only when something is re-scored)."""
        return tuple(phase for phase in PHASES if phase != SCORING or rescores_rollout(self.setup))

    @property
    def rollout_peak(self) -> float:
        return max(self.phase_total(phase) for phase in ROLLOUT_PHASES if phase in self.phases)

    @property
    def training_peak(self) -> float:
        return max(self.phase_total(phase) for phase in TRAINING_PHASES)

    @property
    def peak(self) -> float:
        return max(self.rollout_peak, self.training_peak)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    def to_markdown(self) -> str:
        """The items (GB, and where they are live) and the total of each phase."""
        lines = ["| item | GB | live in |", "|---|---:|---|"]
        for item in self.items:
            live = [phase for phase in self.phases if phase in item.phases]
            phases = "all" if len(live) == len(self.phases) else ", ".join(live)
            lines.append(f"| {item.name} | {item.bytes / GB:.2f} | {phases} |")
        lines += ["", "| phase | total GB |", "|---|---:|"]
        lines += [f"| {phase} | {self.phase_total(phase) / GB:.2f} |" for phase in self.phases]
        lines += [
            "",
            f"Rollout peak {self.rollout_peak / GB:.1f} GB, training peak {self.training_peak / GB:.1f} GB: "
            f"**peak {self.peak / GB:.1f} GB** ({self.peak_phase}).",
        ]
        return "\n".join(lines)


def estimate(architecture: Architecture, setup: TrainingSetup) -> MemoryEstimate:
    """Itemised memory of one process training `architecture` as `setup` says (see the module docstring)."""
    items = [MemoryItem("CUDA context", CUDA_CONTEXT_BYTES)]
    items += _weight_items(architecture, setup)
    items += _training_state_items(architecture, setup)
    items += _rollout_items(architecture, setup)
    items += _training_items(architecture, setup)
    items += _working_weight_items(architecture, setup)
    return MemoryEstimate(architecture, setup, [item for item in items if item.bytes > 0])


def weight_bytes(architecture: Architecture, setup: TrainingSetup) -> dict[str, float]:
    """Bytes of each component's weights on one process (before any ZeRO-3 sharding)."""
    sizes = {name: params * setup.weight_bytes for name, params in architecture.components().items()}
    if setup.keeps_fp32_modules:
        sizes["generation head"] = architecture.generation_head_params * 4
    sizes["VQ-VAE"] = architecture.vq_params * vq_weight_bytes(architecture, setup)
    if setup.load_in_4bit:
        sizes["LM linears"] = architecture.num_layers * sum(
            nf4_bytes(i * o, setup.double_quant) for i, o in architecture.lm_linear_shapes().values()
        )
    return sizes


def nf4_bytes(params: int, double_quant: bool) -> float:
    """One weight in NF4: two values a byte, and a scale per block of 64 (fp32, or 8-bit with one fp32 per 256)."""
    blocks = math.ceil(params / NF4_BLOCK)
    scales = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) if double_quant else 4 * blocks
    return math.ceil(params / 2) + scales


def vq_weight_bytes(arch: Architecture, setup: TrainingSetup) -> int:
    """Bytes per VQ-VAE weight: 4 where a model that decodes in fp32 keeps its VQ model so (LlamaGen's, outside
    DeepSpeed), else the weights' own."""
    return 4 if arch.vq_decodes_in_fp32 and setup.keeps_fp32_modules else setup.weight_bytes


def _weight_items(arch: Architecture, setup: TrainingSetup) -> list[MemoryItem]:
    sizes = weight_bytes(arch, setup)
    shards = setup.num_processes if setup.zero_stage == 3 else 1
    dtype = "bf16" if setup.weight_bytes == 2 else "fp32"
    linears = f"NF4{' + double quant' if setup.double_quant else ''}" if setup.load_in_4bit else dtype
    sharded = f", ZeRO-3 shard 1/{shards}" if shards > 1 else ""
    groups = {
        f"LM layers ({arch.lm_linear_params / 1e9:.2f} B params; linears {linears}, norms {dtype})": [
            "LM linears",
            "LM norms",
        ],
        f"text embeddings and lm_head ({dtype})": ["text embeddings", "lm_head"],
        f"vision tower and aligner, unused by T2I ({dtype})": ["vision tower", "vision aligner"],
        f"T5 caption encoder and caption MLP ({dtype})": ["caption encoder", "caption aligner"],
        f"image embeddings, aligner ({dtype}) and head ({'fp32' if setup.keeps_fp32_modules else dtype})": [
            "generation embeddings",
            "generation aligner",
            "generation head",
        ],
        f"VQ-VAE ({'fp32' if vq_weight_bytes(arch, setup) == 4 else dtype})": ["VQ-VAE"],
    }
    items = [
        MemoryItem(f"weights: {name}{sharded}", sum(sizes.get(c, 0) for c in components) / shards)
        for name, components in groups.items()
    ]
    if setup.lora_r is None and setup.reference:  # full fine-tuning keeps a frozen copy for the penalty
        items.append(MemoryItem(f"reference: frozen copy of the weights{sharded}", sum(sizes.values()) / shards))
    return items


def trainable_params(arch: Architecture, setup: TrainingSetup) -> int:
    """LoRA's parameters, or every parameter of a component that trains."""
    if setup.lora_r is not None:
        return arch.lora_params(setup.lora_r)
    return sum(p for name, p in arch.components().items() if name not in arch.frozen_components)


def _training_state_items(arch: Architecture, setup: TrainingSetup) -> list[MemoryItem]:
    trainable = trainable_params(arch, setup)
    # PEFT keeps adapters in fp32 over bf16 weights; TRL casts them to bf16 over 4-bit weights and under ZeRO-3.
    lora_fp32 = not setup.load_in_4bit and setup.zero_stage != 3
    param_bytes = 4 if (setup.lora_r is not None and lora_fp32) else setup.weight_bytes
    training = TRAINING_PHASES + (ROLLOUT_PHASES if setup.grads_during_rollout else ())
    items = []
    if setup.lora_r is not None:
        items.append(
            MemoryItem(
                f"LoRA r={setup.lora_r} ({trainable / 1e6:.1f} M params, {param_bytes} B)", trainable * param_bytes
            )
        )
    if setup.zero_stage:
        shards = setup.num_processes
        # DeepSpeed keeps the gradients in flat partitioned buffers, and fp32 master weights next to Adam's moments.
        items.append(
            MemoryItem(f"gradients (ZeRO-{setup.zero_stage} shard 1/{shards})", trainable * param_bytes / shards)
        )
        items.append(MemoryItem(f"AdamW: fp32 master, m, v (shard 1/{shards})", trainable * 12 / shards))
        return items
    items.append(MemoryItem(f"gradients ({param_bytes} B)", trainable * param_bytes, training))
    items.append(MemoryItem(f"AdamW m, v ({param_bytes} B each)", 2 * trainable * param_bytes))  # `zeros_like(param)`
    if setup.num_processes > 1:  # DDP reduces gradients through buckets of its own
        items.append(MemoryItem("DDP gradient buckets", trainable * param_bytes, training))
    return items


def _rollout_items(arch: Architecture, setup: TrainingSetup) -> list[MemoryItem]:
    items = []
    if setup.zero_stage == 3:  # `ds3_gather_for_generation`: the whole policy is gathered to sample and decode
        gathered = sum(weight_bytes(arch, setup).values())
        items.append(MemoryItem("ZeRO-3: weights gathered for generation", gathered, (SAMPLING, DECODING)))
    rows = setup.rollout_images * (2 if setup.guided_sampling else 1)
    name = f"KV cache: {rows} rows × {kv_cache_positions(arch, setup)} positions × {arch.num_layers} layers"
    if setup.compiled_rollouts:  # the static cache of the compiled decode stays between rollouts
        items.append(MemoryItem(f"{name} (static, kept)", kv_cache_bytes(arch, setup)))
    else:
        items.append(MemoryItem(name, kv_cache_bytes(arch, setup), (SAMPLING,)))
    if folds_adapters(setup):
        originals = arch.lm_linear_params * setup.weight_bytes
        items.append(MemoryItem("LoRA folded: the LM linears' original weights, kept aside", originals, (SAMPLING,)))
        if setup.weight_bytes != 4:  # each fold is computed in fp32, one linear at a time
            largest = max(i * o for i, o in arch.lm_linear_shapes().values()) * 4
            items.append(MemoryItem("LoRA folded: one LM linear in fp32 while folding", largest, (SAMPLING,)))
    decoded = min(setup.micro_batch, setup.rollout_images)
    items.append(
        MemoryItem(f"VQ decoding, {decoded} images at a time", vq_decode_bytes(arch, setup, decoded), (DECODING,))
    )
    if arch.vq_decodes_in_fp32 and vq_weight_bytes(arch, setup) != 4:
        copies = arch.vq_decoder_params * 4
        items.append(MemoryItem("VQ decoder: fp32 copies of its weights while decoding", copies, (DECODING,)))
    reward = REWARD_MODELS.get(setup.reward)
    if reward is not None:
        items.append(
            MemoryItem(f"reward model: {setup.reward} ({reward.params / 1e6:.0f} M params, bf16)", 2 * reward.params)
        )
        batch = min(setup.reward_batch_size, setup.rollout_images)
        # a ViT block's residual, normed input, MLP hidden and its activation, in bf16
        activations = batch * reward.image_tokens * 2 * (2 * reward.width + 2 * reward.mlp_width)
        items.append(MemoryItem(f"reward forward: {batch} images", activations, (REWARDS,)))
    if rescores_rollout(setup):
        tables = scoring_forward_tables(arch, setup) * table_bytes(arch, setup)
        items.append(MemoryItem("rollout scoring: logits and log-prob tables", tables, (SCORING,)))
        layer = _layer_activation_bytes(arch, setup) * _scored_tokens(arch, setup)  # what a training forward keeps
        items.append(MemoryItem("rollout scoring: one LM layer's activations (at most)", layer, (SCORING,)))
    return items


def kv_cache_bytes(arch: Architecture, setup: TrainingSetup) -> int:
    """Keys and values of every layer for every sampled row, allocated once for the prompt and every image token
    (`PreallocatedCache`; compiled: the `StaticDecodeCache`, `kv_cache_positions`)."""
    rows = setup.rollout_images * (2 if setup.guided_sampling else 1)
    return arch.num_layers * 2 * rows * kv_cache_positions(arch, setup) * arch.kv_width * setup.act_bytes


def kv_cache_positions(arch: Architecture, setup: TrainingSetup) -> int:
    """Positions of the KV cache: the prompt and the image; compiled, rounded up as the static cache rounds them
    (`static_cache_length`), and the `SPARE_POSITIONS` it holds past them."""
    if not setup.compiled_rollouts:
        return arch.prompt_length + arch.num_image_tokens
    prompt_length = arch.static_prompt_length or arch.prompt_length
    return static_cache_length(prompt_length + arch.num_image_tokens) + SPARE_POSITIONS


def folds_adapters(setup: TrainingSetup) -> bool:
    """Whether sampling runs with LoRA folded into the LM linears, their originals copied aside
    (`merge_adapters_for_rollouts`, on by default): not over 4-bit weights, nor over ZeRO-3 shards."""
    return setup.lora_r is not None and not setup.load_in_4bit and setup.zero_stage != 3


def rescores_rollout(setup: TrainingSetup) -> bool:
    """Whether the rollout is teacher-forced again without gradient: TRL's old log-probs, or the reference's
    per-token log-probs that the sampled estimator needs."""
    return setup.old_logps or (setup.reference and setup.divergence_estimator == "sampled")


def vq_decode_bytes(arch: Architecture, setup: TrainingSetup, images: int | None = None) -> float:
    """Peak of the VQ decoder, in a ResNet block at full resolution: the block's input, and GroupNorm's output with
    the sigmoid of its SiLU, in the dtype the family decodes in (never under autocast: `ModelFamily.decode`)."""
    images = setup.rollout_images if images is None else images
    elements = arch.vq_decoder_channels * arch.image_size**2
    return images * elements * 3 * (4 if arch.vq_decodes_in_fp32 else setup.weight_bytes)


def table_bytes(arch: Architecture, setup: TrainingSetup) -> int:
    """One `(B, N, V)` fp32 table of a micro-batch: the unit of the scoring and penalty memory."""
    return setup.micro_batch * arch.num_image_tokens * arch.codebook_size * 4


def scoring_forward_tables(arch: Architecture, setup: TrainingSetup) -> float:
    """Peak tables of a teacher-forced scoring (`sampling.teacher_forced_logits`, then the trainer's
    `log_softmax`), in units of `table_bytes`: accelerate's fp32 copy of the head's logits next to them, or the
    logits, their fp32 copies in `token_logits` and the guidance temporaries; then the fp32 logits and their
    log-softmax."""
    logits, casts, cast_peak = _scored_logits(arch, setup)
    temporaries = 2 if setup.guided_scoring else 0  # l_u + s·(l_c − l_u): two temporaries alive at once
    return max(cast_peak, logits + casts + temporaries, 2)


def _scored_logits(arch: Architecture, setup: TrainingSetup) -> tuple[float, float, float]:
    """The image head's logits of a scored micro-batch, in tables: as the forward returns them (fp32, from
    `image_head_logits`), fp32 copies made after it (none), and the peak of the forward's own cast to fp32 when the
    head computes in bf16 (DeepSpeed's bf16 model: the bf16 logits and their fp32 copy)."""
    rows = 2 if setup.guided_scoring else 1  # rows per image
    if setup.keeps_fp32_modules:
        return rows, 0, 0
    return rows, 0, rows * setup.act_bytes / 4 + rows


def training_table_peaks(arch: Architecture, setup: TrainingSetup) -> dict[str, float]:
    """Peak tables of each stage of a training micro-batch, in units of `table_bytes`, in the order
    `T2IGRPOTrainer._compute_loss` runs them: the policy's scoring and its entropy, the reference's scoring (exact
    estimator), then the backward (the exact penalty's, then back through log-softmax and the guidance)."""
    forward = scoring_forward_tables(arch, setup)
    logits, _, _ = _scored_logits(arch, setup)
    # back through log_softmax and the guidance: the table, its gradient, and two slice gradients of the logits;
    # unguided, the gradients of the table's two gathers (TRL's log-probs and the penalty's), their sum and the table
    backward = 2 * logits + 2 if setup.guided_scoring else (4 if setup.reference else 3)
    peaks = {"policy": max(forward, 2 + POLICY_ENTROPY_TABLES)}  # the entropy, next to the fp32 logits and table
    if setup.divergence_estimator == "exact":
        peaks["reference"] = 1 + forward  # the reference scores while the policy's table is kept
        chunk = divergences.EXACT_ROWS_PER_CHUNK / (setup.micro_batch * arch.num_image_tokens)  # in tables
        backward = max(backward, EXACT_PENALTY_TABLES + EXACT_CHUNK_TEMPORARIES * chunk)
    peaks["backward"] = backward
    return peaks


def training_tables(arch: Architecture, setup: TrainingSetup) -> float:
    """Peak tables of the training step's scoring, penalty and their backward, in units of `table_bytes`."""
    return max(training_table_peaks(arch, setup).values())


def _scored_tokens(arch: Architecture, setup: TrainingSetup) -> int:
    """Positions of a teacher-forced micro-batch: the prompt and every image token but the last, per row."""
    rows = setup.micro_batch * (2 if setup.guided_scoring else 1)
    return rows * (arch.prompt_length + arch.num_image_tokens - 1)


def _layer_activation_bytes(arch: Architecture, setup: TrainingSetup) -> float:
    """Bytes per position that one LM layer keeps for its backward (bf16 autocast, SDPA's fused kernels)."""
    h, m, a = arch.hidden_size, arch.intermediate_size, setup.act_bytes
    norms = 2 * 4 * h  # each RMSNorm keeps its input in fp32
    attention = a * (h + 2 * arch.q_width + 2 * arch.kv_width + arch.q_width)  # normed input; q, k, v, out; o_proj in
    mlp = a * (h + 4 * m)  # normed input; gate, SiLU(gate), up, their product
    lora = 0
    if setup.lora_r is not None:
        # each adapter keeps its rank-r output, and a bf16 copy of its input when the adapter is fp32 under autocast
        copies = setup.mixed_precision and not setup.load_in_4bit and setup.zero_stage != 3
        inputs = sum(i for i, _ in arch.lm_linear_shapes().values()) if copies else 0
        lora = a * (inputs + 7 * setup.lora_r)
    return norms + attention + mlp + lora


def _training_items(arch: Architecture, setup: TrainingSetup) -> list[MemoryItem]:
    tokens = _scored_tokens(arch, setup)
    rows = setup.micro_batch * (2 if setup.guided_scoring else 1)
    a, h = setup.act_bytes, arch.hidden_size
    items = []
    if setup.activation_checkpointing:
        saved = arch.num_layers * tokens * a * h  # each layer's input
        name = f"LM activations: {arch.num_layers} checkpointed layer inputs × {tokens} positions"
    else:
        saved = arch.num_layers * tokens * _layer_activation_bytes(arch, setup)
        name = f"LM activations: {arch.num_layers} layers × {tokens} positions"
    items.append(MemoryItem(name, saved, TRAINING_PHASES))
    width = arch.generation_head_width
    trained_head = setup.lora_r is None
    head = (h + 2 * width if width else h) if trained_head else width  # a frozen head keeps only GELU's input
    items.append(MemoryItem("image head activations", rows * arch.num_image_tokens * a * head, (LOSS,)))
    units = training_tables(arch, setup)
    estimator = f"{setup.divergence_estimator} estimator"
    items.append(
        MemoryItem(
            f"(B, N, V) tables, {estimator}: {units:g} × {table_bytes(arch, setup) / 1e6:.0f} MB",
            units * table_bytes(arch, setup),
            (LOSS,),
        )
    )
    if setup.activation_checkpointing:
        recomputed = _layer_activation_bytes(arch, setup) * tokens
        items.append(MemoryItem("backward: one LM layer recomputed", recomputed, (BACKWARD,)))
    items.append(MemoryItem("backward: gradients of the hidden states", 2 * tokens * a * h, (BACKWARD,)))
    return items


def _working_weight_items(arch: Architecture, setup: TrainingSetup) -> list[MemoryItem]:
    """Weights materialised for a computation only: dequantized, or gathered from ZeRO-3 shards."""
    items = []
    if setup.load_in_4bit:  # bitsandbytes dequantizes one weight at a time for its matmul
        largest = max(i * o for i, o in arch.lm_linear_shapes().values())
        phases = (SAMPLING, SCORING, LOSS, BACKWARD)
        items.append(MemoryItem("4-bit: one LM weight dequantized", largest * setup.act_bytes, phases))
    if setup.zero_stage == 3:  # parameters gathered one module at a time, bounded by `stage3_max_live_parameters`
        embedding = arch.text_vocab_size * arch.hidden_size
        largest = max(embedding, arch.generation_head_params, arch.lm_linear_params // arch.num_layers)
        live = min(2 * largest, ZERO3_MAX_LIVE_PARAMETERS) * setup.weight_bytes
        items.append(MemoryItem("ZeRO-3: parameters gathered for a forward", live, (SCORING, LOSS, BACKWARD)))
    return items
