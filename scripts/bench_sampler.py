"""Benchmark the KV-cached CFG sampler against `JanusForConditionalGeneration.generate`, its overhead beyond the
model's own forwards, LoRA folded vs unfolded while sampling, the allocations of a growing vs a preallocated KV
cache, and the gap between the sampler's recorded log-probs and teacher forcing in fp32 and in bf16 autocast.

    python scripts/bench_sampler.py [--images 4] [--repeats 3] [--threads 1] [--widths tiny,mid,long,pro1b]

Everything is timed in one process on the same random Janus models (built locally, random weights), repeats
interleaved (generate, ours, ours compiled, ...) and the median reported, so that load on the machine hits all alike.
Our sampler also records the log-prob of every token; `generate` does not. All sample with guidance 5, top-k off.
Speeds are ratios (> 1: ours is faster), which is what carries over between machines.

* `forwards only`: prefill + one `family.step` per position with fixed tokens, nothing else: the model's own cost.
  `overhead` = eager sampler / forwards only − 1 (guidance, warping, the draw, log-probs, bookkeeping).
* `compiled`: `sample_image_tokens(..., compile=True)`, a static KV cache and a `torch.compile`d step (compiled
  before timing).
* LoRA (r=16 on every language-model linear, random B): sampling with the adapters active vs folded into the base
  weights (`merged_adapters`, what the trainer does by default).
* KV-cache allocation profile: bytes allocated per decode step with transformers' `DynamicLayer` (grown by
  concatenation at every step, what the sampler did before) vs our `PreallocatedLayer`, from `torch.profiler`.
"""

import argparse
import statistics
import time
from unittest import mock

import torch
from peft import LoraConfig, get_peft_model
from torch.profiler import ProfilerActivity, profile
from transformers.cache_utils import DynamicLayer

from trl_t2i.decoding import prefill_distinct_rows, sample_image_tokens
from trl_t2i.merged_adapters import merged_adapters
from trl_t2i.models import build_tiny_janus, cache, get_family
from trl_t2i.sampling import SamplingConfig, image_logp_table


WIDTHS = {  # name: (description, build_tiny_janus kwargs); 4 attention heads throughout, MLP width 2×hidden
    "tiny": ("tiny: h32, 2 layers, 16 tok, 64 codes", {}),
    "mid": (
        "mid: h1024, 8 layers, 144 tok, 4096 codes",
        {"hidden_size": 1024, "num_layers": 8, "image_tokens_per_side": 12, "codebook_size": 4096},
    ),
    "long": (
        "long: h1024, 2 layers, 576 tok (Janus' 24×24), 4096 codes",
        {"hidden_size": 1024, "num_layers": 2, "image_tokens_per_side": 24, "codebook_size": 4096},
    ),
    "pro1b": (
        "Janus-Pro-1B width: h2048, 2 layers, 64 tok, 16384 codes",
        {"hidden_size": 2048, "num_layers": 2, "image_tokens_per_side": 8, "codebook_size": 16384},
    ),
}
SAMPLING = SamplingConfig(cfg_scale=5.0, top_k=0)
PROMPT = "a red cat on a table"


def interleaved_medians(functions: list, repeats: int) -> list[float]:
    """Median wall time of each function over `repeats` rounds, each round running every function once in turn."""
    times = [[] for _ in functions]
    for _ in range(repeats):
        for function, record in zip(functions, times, strict=True):
            start = time.perf_counter()
            function()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


@torch.no_grad()
def forwards_only(family, model, conditioning) -> None:
    """The model's own work in a guided decode: the prefill and one step per position, fixed tokens."""
    _, state = prefill_distinct_rows(family, model, family.guided_rows(conditioning))
    tokens = torch.zeros(2 * len(conditioning), dtype=torch.long)
    for _ in range(family.num_image_tokens - 1):
        family.step(model, tokens, state)


def logp_gap(family, model, conditioning, autocast_dtype) -> float:
    """Max |sampler log-prob − teacher-forced log-prob| over every sampled token."""
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None), torch.no_grad():
        sample = sample_image_tokens(family, model, conditioning, SAMPLING)
        table = image_logp_table(family, model, conditioning, sample.image_tokens, SAMPLING)
    scored = table.gather(-1, sample.image_tokens[..., None]).squeeze(-1)
    return (scored - sample.logps).abs().max().item()


def build(config: dict, images: int):
    model, processor = build_tiny_janus(**config)
    model.eval()
    family = get_family(model, processor)
    family.patch_forward(model)
    return model, family, family.encode_prompts([PROMPT] * images)


def bench_speed(config: dict, images: int, repeats: int) -> dict:
    model, family, conditioning = build(config, images)

    def generate():
        model.generate(
            **conditioning.tensors, generation_mode="image", do_sample=True, guidance_scale=SAMPLING.cfg_scale,
            top_k=0,
        )  # fmt: skip

    functions = {
        "generate": generate,
        "forwards": lambda: forwards_only(family, model, conditioning),
        "eager": lambda: sample_image_tokens(family, model, conditioning, SAMPLING),
        "compiled": lambda: sample_image_tokens(family, model, conditioning, SAMPLING, compile=True),
    }
    for function in functions.values():  # warm-up: first-call allocations, and the compilation
        function()
    times = dict(zip(functions, interleaved_medians(list(functions.values()), repeats), strict=True))
    times["gaps"] = [logp_gap(family, model, conditioning, dtype) for dtype in (None, torch.bfloat16)]
    return times


def bench_lora(config: dict, images: int, repeats: int) -> dict:
    model, family, conditioning = build(config, images)
    peft_model = get_peft_model(model, LoraConfig(r=16, target_modules=family.lora_target_modules))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01)

    def folded():
        with merged_adapters(peft_model):
            sample_image_tokens(family, peft_model, conditioning, SAMPLING)

    def without_lora():
        with peft_model.disable_adapter():
            sample_image_tokens(family, peft_model, conditioning, SAMPLING)

    functions = [lambda: sample_image_tokens(family, peft_model, conditioning, SAMPLING), folded, without_lora]
    for function in functions:
        function()
    return dict(zip(["unfolded", "folded", "none"], interleaved_medians(functions, repeats), strict=True))


def allocated_per_step(config: dict, images: int, growing: bool) -> tuple[float, int]:
    """(MB allocated per decode step, `aten::cat` calls per step) of the eager sampler, with a KV cache grown by
    concatenation (transformers' `DynamicLayer`) or preallocated (ours)."""
    model, family, conditioning = build(config, images)
    layer = (lambda max_length: DynamicLayer()) if growing else cache.PreallocatedLayer
    with (
        mock.patch.object(cache, "PreallocatedLayer", layer),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler,
    ):
        sample_image_tokens(family, model, conditioning, SAMPLING)
    events = profiler.key_averages()
    allocated = sum(event.self_cpu_memory_usage for event in events if event.self_cpu_memory_usage > 0)
    cats = sum(event.count for event in events if event.key == "aten::cat")
    return allocated / family.num_image_tokens / 2**20, cats // family.num_image_tokens


def main(images: int, repeats: int, threads: int, widths: list[str]) -> None:
    torch.set_num_threads(threads)
    print(f"{images} images (2×{images} rows with CFG), cfg 5, top-k off, median of {repeats} interleaved repeats; ")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    print(
        "| model | generate (s) | forwards only (s) | ours (s) | overhead | generate/ours "
        "| ours compiled (s) | generate/compiled | max logp gap fp32 | max logp gap bf16 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for width in widths:
        name, config = WIDTHS[width]
        t = bench_speed(config, images, repeats)
        print(
            f"| {name} | {t['generate']:.3f} | {t['forwards']:.3f} | {t['eager']:.3f} "
            f"| {t['eager'] / t['forwards'] - 1:+.0%} | {t['generate'] / t['eager']:.2f}× | {t['compiled']:.3f} "
            f"| {t['generate'] / t['compiled']:.2f}× | {t['gaps'][0]:.1e} | {t['gaps'][1]:.1e} |",
            flush=True,
        )

    print("\nLoRA r=16 on every language-model linear, eager sampler:\n")
    print("| model | adapters active (s) | folded (s) | no LoRA (s) | active/folded |")
    print("|---|---|---|---|---|")
    for width in widths:
        name, config = WIDTHS[width]
        t = bench_lora(config, images, repeats)
        print(
            f"| {name} | {t['unfolded']:.3f} | {t['folded']:.3f} | {t['none']:.3f} "
            f"| {t['unfolded'] / t['folded']:.2f}× |",
            flush=True,
        )

    print("\nKV cache, allocations per decode step (eager sampler, torch.profiler):\n")
    print("| model | growing cache (MB/step) | `aten::cat`/step | preallocated (MB/step) | `aten::cat`/step |")
    print("|---|---|---|---|---|")
    for width in widths:
        name, config = WIDTHS[width]
        growing, growing_cats = allocated_per_step(config, images, growing=True)
        preallocated, preallocated_cats = allocated_per_step(config, images, growing=False)
        print(f"| {name} | {growing:.2f} | {growing_cats} | {preallocated:.2f} | {preallocated_cats} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="Images sampled per call.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed interleaved rounds; the median is reported.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads.")
    parser.add_argument("--widths", default=",".join(WIDTHS), help=f"Comma-separated, from {', '.join(WIDTHS)}.")
    arguments = parser.parse_args()
    main(arguments.images, arguments.repeats, arguments.threads, arguments.widths.split(","))
