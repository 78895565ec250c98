"""The one interface between `trl_t2i` and a model family.

The trainer, the sampler and the scripts only talk to a `ModelFamily`, so they never branch on the family. (It is
not called an "adapter": PEFT adapters are a different thing.) A family object holds the processing class
(tokenizer/processor) and the few ids it needs; it never holds the model, because the same family object serves the
policy, the reference and their DDP/PEFT/DeepSpeed wrappers.

The prompt side is a `Conditioning`: named tensors, one row per image, that only the family builds and reads (Janus:
chat-formatted token ids and their mask; a T5-conditioned family: caption features and masks). Sampling and
teacher-forced scoring both consume it through the family, so they see the same rows, padding and masks.
"""

import types
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from .cache import PreallocatedCache, StaticDecodeCache


STATIC_LENGTH_MULTIPLE = 64
"""A static cache's length is rounded up to a multiple of this, so prompts of different lengths share one compiled
decode step (the positions past the image are never written, and causality hides them)."""


ATTENDED_LENGTH_MULTIPLE = 128
"""A static decode step attends over the first positions of its cache, their number rounded up to a multiple of this,
not over the whole cache: the positions past the token fed are not written yet (causality would hide them), and
reading them costs as much as reading the rest; about half the attention reads of a 576-token image. One compiled
graph serves every length (`StaticDecodeCache`), a CUDA graph is captured per length (5 for Janus' 640 positions)."""

MAX_ATTENDED_LENGTHS = 8
"""At most this many attended lengths per cache (the multiple grows for longer caches, e.g. LlamaGen at 512 px):
PyTorch warns of the overhead past 8 CUDA graphs of one compiled function (`cudagraph_dynamic_shape_warn_limit`)."""


def static_cache_length(length: int) -> int:
    """`length` rounded up to a multiple of `STATIC_LENGTH_MULTIPLE`."""
    return -(-length // STATIC_LENGTH_MULTIPLE) * STATIC_LENGTH_MULTIPLE


def attended_length(needed: int, cache_length: int) -> int:
    """The positions a static decode step attends over: `needed` rounded up to a multiple of
    `ATTENDED_LENGTH_MULTIPLE` (or of the multiple of it that leaves at most `MAX_ATTENDED_LENGTHS` lengths), at most
    the whole cache."""
    multiple = ATTENDED_LENGTH_MULTIPLE * -(-cache_length // (ATTENDED_LENGTH_MULTIPLE * MAX_ATTENDED_LENGTHS))
    return min(cache_length, -(-needed // multiple) * multiple)


@dataclass
class Conditioning:
    """The prompt side of a batch of image rows, built and read by a `ModelFamily` only.

    Attributes:
        tensors: named tensors whose first dimension is the row; they are passed to the model's patched `forward` as
            keyword arguments, so DDP/PEFT/DeepSpeed wrappers move them like any other input.
    """

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def to(self, device: torch.device | str) -> "Conditioning":
        return Conditioning({name: tensor.to(device) for name, tensor in self.tensors.items()})

    def cat(self, other: "Conditioning") -> "Conditioning":
        """These rows followed by `other`'s (e.g. conditional then unconditional rows)."""
        return Conditioning({name: torch.cat([tensor, other.tensors[name]]) for name, tensor in self.tensors.items()})

    def padded_to(self, rows: int) -> "Conditioning":
        """These rows followed by copies of the last one, `rows` in all (a batch padded to a compiled shape)."""
        missing = rows - len(self)
        if missing == 0:
            return self
        return Conditioning(
            {
                name: torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])
                for name, tensor in self.tensors.items()
            }
        )


@dataclass
class DecodeState:
    """What one KV-cached decode carries from step to step: the cache and the attention mask.

    The cache is a `PreallocatedCache` (eager) or a `StaticDecodeCache` (`static`, see `models/cache.py`). A family
    may allocate the mask for the whole sequence at prefill; then `attention_mask[:, :length]` is the mask of the
    `length` positions fed so far. A `static` state keeps every shape fixed for the whole decode (the cache counts
    its own length in a tensor), so a step can be compiled once and replayed.
    """

    cache: PreallocatedCache | StaticDecodeCache
    attention_mask: torch.LongTensor
    length: int = 0
    static: bool = False

    @classmethod
    def allocate_static(cls, num_layers: int, max_length: int, mask_shape: tuple[int, int], device) -> "DecodeState":
        """A `static` state: a `StaticDecodeCache` of `max_length` positions and a mask of `mask_shape`, both kept at
        their addresses by every later decode (`restart`), which a compiled step (a CUDA graph) reads."""
        attention_mask = torch.ones(mask_shape, dtype=torch.long, device=device)
        torch._dynamo.mark_static_address(attention_mask)
        return cls(StaticDecodeCache(num_layers, max_length, device), attention_mask, static=True)

    def restart(self, prompt_mask: torch.LongTensor) -> None:
        """Static states: start a decode of a prompt whose mask is `prompt_mask` `(rows, P)`, in place: an empty
        cache, the prompt's mask over the first `P` positions and ones past them (causality hides the positions not
        written yet), `length = P`."""
        self.cache.reset()
        self.attention_mask.fill_(1)
        self.attention_mask[:, : prompt_mask.size(1)] = prompt_mask
        self.length = prompt_mask.size(1)

    def attend(self, image_position: int) -> None:
        """Static states: let the next step, which feeds image token `image_position` after the `length` positions of
        the prefill, attend over `attended_length` positions of the cache only (the cache's `attend`)."""
        self.cache.attend(attended_length(self.length + image_position + 1, self.cache.max_length))

    def select_rows(self, index: torch.LongTensor) -> None:
        """Keep (or repeat) the rows `index` of the cache and mask, e.g. to expand a prefill shared by the rows that
        repeat a prompt. The cache must implement transformers' `batch_select_indices`."""
        self.cache.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]


class ModelFamily(ABC):
    """Everything model-family specific that GRPO on image tokens needs.

    Subclasses set `model_type` (the `config.model_type` they serve), `model_class`, `lora_target_modules` and
    `quantization_skip_modules`, and implement the abstract methods. With classifier-free guidance, rows are always
    laid out as `[conditional rows; unconditional rows]` (see `guided_rows`).
    """

    model_type: ClassVar[str]
    model_class: ClassVar[type[PreTrainedModel]]
    """The transformers class that `from_pretrained` loads for this family."""
    lora_target_modules: ClassVar[str]
    """Regex (PEFT full match) of the language-model linears that LoRA adapts: never the vision tower or VQ model."""
    quantization_skip_modules: ClassVar[list[str]]
    """Full module paths (from the root) that 4-bit loading must leave unquantized."""
    image_head: ClassVar[str]
    """Full module path (from the root) of the head that scores the next image token; it computes in fp32 when its
    weights are fp32 (`upcast_image_head`)."""
    supports_static_decoding: ClassVar[bool] = False
    """Whether `prefill(..., static=True)` is implemented: a fixed-shape decode whose `step` can be compiled
    (`torch.compile`, CUDA graphs)."""

    def __init__(self, config, processing_class):
        self.config = config
        self.processing_class = processing_class

    @property
    @abstractmethod
    def num_image_tokens(self) -> int:
        """Number of tokens in one image."""

    @property
    @abstractmethod
    def codebook_size(self) -> int:
        """Size of the image-token vocabulary."""

    @abstractmethod
    def tokenize_prompts(self, texts: list[str]) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Raw captions to the left-padded `(prompt_ids, prompt_mask)` that TRL carries between rollout and loss."""

    @abstractmethod
    def prompt_limit(self) -> tuple[int, str]:
        """The most prompt tokens (`tokenize_prompts`'s) the model takes, and why, for messages
        ("its context of ...")."""

    def prompt_lengths(self, texts: list[str]) -> list[int]:
        """Each caption's prompt length in tokens, as `tokenize_prompts` makes it but never truncated (families whose
        `tokenize_prompts` truncates override this). 256 captions at a time: a very long one pads only its own."""
        lengths = []
        for start in range(0, len(texts), 256):
            lengths += self.tokenize_prompts(texts[start : start + 256])[1].sum(-1).tolist()
        return lengths

    @abstractmethod
    def build_conditioning(self, prompt_ids: torch.LongTensor, prompt_mask: torch.LongTensor) -> Conditioning:
        """The conditional rows for `tokenize_prompts`' output."""

    @abstractmethod
    def unconditional(self, conditioning: Conditioning) -> Conditioning:
        """The unconditional rows for classifier-free guidance, one per conditional row."""

    @abstractmethod
    def teacher_forced_logits(self, model: nn.Module, conditioning: Conditioning, image_tokens) -> torch.Tensor:
        """Raw image-head logits `(rows, N, V)` for every image position of `image_tokens` `(rows, N)`.

        `model` is the bare model (no wrappers). Called from the patched `forward` only; use `image_logits`.
        """

    @abstractmethod
    def prefill(
        self, model: nn.Module, conditioning: Conditioning, static: bool = False, reuse: DecodeState | None = None
    ) -> tuple[torch.Tensor, DecodeState]:
        """Run the prompt rows through `model` (bare) with a fresh KV cache: logits `(rows, V)` for image token 0.

        `static=True` (families with `supports_static_decoding` only) returns a `static` `DecodeState` of
        `static_decode_length(conditioning)` positions. `reuse`, a static state of an earlier prefill of as many rows
        and positions, is overwritten in place and returned: a compiled step (a CUDA graph) keeps reading the tensors
        it was captured with.
        """

    def static_decode_length(self, conditioning: Conditioning) -> int:
        """Positions the static cache of a decode of these rows holds: the prompt and every image token, rounded up
        (`static_cache_length`)."""
        raise NotImplementedError(f"{type(self).__name__} has no static decode.")

    @abstractmethod
    def step(self, model: nn.Module, image_tokens: torch.LongTensor, state: DecodeState) -> torch.Tensor:
        """Feed one image token per row `(rows,)`, updating `state` in place: logits `(rows, V)` for the next one.

        On a `static` state it must only update tensors in place (no Python-side counters, no new shapes), so that
        `torch.compile` captures it once for every position.
        """

    @abstractmethod
    def similarity_embeddings(self, model: nn.Module, image_tokens: torch.LongTensor) -> torch.Tensor:
        """The vectors `(B, N, D)` of image tokens `(B, N)` (bare model) that GCPO's similarity rule compares
        (`token_selection="critical"`), those the paper's code takes for this family."""

    def decode(self, model: nn.Module, image_tokens: torch.LongTensor) -> torch.Tensor:
        """VQ-decode `(B, N)` image tokens to `uint8` images `(B, H, W, 3)` with the (bare) model's
        `decode_image_tokens` (transformers' Janus method; LlamaGen's model has its own), which decodes in the
        precision of the family's reference code (Janus: the weights' dtype; LlamaGen: fp32), whatever autocast the
        caller runs under."""
        with torch.autocast(image_tokens.device.type, enabled=False):
            pixels = model.decode_image_tokens(image_tokens)
        return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    @classmethod
    def upcast_image_head(cls, model: nn.Module) -> None:
        """Keep the image head's weights in fp32, so that it computes the logits in fp32 (`image_head_logits`), when
        sampling and when scoring alike. In bf16 a logit is off by up to half an ulp (0.06 at |l| = 16), and guidance
        multiplies the error by about `cfg_scale`: the two paths then round differently (see the README's
        "On-policy in bf16"). The head then casts what it is given to its own dtype, so that code calling it with the
        bf16 hidden states of the model around it (transformers' own `generate`) gets the fp32 logits too."""
        head = unwrap_model(model).get_submodule(cls.image_head).float()
        if not getattr(head, "t2i_casts_inputs", False):
            head.register_forward_pre_hook(_inputs_in_head_dtype)
            head.t2i_casts_inputs = True

    def encode_prompts(self, texts: list[str]) -> Conditioning:
        """Raw captions to their conditional rows (tokenize, then build the conditioning)."""
        return self.build_conditioning(*self.tokenize_prompts(texts))

    def guided_rows(self, conditioning: Conditioning) -> Conditioning:
        """The rows a guided forward runs: the conditional rows, then their unconditional counterparts."""
        return conditioning.cat(self.unconditional(conditioning))

    def patch_forward(self, model: nn.Module) -> None:
        """Teach the bare model's `forward` to return image logits when called with `t2i_image_tokens=`.

        Scoring must go through the outermost wrapper's `forward` (DDP, PEFT, DeepSpeed): calling submodules
        directly skips DDP's gradient all-reduce and the ranks silently drift apart. TRL's fused LM head uses the
        same instance patch. Idempotent. The patch is a method bound to the instance, which `copy.deepcopy` rebinds
        to the copy: a deep copy of a patched model (the frozen reference of a full fine-tune) scores with its own
        weights.
        """
        bare = unwrap_model(model)
        if getattr(getattr(bare.forward, "__func__", None), "t2i_image_logits", False):
            return
        family = self

        def forward(instance, *args, t2i_image_tokens=None, **kwargs):
            if t2i_image_tokens is None:
                return instance._t2i_unpatched_forward(*args, **kwargs)
            return family.teacher_forced_logits(instance, Conditioning(kwargs), t2i_image_tokens)

        forward.t2i_image_logits = True
        bare._t2i_unpatched_forward = bare.forward
        bare.forward = types.MethodType(forward, bare)

    def image_logits(
        self, model: nn.Module, conditioning: Conditioning, image_tokens: torch.LongTensor
    ) -> torch.Tensor:
        """Teacher-forced image-head logits `(rows, N, V)` through `model`'s (possibly wrapped) `forward`."""
        logits = model(**conditioning.tensors, t2i_image_tokens=image_tokens)
        expected = (*image_tokens.shape, self.codebook_size)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
            raise RuntimeError(
                f"The model's forward did not return image logits of shape {expected}; call "
                f"`family.patch_forward(model)` on every model (policy and reference) before scoring."
            )
        return logits


def _inputs_in_head_dtype(head: nn.Module, args: tuple) -> tuple:
    dtype = next(head.parameters()).dtype
    return tuple(arg.to(dtype) if torch.is_tensor(arg) and arg.is_floating_point() else arg for arg in args)


def image_head_logits(head: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """fp32 logits of an image head, computed in the head's own dtype with autocast off: in fp32 when its weights
    are fp32 (`ModelFamily.upcast_image_head`), whatever the precision of the model around it."""
    with torch.autocast(hidden_states.device.type, enabled=False):
        return head(hidden_states.to(next(head.parameters()).dtype)).float()


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DeepSpeed (`.module`) and PEFT (`.get_base_model()`) wrappers down to the bare model."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model
