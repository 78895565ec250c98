"""Benchmark the KV-cached CFG sampler against `JanusForConditionalGeneration.generate`, and measure how closely the
sampler's recorded log-probs match teacher forcing in fp32 and in bf16 autocast.

    python scripts/bench_sampler.py [--images 16] [--repeats 7]

Both are timed in the same run on the same tiny random Janus models (built locally), best of `--repeats`; the speed
is reported as a ratio, which is what carries over between machines.
"""

import argparse
import time

import torch

from trl_t2i.models import build_tiny_janus, get_adapter
from trl_t2i.sampling import image_token_logprobs, sample_image_tokens


CONFIGS = {  # name: build_tiny_janus kwargs
    "tiny (h32, 16 tok, 64 codes)": {},
    "small (h128, 64 tok, 1024 codes)": {
        "hidden_size": 128,
        "num_layers": 4,
        "image_tokens_per_side": 8,
        "codebook_size": 1024,
    },
}


def best_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def logprob_gap(adapter, model, input_ids, attention_mask, autocast_dtype) -> float:
    """Max |sampler log-prob − teacher-forced log-prob| over every sampled token."""
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        sample = sample_image_tokens(adapter, model, input_ids, attention_mask, cfg_scale=5.0)
        with torch.no_grad():
            full = image_token_logprobs(adapter, model, input_ids, attention_mask, sample.image_tokens, cfg_scale=5.0)
    scored = full.gather(-1, sample.image_tokens[..., None]).squeeze(-1)
    return (scored - sample.logprobs).abs().max().item()


def bench(config: dict, images: int, repeats: int) -> tuple[float, float, list[float]]:
    """(generate's time, our time, [fp32 gap, bf16 gap]) on one tiny configuration."""
    model, processor = build_tiny_janus(**config)
    model.eval()
    adapter = get_adapter(model, processor)
    adapter.patch_forward(model)
    input_ids, attention_mask = adapter.prepare_prompts(["a red cat on a table"] * images)

    def generate():
        model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_mode="image", do_sample=True,
            guidance_scale=5.0, top_k=0,
        )  # fmt: skip

    def ours():
        sample_image_tokens(adapter, model, input_ids, attention_mask, cfg_scale=5.0)

    gaps = [logprob_gap(adapter, model, input_ids, attention_mask, dtype) for dtype in (None, torch.bfloat16)]
    return best_time(generate, repeats), best_time(ours, repeats), gaps


def main(images: int, repeats: int) -> None:
    print(f"{images} images, cfg 5, best of {repeats}; torch threads: {torch.get_num_threads()}\n")
    print("| model | generate (s) | ours (s) | speed-up | max logp gap fp32 | max logp gap bf16 |")
    print("|---|---|---|---|---|---|")
    for name, config in CONFIGS.items():
        generate_time, our_time, gaps = bench(config, images, repeats)
        print(
            f"| {name} | {generate_time:.3f} | {our_time:.3f} | {generate_time / our_time:.2f}× "
            f"| {gaps[0]:.1e} | {gaps[1]:.1e} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="Images sampled per call.")
    parser.add_argument("--repeats", type=int, default=7, help="Timed repetitions; the best is reported.")
    arguments = parser.parse_args()
    main(arguments.images, arguments.repeats)
