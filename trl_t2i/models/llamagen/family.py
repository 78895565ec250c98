"""The family of `LlamaGenForImageGeneration` (LlamaGen-T2I converted by `trl-t2i convert_llamagen`).

The prompt ids TRL carries are the captions' T5 ids (left-padded, at most `caption_length`); the frozen T5 encoder
runs inside the model, in the same forward for sampling and for teacher-forced scoring, so both see the same ids,
padding and masks. A row of the conditioning is `(input_ids, attention_mask, null_caption)`: the unconditional row
of a caption is the same ids and mask with `null_caption` set, which the model reads as LlamaGen's null caption
under the caption's mask (LlamaGen's `generate`). A decode's state carries the caption's mask: every step passes it
again, and the model finds the caption length and the grid cell of the new token from it.
"""

import torch
import torch.nn.functional as F

from ..base import Conditioning, DecodeState, ModelFamily, static_cache_length
from ..cache import PreallocatedCache
from . import captions
from .modeling_llamagen import LlamaGenForImageGeneration


class LlamaGenFamily(ModelFamily):
    model_type = "llamagen"
    model_class = LlamaGenForImageGeneration
    lora_target_modules = (
        r".*transformer\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
    )
    # Full paths from the root: transformers matches skip entries from there.
    quantization_skip_modules = ["text_encoder", "caption_embedder", "image_head", "vqmodel"]
    image_head = "image_head"
    supports_static_decoding = True

    def __init__(self, config, processing_class):
        super().__init__(config, processing_class)
        if config.clean_captions:  # before any caption is tokenized, e.g. at the trainer's set-up
            captions.check_installed()

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def tokenize_prompts(self, texts: list[str]) -> tuple[torch.LongTensor, torch.LongTensor]:
        # Truncated as LlamaGen's T5 embedder does; training refuses (or cuts) longer captions when it reads them.
        encoding = self.processing_class(
            self._prepared(texts),
            padding=True,
            padding_side="left",
            truncation=True,
            max_length=self.config.caption_length,
            return_tensors="pt",
        )
        return encoding["input_ids"], encoding["attention_mask"]

    def prompt_lengths(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.processing_class(self._prepared(texts), verbose=False)["input_ids"]]

    def prompt_limit(self) -> tuple[int, str]:
        return self.config.caption_length, f"its caption length of {self.config.caption_length} T5 tokens"

    def _prepared(self, texts: list[str]) -> list[str]:
        """The captions as LlamaGen's T5 embedder prepares them: cleaned (or only lowercased, `clean_captions`)."""
        prepare = captions.clean_caption if self.config.clean_captions else _lowercased
        return [prepare(text) for text in texts]

    def build_conditioning(self, prompt_ids, prompt_mask) -> Conditioning:
        null_caption = torch.zeros(len(prompt_ids), dtype=torch.bool, device=prompt_ids.device)
        return Conditioning({"input_ids": prompt_ids, "attention_mask": prompt_mask, "null_caption": null_caption})

    def unconditional(self, conditioning: Conditioning) -> Conditioning:
        return Conditioning(
            {**conditioning.tensors, "null_caption": torch.ones_like(conditioning.tensors["null_caption"])}
        )

    def teacher_forced_logits(self, model, conditioning, image_tokens):
        return model(**conditioning.tensors, image_tokens=image_tokens[:, :-1]).logits

    def static_decode_length(self, conditioning: Conditioning) -> int:
        return static_cache_length(self.config.caption_length + self.num_image_tokens)

    def prefill(self, model, conditioning, static=False, reuse=None):
        num_layers = self.config.num_hidden_layers
        if static:  # every step sees a caption of `caption_length` tokens: one compiled step for every caption
            conditioning = self._padded_to_caption_length(conditioning)
            caption_mask = conditioning.tensors["attention_mask"]
            max_length = self.static_decode_length(conditioning)
            state = reuse or DecodeState.allocate_static(num_layers, max_length, caption_mask.shape, model.device)
            state.restart(caption_mask)
        else:  # allocated once for the caption and every image token (not grown at every step)
            caption_mask = conditioning.tensors["attention_mask"]
            cache = PreallocatedCache(num_layers, caption_mask.size(1) + self.num_image_tokens)
            state = DecodeState(cache=cache, attention_mask=caption_mask, length=caption_mask.size(1))
        output = model(**conditioning.tensors, cache=state.cache, use_cache=True)
        return output.logits[:, -1], state

    def _padded_to_caption_length(self, conditioning: Conditioning) -> Conditioning:
        """The rows left-padded to `caption_length` T5 tokens. The same logits: padding is masked, caption positions
        carry no rotary embedding and image positions count from the caption's end."""
        missing = self.config.caption_length - conditioning.tensors["input_ids"].size(1)
        padded = dict(conditioning.tensors)
        padded["input_ids"] = F.pad(padded["input_ids"], (missing, 0), value=self.processing_class.pad_token_id)
        padded["attention_mask"] = F.pad(padded["attention_mask"], (missing, 0), value=0)
        return Conditioning(padded)

    def step(self, model, image_tokens, state):
        # the caption is in the cache: only its mask goes in again
        output = model(
            attention_mask=state.attention_mask, image_tokens=image_tokens[:, None], cache=state.cache, use_cache=True
        )
        return output.logits[:, -1]

    def similarity_embeddings(self, model, image_tokens):
        # the VQ codebook vectors the decoder starts from, l2-normalised (the paper's `decode_code` → z_q)
        return F.normalize(model.vqmodel.quantize.embedding(image_tokens), dim=-1)


def _lowercased(text: str) -> str:
    return text.lower().strip()
