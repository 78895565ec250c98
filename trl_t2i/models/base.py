"""The one interface between `trl_t2i` and a model family.

The trainer, the sampler and the scripts only talk to a `T2IAdapter`, so they never branch on the model family. An
adapter holds the processing class (tokenizer/processor) and the few token ids it needs; it never holds the model,
because the same adapter serves the policy, the reference and their DDP/PEFT/DeepSpeed wrappers.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel


@dataclass
class DecodeState:
    """What one KV-cached decode carries from step to step: the cache and the attention mask so far."""

    cache: Any
    attention_mask: torch.LongTensor


class T2IAdapter(ABC):
    """Everything model-family specific that GRPO on image tokens needs.

    Subclasses set `model_type` (the `config.model_type` they serve), `model_class` and implement the abstract methods. Image-token
    rows are always laid out as `[conditional rows; unconditional rows]` when classifier-free guidance is used.
    """

    model_type: ClassVar[str]
    model_class: ClassVar[type[PreTrainedModel]]
    """The transformers class that `from_pretrained` loads for this family."""
    lora_target_modules: ClassVar[str]
    """Regex (PEFT full match) of the language-model linears that LoRA adapts: never the vision tower or VQ model."""
    quantization_skip_modules: ClassVar[list[str]]
    """Full module paths (from the root) that 4-bit loading must leave unquantized."""

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
    def prepare_prompts(self, texts: list[str]) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Format and tokenise raw captions for image generation, left padded: `(input_ids, attention_mask)`."""

    @abstractmethod
    def cfg_inputs(
        self, input_ids: torch.LongTensor, attention_mask: torch.LongTensor
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """The unconditional rows for classifier-free guidance, one per conditional row."""

    @abstractmethod
    def teacher_forced_logits(
        self, model: nn.Module, input_ids: torch.LongTensor, attention_mask: torch.LongTensor, image_tokens
    ) -> torch.Tensor:
        """Raw image-head logits `(rows, N, V)` for every image position of `image_tokens` `(rows, N)`.

        `model` is the bare model (no wrappers). Called from the patched `forward` only; use `image_logits`.
        """

    @abstractmethod
    def prefill(
        self, model: nn.Module, input_ids: torch.LongTensor, attention_mask: torch.LongTensor
    ) -> tuple[torch.Tensor, DecodeState]:
        """Run the prompt rows through `model` (bare) with a fresh KV cache: logits `(rows, V)` for image token 0."""

    @abstractmethod
    def step(self, model: nn.Module, image_tokens: torch.LongTensor, state: DecodeState) -> torch.Tensor:
        """Feed one image token per row `(rows,)`, updating `state` in place: logits `(rows, V)` for the next one."""

    @abstractmethod
    def decode(self, model: nn.Module, image_tokens: torch.LongTensor) -> torch.Tensor:
        """VQ-decode `(B, N)` image tokens to `uint8` images `(B, H, W, 3)`."""

    def patch_forward(self, model: nn.Module) -> None:
        """Teach the bare model's `forward` to return image logits when called with `t2i_image_tokens=`.

        Scoring must go through the outermost wrapper's `forward` (DDP, PEFT, DeepSpeed): calling submodules
        directly skips DDP's gradient all-reduce and the ranks silently drift apart. TRL's fused LM head uses the
        same instance patch. Idempotent.
        """
        bare = unwrap_model(model)
        if getattr(bare, "_t2i_forward_patched", False):
            return
        original_forward = bare.forward

        def forward(*args, t2i_image_tokens=None, **kwargs):
            if t2i_image_tokens is None:
                return original_forward(*args, **kwargs)
            return self.teacher_forced_logits(bare, kwargs["input_ids"], kwargs["attention_mask"], t2i_image_tokens)

        bare.forward = forward
        bare._t2i_forward_patched = True

    def image_logits(
        self,
        model: nn.Module,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        image_tokens: torch.LongTensor,
    ) -> torch.Tensor:
        """Teacher-forced image-head logits `(rows, N, V)` through `model`'s (possibly wrapped) `forward`."""
        logits = model(input_ids=input_ids, attention_mask=attention_mask, t2i_image_tokens=image_tokens)
        expected = (*image_tokens.shape, self.codebook_size)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
            raise RuntimeError(
                f"The model's forward did not return image logits of shape {expected}; call "
                f"`adapter.patch_forward(model)` on every model (policy and reference) before scoring."
            )
        return logits


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DeepSpeed (`.module`) and PEFT (`.get_base_model()`) wrappers down to the bare model."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model
