"""One GRPO training step of Janus-Pro-1B's real architecture (random weights) on CPU, broken down by stage.

    python scripts/bench_step.py [--layers 1,2] [--images 2] [--threads 2] [--settings lora-sampled,lora-exact,...]

The model has Janus-Pro-1B's real widths (hidden 2048, MLP 5632, 16 heads, text vocabulary 102,400), its real image
side (576 tokens of a 16,384-code VQ-VAE at 384 px, the real decoder) and vision tower, but only `--layers` of its 24
language-model layers: a CPU cannot run 24 in reasonable time. Every stage is measured at each layer count and
extrapolated linearly to 24 layers (`t(L) = a + b·L` through the two smallest counts) for the stages that run the
language model, and averaged for the others (decoding, rewards, penalty); the step is the sum of its stages there.

Each setting runs in its own process (so peak memory is its own), with the trainer's own stage timers
(`time/<stage>`, see `T2IGRPOTrainer._timed`), the least over two optimizer steps after the first (which pays
one-time costs): sampling (the KV-cached CFG decode of every image), decoding (VQ-VAE to pixels), rewards, reference
(the reference forward), policy_loss (the policy forward and TRL's loss), penalty (the divergence, without the
reference forward the exact estimator runs inside it), and `backward+optimizer` (the rest of the step: backward,
optimizer, TRL's bookkeeping).

Settings: LoRA r=32 on every language-model linear (the 1B recipe's) or QLoRA (nf4 language model, bitsandbytes' CPU
kernels), with the `sampled` or the `exact` divergence estimator (JS, β 0.04), activation checkpointing on.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import TrainerCallback

from trl_t2i import trl_boundary as boundary
from trl_t2i.memory import Architecture, janus_pro_1b


FULL_LAYERS = 24
MEASURED_STEPS = 2
SETTINGS = ("lora-sampled", "lora-exact", "qlora-sampled", "qlora-exact")
LANGUAGE_MODEL_STAGES = ("sampling", "reference", "policy_loss", "backward+optimizer")
TIMED_STAGES = ("sampling", "decoding", "rewards", "reference", "policy_loss", "penalty")  # the trainer's timers
STAGES = (*TIMED_STAGES, "backward+optimizer")


def build_janus_pro_1b(num_layers: int):
    """Janus-Pro-1B's architecture (`trl_t2i.memory.janus_pro_1b_config`) with `num_layers` language-model layers,
    random weights; the tiny Janus' processor (its few token ids lie inside the real vocabulary)."""
    from transformers import JanusForConditionalGeneration

    from trl_t2i.memory import janus_pro_1b_config
    from trl_t2i.models import build_tiny_janus

    tiny, processor = build_tiny_janus(image_tokens_per_side=24)
    config = janus_pro_1b_config()
    config.text_config.num_hidden_layers = num_layers
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(config.text_config, name, getattr(tiny.config.text_config, name))
    config.image_token_id = tiny.config.image_token_id
    model = JanusForConditionalGeneration(config)
    model.generation_config = tiny.generation_config
    return model, processor


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step, and the trainer's stage timers recorded during it (the run never logs, so
    the timers accumulate one value per stage call, and the metric divergences of logged steps are not computed)."""

    def __init__(self):
        self.steps = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.trainer.flush_stage_times()
        self.recorded = {stage: len(boundary.recorded_metric(self.trainer, f"time/{stage}")) for stage in TIMED_STAGES}

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.flush_stage_times()
        stages = {
            stage: sum(boundary.recorded_metric(self.trainer, f"time/{stage}")[self.recorded[stage] :])
            for stage in TIMED_STAGES
        }
        self.steps.append((time.perf_counter() - self.start, stages))


def run_one(setting: str, num_layers: int, images: int, threads: int) -> dict:
    """Train one setting in this process: stage times (the least over the steps after the first), peak RSS and
    parameters."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from trl_t2i import T2IGRPOConfig, T2IGRPOTrainer
    from trl_t2i.rewards import colour_match

    torch.set_num_threads(threads)
    adapters, estimator = setting.split("-")
    model, processor = build_janus_pro_1b(num_layers)
    parameters = Architecture.from_janus_config(model.config).components()
    with tempfile.TemporaryDirectory() as checkpoint, tempfile.TemporaryDirectory() as output_dir:
        quantization = None
        if adapters == "qlora":  # 4-bit loading goes through from_pretrained, as for users
            model.save_pretrained(checkpoint)
            processor.save_pretrained(checkpoint)
            model = checkpoint
            quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        args = T2IGRPOConfig(
            output_dir=output_dir,
            use_cpu=True,
            bf16=False,
            per_device_train_batch_size=images,
            num_generations=2,
            max_steps=1 + MEASURED_STEPS,
            logging_steps=1000,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            image_log_steps=0,
            divergence="js",
            divergence_estimator=estimator,
            beta=0.04,
            activation_checkpointing=True,
            seed=0,
        )
        timer = StepTimer()
        trainer = T2IGRPOTrainer(
            model=model,
            processing_class=processor,
            reward_funcs=colour_match,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": ["a red cat on a table", "a blue car in the rain"] * 4}),
            peft_config=LoraConfig(r=32, lora_alpha=64),
            quantization_config=quantization,
            callbacks=[timer],
        )
        timer.trainer = trainer
        trainer.train()
    # Every step after the first (which pays one-time costs); the least of each, which load on the machine only raises.
    measured = timer.steps[1:]
    step_time = min(time for time, _ in measured)
    stages = {stage: min(stages[stage] for _, stages in measured) for stage in TIMED_STAGES}
    if estimator == "exact":  # the exact penalty's timer includes the reference forward it runs
        stages["penalty"] -= stages["reference"]
    stages["backward+optimizer"] = step_time - sum(stages.values())
    return {
        "stages": stages,
        "step": step_time,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "parameters": parameters,
    }


def in_subprocess(setting: str, num_layers: int, images: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--one", setting, "--layers", str(num_layers)]
    command += ["--images", str(images), "--threads", str(threads)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def full_model_seconds(measured: dict[int, float], stage: str) -> float:
    """A stage's seconds at `FULL_LAYERS` layers: `a + b·L` through the two smallest layer counts measured for the
    stages that run the language model, the mean of the measurements for the others (decoding, rewards, penalty)."""
    if stage not in LANGUAGE_MODEL_STAGES:
        return statistics.mean(measured.values())
    (small, t_small), (large, t_large) = sorted(measured.items())[:2]
    return max(t_small + (t_large - t_small) / (large - small) * (FULL_LAYERS - small), 0.0)


def full_model_step(result_by_layers: dict[int, dict]) -> float:
    """A step's seconds at `FULL_LAYERS` layers: the sum of its stages' (`full_model_seconds`)."""
    return sum(
        full_model_seconds({n: result["stages"][stage] for n, result in result_by_layers.items()}, stage)
        for stage in STAGES
    )


def print_setting(setting: str, results: dict, layer_counts: list[int]) -> None:
    by_layers = {n: results[(setting, n)] for n in layer_counts}
    header = " | ".join(f"{n} layers" for n in layer_counts)
    print(f"\n**{setting}** — seconds per step by stage\n")
    print(f"| stage | {header} | {FULL_LAYERS} layers (extrapolated) |")
    print("|---|" + "---|" * (len(layer_counts) + 1))
    for stage in STAGES:
        measured = {n: result["stages"][stage] for n, result in by_layers.items()}
        cells = " | ".join(f"{measured[n]:.2f}" for n in layer_counts)
        print(f"| {stage} | {cells} | {full_model_seconds(measured, stage):.1f} |")
    cells = " | ".join(f"{by_layers[n]['step']:.2f}" for n in layer_counts)
    print(f"| step | {cells} | {full_model_step(by_layers):.1f} |")
    peaks = " | ".join(f"{by_layers[n]['peak_rss_gib']:.2f}" for n in layer_counts)
    print(f"| peak RSS (GiB) | {peaks} | |", flush=True)


def timed_penalty(penalty, logits: torch.Tensor, ref_table: torch.Tensor) -> tuple[float, float]:
    """(seconds, MB autograd saves for the backward) of one forward + backward of `penalty`."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        value = penalty(logits.log_softmax(-1), ref_table).sum()
    value.backward()
    return time.perf_counter() - start, sum(sizes) / 2**20


def penalty_alone(images: int, divergence_name: str = "js", repeats: int = 3) -> dict[str, tuple[float, float]]:
    """Forward + backward of the exact penalty on `(2·images, 576, 16384)` tables through autograd of `exact` and
    through `exact_penalty`, interleaved: (median seconds, MB saved for the backward) of each."""
    from trl_t2i.divergences import get_divergence

    divergence = get_divergence(divergence_name)
    logits = torch.randn(images, 576, 16384, requires_grad=True)
    ref_table = torch.randn(images, 576, 16384).log_softmax(-1)
    paths = {"autograd through `exact`": divergence.exact, "`exact_penalty`": divergence.exact_penalty}
    runs = {
        name: [timed_penalty(penalty, logits, ref_table) for _ in range(repeats)] for name, penalty in paths.items()
    }
    return {name: (statistics.median(t for t, _ in run), run[0][1]) for name, run in runs.items()}


def main(settings: list[str], layer_counts: list[int], images: int, threads: int) -> None:
    torch.set_num_threads(threads)
    print(f"Janus-Pro-1B architecture, {images} images/step (1 prompt × 2, CFG rows), 576 tokens, 16,384 codes, fp32,")
    print(f"{threads} thread(s), torch {torch.__version__}; least of steps 2–3 of each setting, own process.\n")

    print(f"JS exact penalty alone, forward + backward on ({images}, 576, 16384) tables (log-softmax included):\n")
    print("| path | seconds | saved for backward (MB) |\n|---|---|---|")
    for name, (seconds, saved) in penalty_alone(images).items():
        print(f"| {name} | {seconds:.2f} | {saved:.0f} |", flush=True)

    results = {}
    for setting in settings:
        for n in layer_counts:
            results[(setting, n)] = in_subprocess(setting, n, images, threads)
        if setting == settings[0]:
            full = janus_pro_1b().components()
            print(f"\n| component | parameters, {layer_counts[0]} layer(s) | Janus-Pro-1B ({FULL_LAYERS} layers) |")
            print("|---|---|---|")
            for name, count in results[(setting, layer_counts[0])]["parameters"].items():
                print(f"| {name} | {count / 1e6:.1f} M | {full[name] / 1e6:.1f} M |")
        print_setting(setting, results, layer_counts)

    for adapters in ("lora", "qlora"):
        if f"{adapters}-sampled" in settings and f"{adapters}-exact" in settings:
            print(f"\n{adapters}: exact/sampled step time", end="")
            for n in layer_counts:
                ratio = results[(f"{adapters}-exact", n)]["step"] / results[(f"{adapters}-sampled", n)]["step"]
                print(f", {n} layers {ratio:.2f}×", end="")
            full = {
                kind: full_model_step({n: results[(f"{adapters}-{kind}", n)] for n in layer_counts})
                for kind in ("sampled", "exact")
            }
            print(f", {FULL_LAYERS} layers (extrapolated) {full['exact'] / full['sampled']:.2f}×")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"Comma-separated, from {', '.join(SETTINGS)}.")
    parser.add_argument("--layers", default="1,2", help="Language-model layer counts to measure (at least two).")
    parser.add_argument("--images", type=int, default=2, help="Images per step (2 per prompt).")
    parser.add_argument("--threads", type=int, default=2, help="torch threads.")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting, print its JSON
    arguments = parser.parse_args()
    if arguments.one:
        print(json.dumps(run_one(arguments.one, int(arguments.layers), arguments.images, arguments.threads)))
    else:
        layer_counts = [int(n) for n in arguments.layers.split(",")]
        if len(layer_counts) < 2:
            parser.error("--layers needs at least two counts to extrapolate to 24 layers.")
        main(arguments.settings.split(","), layer_counts, arguments.images, arguments.threads)
