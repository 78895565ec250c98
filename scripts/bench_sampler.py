"""Benchmark the KV-cached CFG sampler against `JanusForConditionalGeneration.generate`, and measure how closely the
sampler's recorded log-probs match teacher forcing in fp32 and in bf16 autocast.

    python scripts/bench_sampler.py [--images 4] [--repeats 3] [--threads 1] [--widths tiny,mid,long,pro1b]

Both are timed in one process on the same random Janus models (built locally, random weights), repeats interleaved
(generate, ours, generate, ours, ...) and the median reported, so that load on the machine hits both alike. Our
sampler also records the log-prob of every token; `generate` does not. Both sample with guidance 5, top-k off. The
speed is reported as the ratio generate/ours (> 1: ours is faster), which is what carries over between machines.
"""

import argparse
import statistics
import time

import torch

from trl_t2i.models import build_tiny_janus, get_family
from trl_t2i.sampling import SamplingConfig, image_logp_table, sample_image_tokens


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


def logp_gap(family, model, conditioning, autocast_dtype) -> float:
    """Max |sampler log-prob − teacher-forced log-prob| over every sampled token."""
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None), torch.no_grad():
        sample = sample_image_tokens(family, model, conditioning, SAMPLING)
        table = image_logp_table(family, model, conditioning, sample.image_tokens, SAMPLING)
    scored = table.gather(-1, sample.image_tokens[..., None]).squeeze(-1)
    return (scored - sample.logps).abs().max().item()


def bench(config: dict, images: int, repeats: int) -> tuple[float, float, list[float]]:
    """(generate's median time, our median time, [fp32 gap, bf16 gap]) on one configuration."""
    model, processor = build_tiny_janus(**config)
    model.eval()
    family = get_family(model, processor)
    family.patch_forward(model)
    conditioning = family.encode_prompts([PROMPT] * images)

    def generate():
        model.generate(
            **conditioning.tensors, generation_mode="image", do_sample=True, guidance_scale=SAMPLING.cfg_scale,
            top_k=0,
        )  # fmt: skip

    def ours():
        sample_image_tokens(family, model, conditioning, SAMPLING)

    ours()  # warm-up (first-call allocations) for both
    generate()
    generate_time, our_time = interleaved_medians([generate, ours], repeats)
    gaps = [logp_gap(family, model, conditioning, dtype) for dtype in (None, torch.bfloat16)]
    return generate_time, our_time, gaps


def main(images: int, repeats: int, threads: int, widths: list[str]) -> None:
    torch.set_num_threads(threads)
    print(f"{images} images (2×{images} rows with CFG), cfg 5, top-k off, median of {repeats} interleaved repeats; ")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    print("| model | generate (s) | ours (s) | generate/ours | max logp gap fp32 | max logp gap bf16 |")
    print("|---|---|---|---|---|---|")
    for width in widths:
        name, config = WIDTHS[width]
        generate_time, our_time, gaps = bench(config, images, repeats)
        print(
            f"| {name} | {generate_time:.3f} | {our_time:.3f} | {generate_time / our_time:.2f}× "
            f"| {gaps[0]:.1e} | {gaps[1]:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="Images sampled per call.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed interleaved rounds; the median is reported.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads.")
    parser.add_argument("--widths", default=",".join(WIDTHS), help=f"Comma-separated, from {', '.join(WIDTHS)}.")
    arguments = parser.parse_args()
    main(arguments.images, arguments.repeats, arguments.threads, arguments.widths.split(","))
