"""LlamaGen text-to-image (FoundationVision/LlamaGen, arXiv 2406.06525) as a transformers `PreTrainedModel`.

The whole network, top to bottom: the caption's T5 ids go through the frozen T5 encoder; its features (or, for
classifier-free guidance's unconditional rows, the null caption) go through a two-layer MLP into the first positions
of the sequence; image tokens are embedded after them; Llama blocks (RMSNorm, multi-head attention with a 2D rotary
embedding over the image grid, SwiGLU; no biases) run over the sequence; an image head scores the next code; the VQ
decoder turns a finished grid of codes into pixels.

What LlamaGen does, and so this port:

* Caption positions get a zero rotary embedding, which zeroes their queries and keys: every attention logit to or
  from a caption position is 0, so captions contribute only through their values (and their order does not matter
  beyond the causal mask). Image token `i` is rotated by its grid cell `(i // side, i % side)`, whatever the caption
  length: left padding to any length gives the same image logits.
* Captions are left-padded. A padding position is masked as a key for every other query and attends only to itself:
  padding never reaches a real position, and no attention row is empty.
* The unconditional row of CFG replaces the caption's T5 features by the null caption (the last `P` of the 120 rows
  of LlamaGen's `uncond_embedding`, a fixed buffer of the checkpoint) and keeps the caption's mask, exactly like
  LlamaGen's `generate` and its training-time caption dropout.

What this port leaves out, on purpose: dropout of any kind (LlamaGen's token, residual and FFN dropouts, 0.1 each in
train mode) and caption dropout (LlamaGen's train-mode `CaptionEmbedder` silently swaps 10% of the captions for the
null caption). Neither exists here, so nothing random can act during RL whatever the mode. The T5 encoder and the VQ
model are frozen: no gradient, and always in eval mode (T5 has dropout layers of its own).
"""

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, JanusVQVAE, PreTrainedModel, T5EncoderModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from ..base import image_head_logits
from .configuration_llamagen import LlamaGenConfig


@dataclass
class LlamaGenOutput(ModelOutput):
    """
    logits (`torch.FloatTensor` of shape `(batch_size, n, codebook_size)`):
        fp32 image-head logits (computed in the head's dtype: fp32 once `LlamaGenFamily.upcast_image_head` ran).
        With the caption (`input_ids`): from the last caption position on, so `logits[:, i]` scores image token `i`.
        After it (a cached caption): one per image token fed, scoring the next one.
    cache (`Cache`, *optional*):
        The cache, extended by this call, when `use_cache=True`.
    """

    logits: torch.FloatTensor | None = None
    cache: Cache | None = None


class LlamaGenRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Normalised in fp32, scaled in the input dtype (LlamaGen's order, which HF Llama's differs from in bf16).
        x = hidden_states.float()
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(hidden_states) * self.weight


def grid_rotary_embedding(config: LlamaGenConfig, grid_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(cos, sin)` of shape `(S, head_dim // 2)` for positions whose image-grid index is `grid_index` `(S,)`.

    Head channels rotate in adjacent pairs; the first half of the pairs turn with the row of the cell, the second
    half with its column, at frequencies `θ^(-2j / (head_dim/2))`. A negative index (a caption position) gets
    `cos = sin = 0`.
    """
    head_dim = config.hidden_size // config.num_attention_heads
    quarter = head_dim // 4
    frequencies = config.rope_theta ** (
        -torch.arange(quarter, dtype=torch.float32, device=grid_index.device) * 2 / (head_dim // 2)
    )
    cell = grid_index.clamp(min=0)
    rows, columns = cell // config.image_grid_size, cell % config.image_grid_size
    angles = torch.cat([rows[:, None] * frequencies, columns[:, None] * frequencies], dim=-1)
    is_image = (grid_index >= 0)[:, None]
    return angles.cos() * is_image, angles.sin() * is_image


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the adjacent channel pairs of `x` `(B, H, S, D)` in fp32 (as LlamaGen does)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
    return rotated.flatten(-2).type_as(x)


class LlamaGenAttention(nn.Module):
    def __init__(self, config: LlamaGenConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        # LlamaGen fuses these into one `wqkv`; separate linears let LoRA target each (the converter splits it).
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states, cos, sin, attention_mask, cache: Cache | None = None):
        batch_size, length, _ = hidden_states.shape
        shape = (batch_size, length, self.num_heads, self.head_dim)
        query = apply_rotary(self.q_proj(hidden_states).view(shape).transpose(1, 2), cos, sin)
        key = apply_rotary(self.k_proj(hidden_states).view(shape).transpose(1, 2), cos, sin)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        return self.o_proj(output.transpose(1, 2).reshape(batch_size, length, -1))


class LlamaGenMLP(nn.Module):
    """SwiGLU: `down(SiLU(gate(x)) · up(x))` (LlamaGen's `w2(SiLU(w1 x) · w3 x)`)."""

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaGenDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LlamaGenConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LlamaGenRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaGenAttention(config, layer_idx)
        self.post_attention_layernorm = LlamaGenRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaGenMLP(config)

    def forward(self, hidden_states, cos=None, sin=None, attention_mask=None, cache=None):
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), cos, sin, attention_mask, cache
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LlamaGenCaptionEmbedder(nn.Module):
    """T5 features to the transformer's width (a tanh-GELU MLP), and the null caption of the unconditional rows."""

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.caption_dim, config.hidden_size, bias=False)
        self.fc2 = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        # A buffer, as in LlamaGen: it is part of the checkpoint but never trained (not by LlamaGen either).
        self.register_buffer("null_caption", torch.zeros(config.caption_length, config.caption_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(features), approximate="tanh"))


class LlamaGenTransformer(nn.Module):
    """Image-token embedding, the Llama blocks and the final norm."""

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.codebook_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaGenDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaGenRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, inputs_embeds, caption_mask, cache: Cache | None = None) -> torch.Tensor:
        """Hidden states of `inputs_embeds`, the positions after those already cached.

        `caption_mask` `(B, P)` is the mask of the caption, the first `P` positions of the whole sequence.
        """
        length = inputs_embeds.size(1)
        # A static cache counts its positions in a tensor and attends over a fixed number of keys (`get_mask_sizes`):
        # the same shapes at every position, for a compiled step.
        past = cache.get_seq_length() if cache is not None else 0
        key_length = cache.get_mask_sizes(length, 0)[0] if cache is not None else length
        positions = torch.arange(length, device=inputs_embeds.device) + past
        cos, sin = grid_rotary_embedding(self.config, positions - caption_mask.size(1))
        mask = attention_mask(caption_mask, positions, key_length)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, cos=cos, sin=sin, attention_mask=mask, cache=cache)
        return self.norm(hidden_states)


def attention_mask(caption_mask: torch.Tensor, query_positions: torch.Tensor, key_length: int) -> torch.Tensor:
    """Boolean SDPA mask `(B, 1, S, K)` of the queries at `query_positions` over the first `key_length` keys (the
    positions so far, or a static cache's attended positions, where causality hides those past the last query).

    Causal, padding positions of the caption masked as keys, and every position attends to itself (LlamaGen's
    identity diagonal, which keeps a padding query from attending to nothing).
    """
    batch_size, caption_length = caption_mask.shape
    keys = torch.arange(key_length, device=caption_mask.device)
    key_is_real = torch.cat(
        [caption_mask.bool(), caption_mask.new_ones(batch_size, len(keys) - caption_length).bool()], 1
    )
    causal = keys[None, :] <= query_positions[:, None]
    itself = keys[None, :] == query_positions[:, None]
    return ((causal[None] & key_is_real[:, None, :]) | itself[None])[:, None]


class LlamaGenPreTrainedModel(PreTrainedModel):
    config: LlamaGenConfig
    config_class = LlamaGenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaGenDecoderLayer", "T5Block", "JanusVQVAEResnetBlock", "JanusVQVAEAttnBlock"]
    # LlamaGen's sample_t2i.py keeps its VQ model in fp32: loaded in bf16, the images would be another model's
    _keep_in_fp32_modules_strict = ["vqmodel"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LlamaGenCaptionEmbedder):  # LlamaGen's init of `uncond_embedding`
            init.normal_(module.null_caption, std=self.config.caption_dim**-0.5)


class LlamaGenForImageGeneration(LlamaGenPreTrainedModel):
    """LlamaGen text-to-image: T5 caption encoder (frozen), caption MLP, Llama transformer with 2D RoPE, image head,
    VQ decoder (frozen). See the module docstring for the conventions it shares with the original.

    Example (with a model converted by `trl-t2i convert_llamagen`):

    ```python
    >>> from transformers import AutoTokenizer
    >>> model = LlamaGenForImageGeneration.from_pretrained("llamagen-t2i-xl-256")
    >>> tokenizer = AutoTokenizer.from_pretrained("llamagen-t2i-xl-256")
    >>> caption = tokenizer(["a red apple"], padding=True, padding_side="left", return_tensors="pt")
    >>> logits = model(**caption).logits[:, -1]  # scores of the first image token
    ```
    """

    def __init__(self, config: LlamaGenConfig):
        super().__init__(config)
        self.text_encoder = T5EncoderModel._from_config(config.text_encoder_config)
        self.caption_embedder = LlamaGenCaptionEmbedder(config)
        self.transformer = LlamaGenTransformer(config)
        self.image_head = nn.Linear(config.hidden_size, config.codebook_size, bias=False)
        self.vqmodel = JanusVQVAE._from_config(config.vq_config)
        self.freeze_t5_and_vq()
        # TRL reads and aligns the pad/eos ids of `generation_config` with the tokenizer's: LlamaGen has no
        # `generate`, so it holds only those.
        self.generation_config = GenerationConfig(pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Loading replaces the parameters by new, trainable ones: freeze T5 and the VQ model again.
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).freeze_t5_and_vq()
        return loaded

    def freeze_t5_and_vq(self):
        """No gradient, hence no optimizer state, for the T5 encoder and the VQ model."""
        self.text_encoder.requires_grad_(False)
        self.vqmodel.requires_grad_(False)

    def train(self, mode: bool = True):
        # The frozen parts stay in eval mode: T5's dropout would otherwise change the captions during training.
        super().train(mode)
        self.text_encoder.eval()
        self.vqmodel.eval()
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.transformer.embed_tokens = value

    def embed_captions(self, input_ids, attention_mask, null_caption=None) -> torch.Tensor:
        """`(B, P, hidden)` caption embeddings of left-padded T5 ids; rows where `null_caption` is set get the null
        caption instead (their T5 pass is skipped)."""
        if input_ids.size(1) > self.config.caption_length:
            raise ValueError(
                f"Captions of {input_ids.size(1)} tokens; LlamaGen reads at most {self.config.caption_length}: "
                "tokenize with truncation to `config.caption_length`."
            )
        null = self.caption_embedder.null_caption[-input_ids.size(1) :]
        features = null.expand(*input_ids.shape, -1).clone()
        encoded = torch.ones_like(input_ids[:, 0], dtype=torch.bool) if null_caption is None else ~null_caption.bool()
        if encoded.any():
            with torch.no_grad():
                features[encoded] = self.text_encoder(
                    input_ids=input_ids[encoded], attention_mask=attention_mask[encoded]
                ).last_hidden_state.to(features.dtype)
        # LlamaGen zeroes the features of padding positions (which no other position sees anyway).
        return self.caption_embedder(features * attention_mask[..., None].to(features.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        null_caption: torch.BoolTensor | None = None,
        image_tokens: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        **kwargs,
    ) -> LlamaGenOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, P)`, *optional*):
            The captions' left-padded T5 ids, when the caption is not in `cache` yet (teacher forcing, a prefill);
            `None` for the image tokens fed after a cached caption.
        attention_mask (`torch.LongTensor` of shape `(batch_size, P)`):
            The captions' mask, at every call (the caption length and the grid cell of each image token follow
            from it).
        null_caption (`torch.BoolTensor` of shape `(batch_size,)`, *optional*):
            Rows that take the null caption (classifier-free guidance's unconditional rows).
        image_tokens (`torch.LongTensor` of shape `(batch_size, n)`, *optional*):
            Image tokens after the caption: the first `n` of an image (teacher forcing, or a prompt), or after a
            cached caption the next `n`.
        cache (`Cache`, *optional*):
            Cache of the positions already run (the families' `PreallocatedCache` or `StaticDecodeCache`); with
            `use_cache=True` a `DynamicCache` is started when it is `None`.
        """
        cache = (cache if cache is not None else DynamicCache()) if use_cache else None
        embeds = [] if input_ids is None else [self.embed_captions(input_ids, attention_mask, null_caption)]
        if image_tokens is not None:
            embeds.append(self.transformer.embed_tokens(image_tokens))
        hidden_states = self.transformer(torch.cat(embeds, dim=1), attention_mask, cache)
        # From the last caption position on: the position before image token i scores it.
        start = 0 if input_ids is None else input_ids.size(1) - 1
        logits = image_head_logits(self.image_head, hidden_states[:, start:])
        return LlamaGenOutput(logits=logits, cache=cache)

    @torch.no_grad()
    def decode_image_tokens(self, image_tokens: torch.LongTensor) -> torch.Tensor:
        """VQ-decode `(B, N)` image tokens to `(B, H, W, 3)` pixels in about `[-1, 1]`, in fp32 whatever the model's
        dtype and autocast (LlamaGen's `sample_t2i.py` keeps its VQ model in fp32): the tokens' l2-normalised
        codebook rows, `post_quant_conv`, then the decoder, each run with fp32 copies of weights that are not fp32
        (the modules themselves are left as they are, so sharded or cast-down weights stay untouched)."""
        vq, side = self.vqmodel, self.config.image_grid_size
        codes = F.normalize(vq.quantize.embedding.weight[image_tokens].float(), dim=-1)
        hidden_states = codes.view(len(image_tokens), side, side, -1).permute(0, 3, 1, 2)
        with torch.autocast(image_tokens.device.type, enabled=False):
            for module in (vq.post_quant_conv, vq.decoder):
                tensors = itertools.chain(module.named_parameters(), module.named_buffers())
                weights = {name: tensor.float() for name, tensor in tensors}
                hidden_states = torch.func.functional_call(module, weights, (hidden_states,))
        return hidden_states.permute(0, 2, 3, 1)


__all__ = ["LlamaGenForImageGeneration", "LlamaGenPreTrainedModel", "LlamaGenOutput"]
