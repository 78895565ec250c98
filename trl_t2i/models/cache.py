"""The KV caches of the image decode, one stack for every family: transformers' `Cache` with two layers of our own.

* `PreallocatedCache` (the eager decode): each layer's keys and values live in buffers allocated once for the prompt
  and every image token; attention sees exactly what `generate`'s `DynamicCache` would give it.
* `StaticDecodeCache` (the compiled decode): fixed-shape buffers and a position counter held in a tensor, so one
  compiled step serves every position, and every step attends over the first `attended` positions only (a dynamic
  size of that step).

A family's model calls `cache.update(keys, values, layer_idx)` in every attention layer and reads the positions
already cached (`get_seq_length`) and the keys a step attends over (`get_mask_sizes`), like transformers' models.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers allocated once for `max_length` positions: `update`
    writes the new positions in place and returns views of the positions so far, instead of concatenating the whole
    cache at every step. Attention sees exactly the tensors a `DynamicLayer` would give it (same length, same
    values), so the masks, positions and logits are those of `generate`'s `DynamicCache`."""

    def __init__(self, max_length: int):
        super().__init__()
        self.max_length = max_length
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.key_buffer = key_states.new_empty((*key_states.shape[:2], self.max_length, key_states.shape[-1]))
        self.value_buffer = value_states.new_empty((*value_states.shape[:2], self.max_length, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.size(-2)
        if end > self.max_length:
            raise ValueError(f"The cache holds {self.max_length} positions; {end} were fed.")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]


class PreallocatedCache(Cache):
    """A `Cache` of `PreallocatedLayer`s, each allocated once for `max_length` positions."""

    def __init__(self, num_layers: int, max_length: int):
        super().__init__(layers=[PreallocatedLayer(max_length) for _ in range(num_layers)])


SPARE_POSITIONS = 1
"""Positions a `StaticDecodeCache` holds past the most it attends: a slice of its buffers is then never contiguous,
so contiguity is not something the compiled step can guard on (a second graph for the full length)."""


class AttendedStaticLayer(StaticLayer):
    """transformers' `StaticLayer` (zero-filled buffers for `max_cache_len` positions, marked as static addresses,
    and a tensor position counter, so one compiled step serves every position) whose attention reads only its first
    positions, as many as its cache's `window` holds (`StaticDecodeCache.attend`): the step writes the new keys and
    values in place and returns views of those positions."""

    def __init__(self, max_cache_len: int, cache: "StaticDecodeCache"):
        super().__init__(max_cache_len)
        self.cache = cache

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        return keys[:, :, : self.cache.attended], values[:, :, : self.cache.attended]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.attended, 0


class StaticDecodeCache(Cache):
    """A `Cache` of `AttendedStaticLayer`s for the compiled decode, all attending over the same positions. `reset`
    empties it in place (every tensor keeps its address, which a CUDA graph captured) and attends over all of it.

    How many positions a step attends over is the length of a tensor, `window`, marked dynamic: the compiled step
    reads it as a symbolic size, so one graph serves every attended length (a CUDA graph is still captured per
    length). An int attribute would be a constant of the graph: one compilation per length.
    """

    def __init__(self, num_layers: int, max_length: int, device: torch.device | str | None = None):
        super().__init__(layers=[AttendedStaticLayer(max_length + SPARE_POSITIONS, self) for _ in range(num_layers)])
        self.max_length = max_length
        self.positions = self.window = torch.arange(max_length, device=device)
        torch._dynamo.maybe_mark_dynamic(self.window, 0)

    @property
    def attended(self) -> int:
        """The positions the next forwards attend over (a symbolic size inside a compiled step)."""
        return self.window.size(0)

    def attend(self, length: int) -> None:
        """Let the next forwards attend over the first `length` positions only (causality hides the others)."""
        if length != self.attended:  # called at every position; the length changes a few times per decode
            self.window = self.positions[:length]
            torch._dynamo.maybe_mark_dynamic(self.window, 0)

    def reset(self) -> None:
        super().reset()
        self.attend(self.max_length)
