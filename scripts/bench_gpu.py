"""GPU numbers the project measures itself: decode speed at Janus-Pro-1B and 7B, a GRPO step, memory, the bf16 gap.

    python scripts/bench_gpu.py [--output bench_gpu.json]      # one GPU, at most 8 minutes
    python scripts/bench_gpu.py --smoke                         # the same code on CPU at tiny sizes, under 2 minutes
    python scripts/bench_gpu.py --parts gap --device cpu --layers 2 --limit 1800   # real widths, 2 LM layers, on CPU
    python scripts/bench_gpu.py --parts decode_1b --device cpu --layers 2 --images 2 --limit 1800   # the same

Random weights at the real Janus-Pro architectures (`trl_t2i.memory.janus_pro_*_config`, built on the device in
bf16; fp32 on CPU), CFG 5, top-k off, 576 image tokens. Each part runs in its own forked process under its own time
limit, so a part that runs out of time or memory is reported as such, with what it had measured, and the others go
on; results are printed as they come and written to `--output` as JSON.

* `decode_1b` / `decode_7b`: ms per decode step of transformers' `generate`, our eager decode and our compiled decode
  (`compile=True`: static KV cache, the position step compiled, a CUDA graph), at 16 images (32 CFG rows) for 1B and
  8 images for 7B; the compile time; for 7B the bound, the time to read the language model's weights once at the
  copy bandwidth measured on the device, and the CUDA kernels of the compiled decode by total time; the graphs the
  compile made (one for every attended length), whether inductor ran any without CUDA graphs (`cudagraph_skips`,
  which would make the compiled decode launch-bound) and how often a compiled decode waits for the GPU
  (`host_syncs`: a handful, not one per position).
* `step`: GRPO steps of Janus-Pro-1B with LoRA r32 (the 1B recipe's), 16 images (2 prompts × 8), JS β 0.04: the
  default settings (compiled rollouts, exact penalty), the sampled estimator, and rollouts not compiled; the first
  step (which compiles), the median later step and its stages (`time/<stage>`), peak memory against the memory
  model's estimate, the compile time and the log-prob gap as the trainer records them (`time/compile`,
  `sampling/logp_gap_mean|max`).
* `gap`: |sampler log-prob − teacher-forced log-prob| per token (mean, max) for 4 images at 1B width, decoding
  eagerly (the `step` part gives the compiled decode's, as trained): fp32; bf16 as trained (bf16 weights, autocast,
  the image head in fp32); the image head in bf16 (before); LoRA r32 active and folded into the weights (what
  rollouts do).

Times are the least of the repeats (load on the machine only raises them); ratios are what carries over.
"""

import argparse
import contextlib
import gc
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).parent))  # the other benchmark scripts, also when imported by the tests

PARTS = ("decode_1b", "decode_7b", "step", "gap")
STAGES = ("sampling", "decoding", "rewards", "reference", "policy_loss", "penalty")  # the trainer's `time/<stage>`
RECORDED = ("time/compile", "sampling/logp_gap_mean", "sampling/logp_gap_max")  # the trainer's metrics a step reports
PROMPT = "a red cat on a table"


@dataclass(frozen=True)
class Scale:
    """The sizes a run measures at.

    Attributes:
        device, dtype: where and in which dtype the models run (bf16 on GPU, with autocast in training; fp32 on
            CPU).
        configs: `name -> JanusConfig` builder of each model size ("1b", "7b").
        decode_images: images per decode of each size.
        step_images, generations, steps: the GRPO step part's images per step, images per prompt and optimizer
            steps of the default setting (the others run fewer).
        gap_images: images of the gap part.
        limits: seconds each part may take.
        decode_repeats: timed rounds of each decode after the compiling call (`generate` and the eager decode take
            10-16 s a round on the GPU, the compiled one under 4).
    """

    device: str
    dtype: torch.dtype
    configs: dict[str, Callable]
    decode_images: dict[str, int]
    step_images: int
    generations: int
    steps: int
    gap_images: int
    limits: dict[str, int] = field(default_factory=dict)
    decode_repeats: int = 2


def gpu_scale(layers: int | None = None, device: str = "cuda") -> Scale:
    from trl_t2i.memory import janus_pro_1b_config, janus_pro_7b_config

    return Scale(
        device=device,
        dtype=torch.float32 if device == "cpu" else torch.bfloat16,
        configs={"1b": _with_layers(janus_pro_1b_config, layers), "7b": _with_layers(janus_pro_7b_config, layers)},
        decode_images={"1b": 16, "7b": 8},
        step_images=16,
        generations=8,
        steps=4,
        gap_images=4,
        # 8 minutes in all. On an H200 (2026-12-04) `generate` and the eager decode took about 10 s a call at 1B,
        # 16 s at 7B, an eager GRPO step 13 s, and compiling the decode 63 s at 1B when it compiled a graph per
        # attended length (now one graph: about a quarter of that compile time at 1B width on CPU, see the README)
        limits={"decode_1b": 100, "decode_7b": 150, "step": 150, "gap": 80},
        decode_repeats=1,
    )


def smoke_scale() -> Scale:
    return Scale(
        device="cpu",
        dtype=torch.float32,
        # One tiny size for both: the second compiles from the first one's cache, and the code is what is checked
        configs={"1b": lambda: _tiny_config(hidden_size=64), "7b": lambda: _tiny_config(hidden_size=64)},
        decode_images={"1b": 4, "7b": 4},
        step_images=4,
        generations=2,
        steps=3,
        gap_images=2,
        # generous: a cold compile on a busy CPU; the parts take about 50 s in all on a warm 2-core machine
        limits={"decode_1b": 120, "decode_7b": 90, "step": 90, "gap": 60},
    )


def _with_layers(build_config: Callable, layers: int | None) -> Callable:
    def build():
        config = build_config()
        if layers is not None:
            config.text_config.num_hidden_layers = layers
        return config

    return build


def _tiny_config(hidden_size: int):
    from trl_t2i.models import build_tiny_janus

    model, _ = build_tiny_janus(hidden_size=hidden_size)
    return model.config


def build_janus(config, scale: Scale):
    """A random Janus of `config` built on `scale.device` in `scale.dtype`, with the tiny Janus' processor (its few
    token ids lie inside every vocabulary) at the config's image size; its image head in fp32, as `load_model`
    leaves it."""
    from transformers import JanusForConditionalGeneration

    from trl_t2i.models import JanusFamily, build_tiny_janus

    side = int(config.vision_config.num_image_tokens**0.5)
    tiny, processor = build_tiny_janus(image_tokens_per_side=side)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(config.text_config, name, getattr(tiny.config.text_config, name))
    config.image_token_id = tiny.config.image_token_id
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(scale.dtype)
    try:
        with torch.device(scale.device):
            model = JanusForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config = tiny.generation_config
    JanusFamily.upcast_image_head(model)
    return model.eval(), processor


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def seconds(function: Callable, device: str) -> float:
    _synchronize(device)
    start = time.perf_counter()
    function()
    _synchronize(device)
    return time.perf_counter() - start


def least_interleaved(functions: dict[str, Callable], repeats: int, device: str) -> dict[str, float]:
    """The least wall time of each function over `repeats` rounds, each round running every function once."""
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(seconds(function, device))
            progress(**{f"{name}_s": min(times[name])})
    return {name: min(record) for name, record in times.items()}


# ------------------------------------------------------------------ parts


def decode_part(scale: Scale, size: str) -> dict:
    from trl_t2i.decoding import sample_image_tokens, static_decoder
    from trl_t2i.models import get_family
    from trl_t2i.sampling import SamplingConfig

    model, processor = build_janus(scale.configs[size](), scale)
    family = get_family(model, processor)
    images = scale.decode_images[size]
    conditioning = family.encode_prompts([PROMPT] * images).to(scale.device)
    sampling = SamplingConfig(cfg_scale=5.0)
    functions = {
        "generate": lambda: model.generate(
            **conditioning.tensors, generation_mode="image", do_sample=True, guidance_scale=5.0, top_k=0
        ),
        "eager": lambda: sample_image_tokens(family, model, conditioning, sampling),
        "compiled": lambda: sample_image_tokens(family, model, conditioning, sampling, compile=True),
    }
    steps = family.num_image_tokens
    counters = torch._dynamo.utils.counters
    graphs_before = counters["stats"]["unique_graphs"]
    compile_seconds = seconds(functions["compiled"], scale.device)  # the first call compiles and captures
    compiled = {
        "graphs_compiled": counters["stats"]["unique_graphs"] - graphs_before,
        "attended_lengths": len(static_decoder(family).calls),
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
    }
    progress(
        compile_s=compile_seconds,
        compiled_ms_per_step=1000 * seconds(functions["compiled"], scale.device) / steps,
        **compiled,
    )
    least = least_interleaved(functions, repeats=scale.decode_repeats, device=scale.device)
    result = {f"{name}_ms_per_step": 1000 * t / steps for name, t in least.items()}
    result |= {"images": images, "rows": 2 * images, "tokens": steps, "compile_s": compile_seconds} | compiled
    result["generate_over_compiled"] = least["generate"] / least["compiled"]
    if torch.device(scale.device).type == "cuda":
        weights = sum(p.numel() * p.element_size() for p in model.model.language_model.parameters())
        bandwidth = copy_bandwidth()
        result |= {"bandwidth_gb_s": bandwidth / 1e9, "weights_read_ms": 1000 * weights / bandwidth}
        result["compiled_over_bound"] = result["compiled_ms_per_step"] / result["weights_read_ms"]
        progress(**result)  # should the checks below fail, the timings stay
        result["host_syncs"] = host_synchronisations(functions["compiled"])
        if size == "7b":  # the profile replays the CUDA graphs under CUPTI
            result["kernels"] = top_kernels(functions["compiled"])
    return result


def host_synchronisations(function: Callable) -> int:
    """How often one call of `function` makes the host wait for the GPU (PyTorch warns at each in its sync debug
    mode): a handful per decode, not one per position, if nothing in the loop synchronises."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            function()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


def copy_bandwidth(gigabytes: float = 2.0) -> float:
    """Bytes per second a device-to-device copy moves (read + write), the least time of five."""
    source = torch.empty(int(gigabytes * 2**30), dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    least = min(seconds(lambda: target.copy_(source), "cuda") for _ in range(5))
    return 2 * source.numel() / least


def top_kernels(function: Callable, count: int = 12) -> list[dict]:
    """The CUDA kernels of one call of `function` by total time (what a faster decode has to shrink)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        function()
        torch.cuda.synchronize()
    events = sorted(profiler.key_averages(), key=lambda event: event.device_time_total, reverse=True)
    return [
        {"kernel": event.key[:90], "calls": event.count, "total_ms": event.device_time_total / 1000}
        for event in events[:count]
    ]


def step_part(scale: Scale) -> dict:
    settings = {
        "default": ({}, scale.steps),
        "sampled estimator": ({"divergence_estimator": "sampled"}, scale.steps - 1),
        "rollouts not compiled": ({"compile_rollouts": "false"}, 2),
    }
    results = {}
    for label, (overrides, steps) in settings.items():
        results[label] = train_steps(scale, overrides, steps, label)
        progress(**{label: results[label]})
    return results


def train_steps(scale: Scale, overrides: dict, steps: int, label: str) -> dict:
    """`steps` GRPO steps at the 1B size: the first step, the median later step and its stages, peak memory."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    from trl_t2i import T2IGRPOConfig, T2IGRPOTrainer
    from trl_t2i import trl_boundary as boundary
    from trl_t2i.rewards import colour_match

    class StepTimer(TrainerCallback):
        """Wall time of every optimizer step, the trainer's stage times during it, and its `RECORDED` metrics (the run
        never logs)."""

        def __init__(self):
            self.steps = []

        def recorded(self) -> dict[str, list[float]]:
            self.trainer.flush_stage_times()
            return {stage: boundary.recorded_metric(self.trainer, f"time/{stage}") for stage in STAGES}

        def on_step_begin(self, args, state, control, **kwargs):
            self.before = self.recorded()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step = time.perf_counter() - self.start
            stages = {stage: sum(values[len(self.before[stage]) :]) for stage, values in self.recorded().items()}
            self.steps.append((step, stages))
            # what the trainer recorded since the run began (it logs only at the end)
            self.metrics = {name: boundary.recorded_metric(self.trainer, name) for name in RECORDED}
            progress(**{f"{label} step {len(self.steps)} (s)": step})

    cuda = torch.device(scale.device).type == "cuda"
    model, processor = build_janus(scale.configs["1b"](), scale)
    prompts = ["a red cat on a table", "a blue car in the rain"] * 4
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        settings = {
            "output_dir": output_dir,
            "use_cpu": not cuda,
            "bf16": cuda,
            "per_device_train_batch_size": scale.step_images,
            "num_generations": scale.generations,
            "max_steps": steps,
            "logging_steps": 1000,
            "report_to": [],
            "save_strategy": "no",
            "disable_tqdm": True,
            "image_log_steps": 0,
            "divergence": "js",
            "divergence_estimator": "exact",
            "beta": 0.04,
            "seed": 0,
        }
        trainer = T2IGRPOTrainer(
            model=model,
            processing_class=processor,
            reward_funcs=colour_match,
            args=T2IGRPOConfig(**(settings | overrides)),
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            peft_config=LoraConfig(r=32, lora_alpha=64),
            callbacks=[timer],
        )
        timer.trainer = trainer
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    later = timer.steps[1:] or timer.steps
    result = {
        "settings": overrides or "compile_rollouts auto, exact",
        "first_step_s": timer.steps[0][0],
        "step_s": statistics.median(t for t, _ in later),
        "stages_s": {name: statistics.median(s.get(name, 0.0) for _, s in later) for name in later[0][1]},
        "compiled": trainer.compile_rollouts,
        "compile_s": sum(timer.metrics["time/compile"]),
        "logp_gap_mean": statistics.mean(timer.metrics["sampling/logp_gap_mean"]),
        "logp_gap_max": max(timer.metrics["sampling/logp_gap_max"]),
    }
    if cuda:
        result["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        result["memory_model_gb"] = memory_model_peak(model.config, scale, overrides) / 1e9
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def memory_model_peak(config, scale: Scale, overrides: dict) -> float:
    """The memory model's peak for the step part's setup, without the CUDA context (outside PyTorch's allocator, which
    `max_memory_allocated` counts); no reward model: `colour_match` holds no weights."""
    from trl_t2i.memory import CUDA_CONTEXT_BYTES, Architecture, TrainingSetup, estimate

    setup = TrainingSetup(
        rollout_images=scale.step_images,
        micro_batch=scale.step_images,
        lora_r=32,
        divergence_estimator=overrides.get("divergence_estimator", "exact"),
        reward=None,
        compiled_rollouts=overrides.get("compile_rollouts", "auto") != "false",
    )
    return estimate(Architecture.from_janus_config(config), setup).peak - CUDA_CONTEXT_BYTES


def gap_part(scale: Scale) -> dict:
    """The sampler's log-probs against teacher forcing, as `sampling/logp_gap_mean|max` measures them in training."""
    from peft import LoraConfig, get_peft_model

    from trl_t2i.merged_adapters import merged_adapters
    from trl_t2i.models import JanusFamily, get_family

    fp32 = replace(scale, dtype=torch.float32)
    model, processor = build_janus(scale.configs["1b"](), fp32)
    family = get_family(model, processor)
    family.patch_forward(model)
    conditioning = family.encode_prompts(["a red cat on a table", "a blue dog"] * (scale.gap_images // 2))
    conditioning = conditioning.to(scale.device)
    results = {}

    def measure(label: str, model, autocast: bool = True, fold=None) -> None:
        results[label] = logp_gap(family, model, conditioning, autocast, fold)
        progress(**{label: results[label]})

    measure("fp32", model, autocast=False)
    model.to(torch.bfloat16)
    JanusFamily.upcast_image_head(model)
    measure("bf16", model)
    model.model.generation_head.to(torch.bfloat16)
    measure("bf16, image head in bf16", model)
    JanusFamily.upcast_image_head(model)
    peft_model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=family.lora_target_modules))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.02)
    measure("bf16, LoRA active", peft_model)
    measure("bf16, LoRA folded", peft_model, fold=merged_adapters)
    return results


def logp_gap(family, model, conditioning, autocast: bool, fold=None) -> dict:
    """Mean and max |sampler log-prob − teacher-forced log-prob| over every token, decoding eagerly (compiled, each
    setting would compile anew)."""
    from trl_t2i.decoding import sample_image_tokens
    from trl_t2i.sampling import SamplingConfig, image_logp_table

    sampling = SamplingConfig(cfg_scale=5.0)
    device = conditioning.tensors["input_ids"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast), torch.no_grad():
        torch.manual_seed(0)
        with fold(model) if fold else contextlib.nullcontext():
            sample = sample_image_tokens(family, model, conditioning, sampling)
        table = image_logp_table(family, model, conditioning, sample.image_tokens, sampling)
    gap = (table.gather(-1, sample.image_tokens[..., None]).squeeze(-1) - sample.logps).abs()
    return {"mean": gap.mean().item(), "max": gap.max().item()}


# ------------------------------------------------------------------ running and reporting


def run_part(name: str, scale: Scale) -> dict:
    if name.startswith("decode_"):
        return decode_part(scale, name.removeprefix("decode_"))
    return {"step": step_part, "gap": gap_part}[name](scale)


_progress = None
"""The running part's end of the pipe to the parent (set in the part's own process)."""


def progress(**measured) -> None:
    """Send the parent what the running part has measured so far: a part that then runs out of time or memory still
    reports it."""
    if _progress is not None:
        _progress.send({"partial": measured})


def _child(name: str, scale: Scale, threads: int, connection) -> None:
    global _progress
    _progress = connection
    torch.set_num_threads(threads)
    try:
        connection.send({"result": run_part(name, scale)})
    except BaseException as error:  # reported, the other parts go on
        connection.send({"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()})


def run_isolated(name: str, scale: Scale, threads: int) -> dict:
    """Run a part in a forked process under its time limit: `{"result": ...}`, `{"error": ...}`, a time-out or the
    process' end, with `"partial"`: what it measured before (`progress`). The parent never initialises CUDA, so
    forking is safe; the child inherits the imported modules."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(name, scale, threads, send))
    start = time.perf_counter()
    process.start()
    send.close()  # the child's end alone: its death ends the pipe
    limit, partial, outcome = scale.limits[name], {}, None
    while outcome is None:
        if not receive.poll(max(0.0, start + limit - time.perf_counter())):
            process.kill()  # its device time is what the next part needs
            outcome = {"error": f"timed out after {limit} s"}
            break
        try:
            message = receive.recv()
        except EOFError:
            process.join(5)
            outcome = {"error": f"its process ended with exit code {process.exitcode}"}
            break
        if "partial" in message:
            partial |= message["partial"]
        else:
            outcome = message
    process.join(5)
    if process.is_alive():
        process.kill()
    if partial and "result" not in outcome:
        outcome["partial"] = partial
    outcome["seconds"] = time.perf_counter() - start
    return outcome


def report(name: str, outcome: dict) -> str:
    """Markdown for one part's outcome."""
    if "error" in outcome:
        where = "".join(outcome.get("traceback", "").splitlines(keepends=True)[-4:-1])
        measured = ", ".join(f"{key} {value:.4g}" for key, value in _numbers(outcome.get("partial", {})).items())
        measured = f"measured before it stopped: {measured}\n" if measured else ""
        return f"\n**{name}**: {outcome['error']} ({outcome['seconds']:.0f} s)\n{measured}{where}"
    result, lines = outcome["result"], [f"\n**{name}** ({outcome['seconds']:.0f} s)\n"]
    if name.startswith("decode_"):
        lines += [
            f"{result['images']} images ({result['rows']} rows), {result['tokens']} tokens, compile "
            f"{result['compile_s']:.1f} s: {result['graphs_compiled']} graph(s) for {result['attended_lengths']} "
            f"attended lengths, {result['cudagraph_skips']} run(s) without CUDA graphs, "
            f"{result.get('host_syncs', '–')} host synchronisation(s) in a decode of {result['tokens']} positions\n",
            "| generate (ms/step) | eager (ms/step) | compiled (ms/step) | generate/compiled | weights read (ms) "
            "| compiled/bound |",
            "|---|---|---|---|---|---|",
            f"| {result['generate_ms_per_step']:.2f} | {result['eager_ms_per_step']:.2f} "
            f"| {result['compiled_ms_per_step']:.2f} | {result['generate_over_compiled']:.2f}× "
            f"| {result.get('weights_read_ms', float('nan')):.2f} "
            f"| {result.get('compiled_over_bound', float('nan')):.2f}× |",
        ]
        if "kernels" in result:
            lines += ["", "| kernel (compiled decode) | calls | total ms |", "|---|---|---|"]
            lines += [f"| `{k['kernel']}` | {k['calls']} | {k['total_ms']:.1f} |" for k in result["kernels"]]
    elif name == "step":
        lines += [
            "| setting | first step (s) | compile (s) | step (s) | stages (s) | peak (GB) | memory model (GB) "
            "| log-prob gap mean / max |"
        ]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for label, r in result.items():
            stages = ", ".join(f"{stage} {value:.2f}" for stage, value in r["stages_s"].items())
            peak = (
                f"{r['peak_allocated_gb']:.1f} | {r['memory_model_gb']:.1f}" if "peak_allocated_gb" in r else "– | –"
            )
            gap = f"{r['logp_gap_mean']:.3g} / {r['logp_gap_max']:.3g}"
            lines.append(
                f"| {label} | {r['first_step_s']:.1f} | {r['compile_s']:.1f} | {r['step_s']:.2f} | {stages} | {peak} "
                f"| {gap} |"
            )
    elif name == "gap":
        lines += ["| setting | mean gap (nats/token) | max gap |", "|---|---|---|"]
        lines += [f"| {label} | {r['mean']:.2e} | {r['max']:.2e} |" for label, r in result.items()]
    return "\n".join(lines)


def _numbers(measured: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) partial result, by dotted key."""
    numbers = {}
    for key, value in measured.items():
        if isinstance(value, dict):
            numbers |= _numbers(value, f"{prefix}{key}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            numbers[f"{prefix}{key}"] = value
    return numbers


def main(parts: list[str], scale: Scale, threads: int, output: Path | None) -> dict:
    print(f"torch {torch.__version__}, device {scale.device}, {scale.dtype}; parts: {', '.join(parts)}", flush=True)
    outcomes = {}
    for name in parts:
        outcomes[name] = run_isolated(name, scale, threads)
        print(report(name, outcomes[name]), flush=True)
        if output is not None:
            output.write_text(json.dumps(outcomes, indent=2, default=str))
    return outcomes


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="Tiny models on CPU: checks the code, not the speed.")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"Comma-separated, from {', '.join(PARTS)}.")
    parser.add_argument("--device", default="cuda", help="Device of a non-smoke run (cpu: with --layers).")
    parser.add_argument("--layers", type=int, help="Language-model layers of the real configs (default: all).")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument("--output", type=Path, help="Write the results as JSON here.")
    parser.add_argument("--limit", type=int, help="Seconds every part may take (default: each part's own limit).")
    parser.add_argument("--images", type=int, help="Images of each decode part (default: 16 at 1B, 8 at 7B).")
    arguments = parser.parse_args()
    unknown = set(arguments.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"Unknown parts {sorted(unknown)}. Valid choices: {', '.join(PARTS)}.")
    chosen = smoke_scale() if arguments.smoke else gpu_scale(arguments.layers, arguments.device)
    if arguments.limit:
        chosen = replace(chosen, limits=dict.fromkeys(PARTS, arguments.limit))
    if arguments.images:
        chosen = replace(chosen, decode_images=dict.fromkeys(chosen.decode_images, arguments.images))
    main(arguments.parts.split(","), chosen, arguments.threads, arguments.output)
