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
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from ..base import image_head_logits
from .configuration_llamagen import LlamaGenConfig


class LlamaGenKVCache:
    """Keys and values of every layer so far (one `(B, H, S, D)` pair per layer).

    With `max_length`, each layer's keys and values live in buffers allocated once for that many positions (the
    caption and every image token): `update` writes in place and returns views of the positions so far, instead of
    concatenating the whole cache at every step. Without it the cache grows by concatenation.
    """

    def __init__(self, max_length: int | None = None):
        self.max_length = max_length
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __len__(self) -> int:
        """Number of positions cached."""
        return self.layers[0][0].size(2) if self.layers else 0

    def past_length(self) -> int | torch.Tensor:
        """Positions cached before the current forward (a tensor for a static cache)."""
        return len(self)

    @property
    def is_empty(self) -> bool:
        return len(self) == 0

    @property
    def key_length(self) -> int | None:
        """Keys every layer's `update` returns when fixed (a static cache); `None`: the positions so far."""
        return None

    def advance(self, length: int) -> None:
        """Called once a forward's `length` new positions are written by every layer (a static cache counts them)."""

    def update(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this call's keys and values of one layer; return all of that layer's so far."""
        if self.max_length is None:
            if layer_idx == len(self.layers):
                self.layers.append((keys, values))
            else:
                past_keys, past_values = self.layers[layer_idx]
                self.layers[layer_idx] = (torch.cat([past_keys, keys], 2), torch.cat([past_values, values], 2))
            return self.layers[layer_idx]
        if layer_idx == len(self.layers):
            shape = (*keys.shape[:2], self.max_length, keys.shape[3])
            self.buffers.append((keys.new_empty(shape), values.new_empty(shape)))
            self.layers.append((keys[:, :, :0], values[:, :, :0]))
        start = self.layers[layer_idx][0].size(2)
        end = start + keys.size(2)
        if end > self.max_length:
            raise ValueError(f"The cache holds {self.max_length} positions; {end} were fed.")
        key_buffer, value_buffer = self.buffers[layer_idx]
        key_buffer[:, :, start:end] = keys
        value_buffer[:, :, start:end] = values
        self.layers[layer_idx] = (key_buffer[:, :, :end], value_buffer[:, :, :end])
        return self.layers[layer_idx]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep (or repeat) the rows `indices` of every layer (transformers' `Cache` method of the same name)."""
        self.buffers = [(keys[indices], values[indices]) for keys, values in self.buffers]
        length = len(self)
        if self.buffers:
            self.layers = [(keys[:, :, :length], values[:, :, :length]) for keys, values in self.buffers]
        else:
            self.layers = [(keys[indices], values[indices]) for keys, values in self.layers]


class StaticLlamaGenKVCache(LlamaGenKVCache):
    """A `LlamaGenKVCache` of fixed shapes, for a decode step compiled once (`torch.compile`, CUDA graphs): every
    layer's buffers hold `max_length` positions and `update` returns their first `attended` ones (`attend`; causality
    hides the positions not written yet), and the number of positions cached is a tensor advanced in place, not a
    Python int. `reset` empties it in place, so that later decodes reuse the tensors a compiled step was captured
    with."""

    def __init__(self, max_length: int):
        super().__init__(max_length)
        self.position: torch.Tensor | None = None
        self.filled = False
        self.attended = max_length

    def attend(self, length: int) -> None:
        """Let the next forwards attend over the first `length` positions only."""
        self.attended = length

    def past_length(self) -> torch.Tensor:
        return self.position

    @property
    def is_empty(self) -> bool:
        return not self.filled

    @property
    def key_length(self) -> int:
        return self.attended

    def update(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.buffers):
            # zeros, not garbage: a masked key's value still meets a zero attention weight, and NaN · 0 is NaN
            shape = (*keys.shape[:2], self.max_length, keys.shape[3])
            self.buffers.append((keys.new_zeros(shape), values.new_zeros(shape)))
            _mark_static(*self.buffers[-1])
        index = self.past_length() + torch.arange(keys.size(2), device=keys.device)
        key_buffer, value_buffer = self.buffers[layer_idx]
        key_buffer.index_copy_(2, index, keys)
        value_buffer.index_copy_(2, index, values)
        return key_buffer[:, :, : self.attended], value_buffer[:, :, : self.attended]

    def advance(self, length: int) -> None:
        self.position.add_(length)
        self.filled = True

    def reset(self, device: torch.device) -> None:
        """Empty the cache in place (its buffers and position keep their addresses)."""
        for keys, values in self.buffers:
            keys.zero_()
            values.zero_()
        if self.position is None:
            self.position = torch.zeros((), dtype=torch.long, device=device)
            _mark_static(self.position)
        self.position.zero_()
        self.filled = False
        self.attended = self.max_length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("A static cache keeps its rows: prefill it with every row instead.")


def _mark_static(*tensors: torch.Tensor) -> None:
    # CUDA graphs must know that these tensors' addresses stay fixed from step to step.
    for tensor in tensors:
        torch._dynamo.mark_static_address(tensor)


@dataclass
class LlamaGenOutput(ModelOutput):
    """
    logits (`torch.FloatTensor` of shape `(batch_size, n, codebook_size)`):
        fp32 image-head logits (computed in the head's dtype: fp32 once `LlamaGenFamily.upcast_image_head` ran). Without a cache: from the last caption position on, so `logits[:, i]` scores image
        token `i`. With a cache: one per image token fed, scoring the next one.
    cache (`LlamaGenKVCache`, *optional*):
        The cache, extended by this call, when `use_cache=True`.
    """

    logits: torch.FloatTensor | None = None
    cache: LlamaGenKVCache | None = None


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

    def forward(self, hidden_states, cos, sin, attention_mask, cache: LlamaGenKVCache | None = None):
        batch_size, length, _ = hidden_states.shape
        shape = (batch_size, length, self.num_heads, self.head_dim)
        query = apply_rotary(self.q_proj(hidden_states).view(shape).transpose(1, 2), cos, sin)
        key = apply_rotary(self.k_proj(hidden_states).view(shape).transpose(1, 2), cos, sin)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(self.layer_idx, key, value)
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

    def forward(self, inputs_embeds, caption_mask, cache: LlamaGenKVCache | None = None) -> torch.Tensor:
        """Hidden states of `inputs_embeds`, the positions after those already cached.

        `caption_mask` `(B, P)` is the mask of the caption, the first `P` positions of the whole sequence.
        """
        past = cache.past_length() if cache is not None else 0
        positions = torch.arange(inputs_embeds.size(1), device=inputs_embeds.device) + past
        cos, sin = grid_rotary_embedding(self.config, positions - caption_mask.size(1))
        mask = attention_mask(caption_mask, positions, cache.key_length if cache is not None else None)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, cos=cos, sin=sin, attention_mask=mask, cache=cache)
        if cache is not None:
            cache.advance(inputs_embeds.size(1))
        return self.norm(hidden_states)


def attention_mask(
    caption_mask: torch.Tensor, query_positions: torch.Tensor, key_length: int | None = None
) -> torch.Tensor:
    """Boolean SDPA mask `(B, 1, S, K)` of the queries at `query_positions` over keys `0 … last query`, or over
    `key_length` keys (a static cache's, where causality hides those past the last query).

    Causal, padding positions of the caption masked as keys, and every position attends to itself (LlamaGen's
    identity diagonal, which keeps a padding query from attending to nothing).
    """
    batch_size, caption_length = caption_mask.shape
    keys = torch.arange(key_length or int(query_positions[-1]) + 1, device=caption_mask.device)
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
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        null_caption: torch.BoolTensor | None = None,
        image_tokens: torch.LongTensor | None = None,
        cache: LlamaGenKVCache | None = None,
        use_cache: bool = False,
        **kwargs,
    ) -> LlamaGenOutput:
        r"""
        input_ids, attention_mask (`torch.LongTensor` of shape `(batch_size, P)`):
            The captions' left-padded T5 ids and mask, at every call (with a non-empty cache the caption is already
            in it, and only its mask is read).
        null_caption (`torch.BoolTensor` of shape `(batch_size,)`, *optional*):
            Rows that take the null caption (classifier-free guidance's unconditional rows).
        image_tokens (`torch.LongTensor` of shape `(batch_size, n)`, *optional*):
            Image tokens after the caption: the first `n` of an image (teacher forcing, or a prompt), or with a cache
            the next `n`.
        cache (`LlamaGenKVCache`, *optional*):
            Cache of the positions already run; with `use_cache=True` a new one is started when it is `None`.
        """
        cache = (cache if cache is not None else LlamaGenKVCache()) if use_cache else None
        first_call = cache is None or cache.is_empty
        embeds = [self.embed_captions(input_ids, attention_mask, null_caption)] if first_call else []
        if image_tokens is not None:
            embeds.append(self.transformer.embed_tokens(image_tokens))
        hidden_states = self.transformer(torch.cat(embeds, dim=1), attention_mask, cache)
        # From the last caption position on: the position before image token i scores it.
        start = input_ids.size(1) - 1 if first_call else 0
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


__all__ = ["LlamaGenForImageGeneration", "LlamaGenPreTrainedModel", "LlamaGenKVCache", "LlamaGenOutput"]
