"""Configuration of LlamaGen text-to-image models (FoundationVision/LlamaGen, `autoregressive/models/gpt.py`)."""

from huggingface_hub.dataclasses import strict
from transformers import JanusVQVAEConfig, PreTrainedConfig, T5Config
from transformers.configuration_utils import SubConfigSpec


# google/flan-t5-xl's encoder, the caption encoder of every released LlamaGen T2I model
FLAN_T5_XL = {
    "vocab_size": 32128,
    "d_model": 2048,
    "d_kv": 64,
    "d_ff": 5120,
    "num_layers": 24,
    "num_heads": 32,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
}


@strict
class LlamaGenConfig(PreTrainedConfig):
    r"""
    Configuration of [`LlamaGenForImageGeneration`]. The defaults are LlamaGen-T2I GPT-XL at 256 px (775M parameters):
    36 layers of width 1280, 20 heads, a 16×16 grid of image tokens over the 16,384 codes of the VQ-16 tokenizer,
    captions encoded by FLAN-T5-XL into at most 120 prefix positions.

    > Parameters of the transformer

    hidden_size (`int`, *optional*, defaults to 1280):
        Width of the transformer.
    num_hidden_layers (`int`, *optional*, defaults to 36):
        Number of Llama blocks (RMSNorm, attention with 2D RoPE, SwiGLU; no biases).
    num_attention_heads (`int`, *optional*, defaults to 20):
        Number of attention heads (multi-head attention: LlamaGen's T2I models use no grouped-query attention).
    intermediate_size (`int`, *optional*):
        Width of the SwiGLU layer. Defaults to LlamaGen's rule: `2/3 · 4 · hidden_size`, rounded up to a multiple of
        256 (3584 for GPT-XL).
    rms_norm_eps (`float`, *optional*, defaults to 1e-5):
        Epsilon of the RMSNorms.
    rope_theta (`float`, *optional*, defaults to 10000.0):
        Base of the 2D rotary embedding over the image grid.
    initializer_range (`float`, *optional*, defaults to 0.02):
        Standard deviation of the random initialisation of linear and embedding weights.

    > Parameters of the image and the caption

    image_grid_size (`int`, *optional*, defaults to 16):
        Image tokens per side (16 for 256 px with the downsampling-16 tokenizer); an image is `image_grid_size²`
        tokens in raster order.
    codebook_size (`int`, *optional*, defaults to 16384):
        Number of image codes: the vocabulary of the image head and of the VQ codebook.
    caption_length (`int`, *optional*, defaults to 120):
        Most T5 tokens a caption keeps (LlamaGen's `cls_token_num`); captions are left-padded to at most this.
    clean_captions (`bool`, *optional*, defaults to `True`):
        Clean captions before T5 as LlamaGen's T5 embedder does for the released models (PixArt-α's rules, twice:
        `trl_t2i.models.llamagen.captions`; needs the `llamagen` extra). `False` only lowercases and strips them,
        LlamaGen's `use_text_preprocessing=False`.
    text_encoder_config (`dict` or `T5Config`, *optional*):
        The frozen T5 encoder of the captions (FLAN-T5-XL by default).
    vq_config (`dict` or `JanusVQVAEConfig`, *optional*):
        The VQ tokenizer, whose decoder turns image tokens into pixels (VQ-16 by default: transformers' Janus VQ-VAE
        is LlamaGen's VQ-16 architecture).
    pad_token_id (`int`, *optional*, defaults to 0), eos_token_id (`int`, *optional*, defaults to 1):
        The caption tokenizer's (T5's) padding and end ids. Only bookkeeping: trainers align them with the tokenizer.
        Image tokens are never compared with them (image code 1 is not an end of anything).
    """

    model_type = "llamagen"
    sub_configs_defaults = {
        "text_encoder_config": SubConfigSpec(config_class=T5Config, init_kwargs=FLAN_T5_XL),
        "vq_config": JanusVQVAEConfig,
    }

    hidden_size: int = 1280
    num_hidden_layers: int = 36
    num_attention_heads: int = 20
    intermediate_size: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    image_grid_size: int = 16
    codebook_size: int = 16384
    caption_length: int = 120
    clean_captions: bool = True
    text_encoder_config: dict | PreTrainedConfig | None = None
    vq_config: dict | PreTrainedConfig | None = None
    pad_token_id: int | None = 0
    eos_token_id: int | None = 1

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.intermediate_size is None:
            self.intermediate_size = _round_up(int(2 * 4 * self.hidden_size / 3), 256)
        # The VQ decoder reshapes a row of tokens into its square latent grid.
        self.vq_config.num_patches = self.image_grid_size

    def validate_architecture(self):
        """Part of `@strict`'s validation: the parts must agree with each other."""
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 4:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must split into {self.num_attention_heads} heads whose width is "
                "a multiple of 4 (2D RoPE rotates pairs, half of them along rows and half along columns)."
            )
        if self.vq_config is not None and self.vq_config.num_embeddings != self.codebook_size:
            raise ValueError(
                f"`codebook_size` ({self.codebook_size}) must equal the VQ codebook's `num_embeddings` "
                f"({self.vq_config.num_embeddings})."
            )

    @property
    def num_image_tokens(self) -> int:
        return self.image_grid_size**2

    @property
    def caption_dim(self) -> int:
        """Width of the T5 features the caption MLP reads."""
        return self.text_encoder_config.d_model


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


__all__ = ["LlamaGenConfig"]
