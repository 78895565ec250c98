"""The sampler: KV-cached classifier-free-guidance decoding of image tokens, eager or compiled.

Every image position runs the same function, `decode_position`: the guided logits of the position (`token_logits`:
guidance, temperature, top-k, top-p, in fp32), the draw, the log-prob of the drawn token (and, when asked for, its
conditional-branch log-prob and the entropy of the distribution) written into fixed-shape output buffers, then the
model's step, which feeds the token and leaves the next position's logits in place.

The draw is the exponential race that `torch.multinomial` runs for one sample, `argmax(p / E)` with `E ~ Exp(1)`
drawn from the generator: the same token as `multinomial` for the same generator state, without its host-side check
of the probabilities (a GPU synchronisation at every position), and with the noise drawn outside `decode_position`,
so the eager and the compiled decode draw the same tokens.

* Eager (`compile=False`): a KV cache allocated per decode, one prefill per distinct prompt (a group's copies of a
  prompt share one).
* Compiled (`compile=True`, `StaticDecoder`): per batch shape, a static KV cache and the buffers, allocated once and
  overwritten in place by every later decode of that shape, and `decode_position` compiled once (a CUDA graph on GPU,
  replayed at every position of every decode: its inputs keep the addresses it was captured with). A batch with fewer
  rows than a compiled shape is padded to it with copies of its last row, whose tokens are discarded, so a last
  partial batch or a smaller evaluation batch reuses the compiled step.
"""

import time
import types
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import trange
from transformers.utils import logging

from .models.base import Conditioning, DecodeState, ModelFamily, unwrap_model
from .sampling import SamplingConfig, gather_logps, position_entropy, token_logits


logger = logging.get_logger(__name__)


@dataclass
class SampleOutput:
    """What `sample_image_tokens` returns.

    Attributes:
        image_tokens: `(B, N)` sampled image tokens.
        logps: `(B, N)` log-prob of each token under the distribution it was sampled from.
        conditional_logps: `(B, N)` log-prob of each token under the conditional branch alone (same temperature,
            no top-k/top-p), when asked for; else `None`.
        entropies: `(B, N)` entropy of the distribution each token was sampled from, when asked for; else `None`.
    """

    image_tokens: torch.LongTensor
    logps: torch.Tensor
    conditional_logps: torch.Tensor | None = None
    entropies: torch.Tensor | None = None


@dataclass
class DecodeBuffers:
    """The tensors one decode reads and writes at every position, of fixed shapes.

    Attributes:
        logits: `(rows, V)` fp32 raw logits of the next position: the conditional rows, then (with guidance) the
            unconditional ones.
        noise: `(B, V)` the Exp(1) draws of the next position's race, one row per image.
        position: `()` the next image position.
        outputs: the `(B, N)` results, filled one position at a time: `image_tokens`, `logps`, and when asked for,
            `conditional_logps` and `entropies`.
    """

    logits: torch.Tensor
    noise: torch.Tensor
    position: torch.Tensor
    outputs: dict[str, torch.Tensor]

    @classmethod
    def allocate(
        cls, logits: torch.Tensor, num_images: int, num_tokens: int, conditional: bool, entropies: bool
    ) -> "DecodeBuffers":
        """Buffers for `num_images` images of `num_tokens` tokens, the first position's `logits` copied in."""
        device = logits.device
        outputs = {
            "image_tokens": torch.zeros(num_images, num_tokens, dtype=torch.long, device=device),
            "logps": torch.zeros(num_images, num_tokens, device=device),
        }
        for name, wanted in (("conditional_logps", conditional), ("entropies", entropies)):
            if wanted:
                outputs[name] = torch.zeros(num_images, num_tokens, device=device)
        # Ones: a padding row's noise is never drawn, and must not divide by zero.
        noise = torch.ones(num_images, logits.size(-1), device=device)
        return cls(logits.float().clone(), noise, torch.zeros((), dtype=torch.long, device=device), outputs)

    def restart(self, logits: torch.Tensor) -> None:
        """Start a new decode in place: the first position's `logits`, position 0."""
        self.logits.copy_(logits)
        self.position.zero_()

    def record(self, name: str, values: torch.Tensor) -> None:
        """Write `(B,)` values of the current position."""
        self.outputs[name].index_copy_(1, self.position.view(1), values[:, None].to(self.outputs[name].dtype))

    def output(self, num_images: int) -> SampleOutput:
        """The results of the first `num_images` rows (copies: the buffers are overwritten by the next decode)."""
        return SampleOutput(**{name: tensor[:num_images].clone() for name, tensor in self.outputs.items()})

    def mark_static(self) -> None:
        """Tell `torch.compile` (and its CUDA graphs) that these tensors keep their addresses from call to call."""
        for tensor in (self.logits, self.noise, self.position, *self.outputs.values()):
            torch._dynamo.mark_static_address(tensor)


def decode_position(
    family: ModelFamily,
    model: nn.Module,
    state: DecodeState,
    buffers: DecodeBuffers,
    sampling: SamplingConfig,
    greedy: bool,
    advance: bool = True,
) -> None:
    """Draw the current position's token from `buffers.logits` and `buffers.noise`, record it and its log-prob (and
    what else `buffers` holds), and with `advance` feed it to the model: `buffers.logits` then hold the next
    position's logits. Only in-place updates of fixed-shape tensors, so that it compiles to one graph."""
    num_images = len(buffers.noise)
    logits = buffers.logits
    conditional, unconditional = (logits[:num_images], logits[num_images:]) if sampling.guided else (logits, None)
    warped = token_logits(conditional, unconditional, sampling)
    if greedy:
        token = warped.argmax(dim=-1)
    else:  # `torch.multinomial(p, 1)`'s own algorithm, on noise drawn outside
        token = (warped.softmax(dim=-1) / buffers.noise).argmax(dim=-1)
    logp_table = warped.log_softmax(dim=-1)
    buffers.record("image_tokens", token)
    buffers.record("logps", gather_logps(logp_table, token))
    if "entropies" in buffers.outputs:
        buffers.record("entropies", position_entropy(logp_table))
    if "conditional_logps" in buffers.outputs:
        conditional_table = token_logits(conditional, None, sampling, truncate=False).log_softmax(dim=-1)
        buffers.record("conditional_logps", gather_logps(conditional_table, token))
    buffers.position.add_(1)
    if advance:
        buffers.logits.copy_(family.step(model, token.repeat(2) if sampling.guided else token, state))


def _decode_and_advance(family, model, state, buffers, sampling, greedy) -> None:
    """`decode_position` with a model step: the function the static decoder compiles (every position but the last)."""
    decode_position(family, model, state, buffers, sampling, greedy, advance=True)


@torch.no_grad()
def sample_image_tokens(
    family: ModelFamily,
    model: nn.Module,
    conditioning: Conditioning,
    sampling: SamplingConfig = SamplingConfig(),
    *,
    do_sample: bool = True,
    generator: torch.Generator | None = None,
    return_conditional_logps: bool = False,
    return_entropies: bool = False,
    compile: bool = False,
    show_progress: bool = False,
) -> SampleOutput:
    """Sample one image per conditional row with a KV cache, all rows in one batch.

    Args:
        family: the model family.
        model: the model; DDP/PEFT wrappers are stripped (LoRA layers stay active in the bare model).
        conditioning: the conditional rows, from `family.encode_prompts` (or `build_conditioning`).
        sampling: guidance and warping; the unconditional rows run only when `sampling.cfg_scale != 1`.
        do_sample: sample (`True`) or take the most likely token (greedy).
        generator: RNG of the draws; `None` uses the global RNG (as `generate` does). The same generator state gives
            the same tokens as `torch.multinomial`, eager or compiled.
        return_conditional_logps: also record the conditional-branch log-prob of each token.
        return_entropies: also record the entropy of the distribution each token was sampled from.
        compile: decode with `family`'s `StaticDecoder` (`static_decoder`): a static KV cache and a `torch.compile`d
            position step (CUDA graphs on GPU), compiled once per batch shape and reused by every later call; the same
            tokens and log-probs as the eager decode, much less per-step overhead.
        show_progress: show a progress bar over image positions.
    """
    model = unwrap_model(model)
    if return_conditional_logps and not sampling.guided:
        raise ValueError("With cfg_scale=1 the sampled distribution is the conditional one; use `logps`.")
    if compile:
        return static_decoder(family).sample(
            model,
            conditioning,
            sampling,
            do_sample=do_sample,
            generator=generator,
            return_conditional_logps=return_conditional_logps,
            return_entropies=return_entropies,
            show_progress=show_progress,
        )
    rows = family.guided_rows(conditioning) if sampling.guided else conditioning
    logits, state = prefill_distinct_rows(family, model, rows)
    num_tokens = family.num_image_tokens
    buffers = DecodeBuffers.allocate(logits, len(conditioning), num_tokens, return_conditional_logps, return_entropies)
    for position in trange(num_tokens, desc="Sampling image tokens", disable=not show_progress):
        if do_sample:
            buffers.noise.exponential_(generator=generator)
        decode_position(family, model, state, buffers, sampling, not do_sample, advance=position + 1 < num_tokens)
    return buffers.output(len(conditioning))


def distinct_rows(conditioning: Conditioning) -> torch.LongTensor | None:
    """Index of each row among the rows that differ from the row before (GRPO's `num_generations` consecutive copies
    of a prompt, and identical unconditional rows), or `None` when every row differs from the one before."""
    same = torch.ones(len(conditioning) - 1, dtype=torch.bool, device=next(iter(conditioning.tensors.values())).device)
    for tensor in conditioning.tensors.values():
        same &= (tensor[1:] == tensor[:-1]).flatten(1).all(dim=1) if tensor.dim() > 1 else tensor[1:] == tensor[:-1]
    if not same.any():
        return None
    return torch.cat([same.new_zeros(1), same]).logical_not().cumsum(0) - 1


def prefill_distinct_rows(family: ModelFamily, model: nn.Module, conditioning: Conditioning):
    """`family.prefill` once per run of identical consecutive rows, then expanded to every row."""
    index = distinct_rows(conditioning) if len(conditioning) > 1 else None
    if index is None:
        return family.prefill(model, conditioning)
    first = torch.cat([index.new_zeros(1), (index[1:] != index[:-1]).nonzero().flatten() + 1])
    logits, state = family.prefill(
        model, Conditioning({name: tensor[first] for name, tensor in conditioning.tensors.items()})
    )
    state.select_rows(index)
    return logits[index], state


class StaticDecoder:
    """The compiled decode of one model family: `decode_position` compiled once, and per batch shape a static
    `DecodeState` and `DecodeBuffers` allocated once and overwritten in place by every decode of that shape.

    A compiled step specialises on every shape it reads, and a CUDA graph on the address of every tensor it reads: a
    fresh KV cache per decode would record a new graph at every rollout (and PyTorch stops using CUDA graphs after 128
    re-recordings). So the tensors stay, for the price of keeping them allocated between decodes (`docs/memory.md`).

    Args:
        family: the model family (with `supports_static_decoding`).
    """

    def __init__(self, family: ModelFamily):
        if not family.supports_static_decoding:
            raise ValueError(f"{type(family).__name__} has no static decode to compile; sample with `compile=False`.")
        self.family = family
        self.steps: dict[str, callable] = {}
        self.shapes: dict[tuple, tuple[DecodeState, DecodeBuffers]] = {}
        self.calls: dict[tuple, int] = {}
        """Calls of each CUDA graph: batch shape and attended length (one compiled graph serves every length)."""
        self.compile_seconds = 0.0
        """Seconds spent in the first calls of each new shape (compilation and CUDA-graph capture)."""

    def padded_size(self, num_images: int) -> int:
        """The batch a decode of `num_images` runs at: the smallest one already compiled that holds them, or its
        own."""
        compiled = [key[0] for key in self.shapes if key[0] >= num_images]
        return min(compiled, default=num_images)

    def compiled_step(self, device: torch.device):
        """`decode_position` with a model step, compiled for `device`'s type: a CUDA graph on GPU
        (`mode="reduce-overhead"`), kernel fusion elsewhere."""
        if device.type not in self.steps:
            mode = "reduce-overhead" if device.type == "cuda" else None
            self.steps[device.type] = torch.compile(_own_copy(_decode_and_advance), dynamic=False, mode=mode)
        return self.steps[device.type]

    def sample(
        self,
        model: nn.Module,
        conditioning: Conditioning,
        sampling: SamplingConfig,
        *,
        do_sample: bool = True,
        generator: torch.Generator | None = None,
        return_conditional_logps: bool = False,
        return_entropies: bool = False,
        show_progress: bool = False,
    ) -> SampleOutput:
        """`sample_image_tokens(..., compile=True)` with this decoder's compiled step and buffers."""
        family, num_images, num_tokens = self.family, len(conditioning), self.family.num_image_tokens
        padded = conditioning.padded_to(self.padded_size(num_images))
        rows = family.guided_rows(padded) if sampling.guided else padded
        key = (len(padded), family.static_decode_length(rows), sampling.guided, return_conditional_logps)
        key += (return_entropies, model.device)
        state, buffers = self.shapes.get(key, (None, None))
        logits, state = family.prefill(model, rows, static=True, reuse=state)
        if buffers is None:
            logger.warning(
                f"Compiling the image decode step for batches of {len(padded)} images (once per batch shape and run, "
                "tens of seconds, longer for larger models; `compile_rollouts`/`--compile false` decodes eagerly)."
            )
            buffers = DecodeBuffers.allocate(
                logits, len(padded), num_tokens, return_conditional_logps, return_entropies
            )
            buffers.mark_static()
            self.shapes[key] = (state, buffers)
        else:
            buffers.restart(logits)

        cuda_graphs = model.device.type == "cuda"
        step = self.compiled_step(model.device)
        for position in trange(num_tokens, desc="Sampling image tokens", disable=not show_progress):
            if do_sample:
                buffers.noise[:num_images].exponential_(generator=generator)
            if position + 1 == num_tokens:  # no model step after the last token: not worth a graph of its own
                decode_position(family, model, state, buffers, sampling, not do_sample, advance=False)
                continue
            state.attend(position)  # a CUDA graph per attended length (`ATTENDED_LENGTH_MULTIPLE`)
            if cuda_graphs:  # nothing the previous replay returned is read again: it may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            graph = (key, state.cache.attended)
            calls = self.calls.get(graph, 0)
            self.calls[graph] = calls + 1
            if calls < 2:  # compiled at a shape's first call, a CUDA graph captured at each length's second
                self.compile_seconds += _seconds(step, family, model, state, buffers, sampling, not do_sample)
            else:
                step(family, model, state, buffers, sampling, not do_sample)
        return buffers.output(num_images)


def _own_copy(function):
    """`function` with a code object of its own. Dynamo keeps compiled code per code object, and stops compiling one
    after `recompile_limit` (8) guard failures: every decoder (every run of a sweep, every model) compiles its own."""
    return types.FunctionType(
        function.__code__.replace(), function.__globals__, function.__name__, function.__defaults__
    )


def _seconds(function, family, model, *args) -> float:
    """Wall time of `function(family, model, *args)`, its GPU work included."""
    synchronize = torch.cuda.synchronize if model.device.type == "cuda" else lambda: None
    synchronize()
    start = time.perf_counter()
    function(family, model, *args)
    synchronize()
    return time.perf_counter() - start


_STATIC_DECODERS: "weakref.WeakKeyDictionary[ModelFamily, StaticDecoder]" = weakref.WeakKeyDictionary()


def static_decoder(family: ModelFamily) -> StaticDecoder:
    """The `StaticDecoder` of `family`, created at the first call: every compiled decode with the same family object
    (a run's) shares its compiled step and buffers."""
    if family not in _STATIC_DECODERS:
        _STATIC_DECODERS[family] = StaticDecoder(family)
    return _STATIC_DECODERS[family]


COMPILE_SETTINGS = ("auto", "true", "false")


def compile_setting(value: str | bool) -> str:
    """`"auto"`, `"true"` or `"false"` from a config or flag value (booleans accepted); a clear error otherwise."""
    setting = str(value).lower()
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"Unknown compile setting {value!r}. Valid choices: {', '.join(COMPILE_SETTINGS)}.")
    return setting


def resolve_compile(
    value: str | bool,
    family: ModelFamily,
    device: torch.device | str,
    name: str = "compile",
    gathered_weights: bool = False,
) -> bool:
    """Whether to decode compiled (`StaticDecoder`): `"auto"` where it pays, on a CUDA device for a family with a
    static decode (on CPU the compiled step saves little per position and takes tens of seconds to compile), unless
    the weights are `gathered_weights` for each rollout (ZeRO-3, FSDP): gathered anew, they move, and a CUDA graph
    would be recorded again at every rollout."""
    setting = compile_setting(value)
    if setting == "true" and not family.supports_static_decoding:
        raise ValueError(
            f"`{name}=true` needs a static decode, which the {family.model_type!r} family does not have; "
            "use auto or false."
        )
    cuda = torch.device(device).type == "cuda"
    auto = cuda and family.supports_static_decoding and not gathered_weights
    return setting == "true" or (setting == "auto" and auto)
