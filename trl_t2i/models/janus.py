"""The family of transformers' `JanusForConditionalGeneration` (Janus-Pro 1B/7B in transformers format).

Image generation in Janus: the prompt is the chat-formatted caption followed by `<begin_of_image>`; each image token
is embedded by `generation_embeddings` → `generation_aligner`, run through the language model and scored by
`generation_head`. The unconditional CFG row replaces every prompt token except BOS and `<begin_of_image>` by PAD,
exactly like `JanusForConditionalGeneration.generate(generation_mode="image")`.
"""

import torch
from transformers import JanusForConditionalGeneration

from .base import Conditioning, DecodeState, ModelFamily, image_head_logits, static_cache_length
from .cache import PreallocatedCache


class JanusFamily(ModelFamily):
    model_type = "janus"
    model_class = JanusForConditionalGeneration
    lora_target_modules = (
        r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
    )
    # Full paths: transformers matches skip entries from the root, so a bare "generation_head" would be ignored.
    quantization_skip_modules = [
        "lm_head",
        "model.generation_head",
        "model.generation_aligner",
        "model.vision_model",
        "model.aligner",
        "model.vqmodel",
    ]
    image_head = "model.generation_head"
    supports_static_decoding = True

    def __init__(self, config, processing_class):
        super().__init__(config, processing_class)
        tokenizer = processing_class.tokenizer
        self.bos_token_id = tokenizer.bos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.boi_token_id = tokenizer.convert_tokens_to_ids(processing_class.image_start_token)

    @property
    def num_image_tokens(self) -> int:
        return self.config.vision_config.num_image_tokens

    @property
    def codebook_size(self) -> int:
        return self.config.vq_config.num_embeddings

    def tokenize_prompts(self, texts: list[str]) -> tuple[torch.LongTensor, torch.LongTensor]:
        processor = self.processing_class
        chats = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "text", "text": text}]}], add_generation_prompt=True
            )
            for text in texts
        ]
        encoding = processor(
            text=chats, generation_mode="image", padding=True, padding_side="left", return_tensors="pt"
        )
        return encoding["input_ids"], encoding["attention_mask"]

    def prompt_limit(self) -> tuple[int, str]:
        context = self.config.text_config.max_position_embeddings
        why = f"its language model's context of {context} positions less its {self.num_image_tokens} image tokens"
        return context - self.num_image_tokens, why

    def build_conditioning(self, prompt_ids, prompt_mask) -> Conditioning:
        return Conditioning({"input_ids": prompt_ids, "attention_mask": prompt_mask})

    def unconditional(self, conditioning: Conditioning) -> Conditioning:
        input_ids = conditioning.tensors["input_ids"]
        keep = (input_ids == self.bos_token_id) | (input_ids == self.boi_token_id)
        return self.build_conditioning(
            input_ids.masked_fill(~keep, self.pad_token_id), conditioning.tensors["attention_mask"]
        )

    def teacher_forced_logits(self, model, conditioning, image_tokens):
        input_ids, attention_mask = conditioning.tensors["input_ids"], conditioning.tensors["attention_mask"]
        prompt_length = input_ids.size(1)
        embeds = torch.cat(
            [
                model.get_input_embeddings()(input_ids),
                model.prepare_embeddings_for_image_generation(image_tokens[:, :-1]),
            ],
            dim=1,
        )
        mask = torch.cat([attention_mask, attention_mask.new_ones(image_tokens[:, :-1].shape)], dim=1)
        hidden = model.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, use_cache=False
        ).last_hidden_state
        # Position P-1 (<begin_of_image>) predicts image token 0, position P+i-1 predicts token i.
        return image_head_logits(model.model.generation_head, hidden[:, prompt_length - 1 :])

    def static_decode_length(self, conditioning: Conditioning) -> int:
        return static_cache_length(conditioning.tensors["input_ids"].size(1) + self.num_image_tokens)

    def prefill(self, model, conditioning, static=False, reuse=None):
        input_ids, attention_mask = conditioning.tensors["input_ids"], conditioning.tensors["attention_mask"]
        prompt_length = input_ids.size(1)
        num_layers = model.config.get_text_config().num_hidden_layers
        if static:
            max_length = self.static_decode_length(conditioning)
            state = reuse or DecodeState.allocate_static(
                num_layers, max_length, (len(input_ids), max_length), model.device
            )
            state.restart(attention_mask)
            # A static cache attends over all its positions (causality hides the ones not written yet).
            mask = state.attention_mask
        else:
            # Cache and mask are allocated once for the prompt and every image token (not grown at every step).
            cache = PreallocatedCache(num_layers, prompt_length + self.num_image_tokens)
            full_mask = torch.cat([attention_mask, attention_mask.new_ones(len(input_ids), self.num_image_tokens)], 1)
            state = DecodeState(cache=cache, attention_mask=full_mask, length=prompt_length)
            mask = attention_mask
        output = model.model.language_model(
            inputs_embeds=model.get_input_embeddings()(input_ids),
            attention_mask=mask,
            cache=state.cache,
            use_cache=True,
        )
        return image_head_logits(model.model.generation_head, output.last_hidden_state[:, -1]), state

    def step(self, model, image_tokens, state):
        if state.static:
            # The whole static mask: transformers reads the attended positions of it (a slice of it would be
            # contiguous at the cache's full length only, a guard that compiles a second graph for that length).
            attention_mask = state.attention_mask
        else:
            state.length += 1
            attention_mask = state.attention_mask[:, : state.length]
        output = model.model.language_model(
            inputs_embeds=model.prepare_embeddings_for_image_generation(image_tokens[:, None]),
            attention_mask=attention_mask,
            cache=state.cache,
            use_cache=True,
        )
        return image_head_logits(model.model.generation_head, output.last_hidden_state[:, -1])

    def similarity_embeddings(self, model, image_tokens):
        # the input embeddings of image generation (the paper's `prepare_gen_img_embeds`)
        return model.prepare_embeddings_for_image_generation(image_tokens)
