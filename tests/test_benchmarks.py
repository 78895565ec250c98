"""The benchmark scripts run (on the tiny model) and print what the README quotes from them."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import load_script


@pytest.mark.slow
def test_bench_sampler_prints_every_table_for_each_width(capsys):
    load_script("bench_sampler").main(images=2, repeats=1, threads=1, widths=["tiny"])
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| tiny: h32")]
    assert len(rows) == 3  # speed, LoRA folded vs active, KV-cache allocations
    speed, lora, allocations = (row.split(" | ") for row in rows)
    assert speed[5].endswith("×") and speed[7].endswith("×") and lora[4].endswith("× |")
    growing_cats, preallocated_cats = int(allocations[2]), int(allocations[4].rstrip(" |"))
    assert growing_cats > preallocated_cats  # the growing cache concatenates at every step, ours does not


def test_the_chunked_exact_penalty_saves_less_for_backward_than_autograd():
    results = load_script("bench_step").penalty_alone(images=1, repeats=1)
    (autograd_seconds, autograd_saved), (chunked_seconds, chunked_saved) = results.values()
    assert chunked_saved < 0.5 * autograd_saved


@pytest.mark.slow
def test_bench_gpu_smoke_runs_every_part_and_writes_its_numbers(tmp_path):
    output = tmp_path / "bench_gpu.json"
    script = Path(__file__).parents[1] / "scripts" / "bench_gpu.py"
    command = [sys.executable, str(script), "--smoke", "--threads", "1", "--output", str(output)]
    printed = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    outcomes = json.loads(output.read_text())
    assert set(outcomes) == {"decode_1b", "decode_7b", "step", "gap"}
    assert all("error" not in outcome for outcome in outcomes.values()), printed
    decode = outcomes["decode_1b"]["result"]
    assert decode["compile_s"] > 0 and decode["compiled_ms_per_step"] > 0 and decode["tokens"] == 16
    assert decode["graphs_compiled"] == 1 and decode["attended_lengths"] == 1  # the tiny cache: 64 < 128 positions
    step = outcomes["step"]["result"]
    assert step["rollouts not compiled"]["compiled"] is False and step["default"]["step_s"] > 0
    assert 0 <= step["default"]["logp_gap_mean"] <= step["default"]["logp_gap_max"] < 1e-5  # fp32 on CPU
    gap = outcomes["gap"]["result"]
    assert gap["fp32"]["max"] < 1e-5 < gap["bf16"]["mean"]  # fp32 is on-policy to round-off; bf16 is not
    assert "| generate (ms/step) |" in printed and "| setting | mean gap (nats/token) | max gap |" in printed


@pytest.mark.parametrize(
    ("ending", "error"), [("stalls", "timed out after 2 s"), ("dies", "its process ended with exit code 3")]
)
def test_a_gpu_part_that_runs_out_of_time_or_dies_still_reports_what_it_measured(monkeypatch, ending, error):
    # The H200 run of 2026-12-04: three parts ran past their limits and reported nothing of what they had measured
    bench_gpu = load_script("bench_gpu")

    def part(name, scale):
        bench_gpu.progress(compile_s=61.5)
        bench_gpu.progress(compiled_ms_per_step=3.0)
        if ending == "stalls":
            time.sleep(60)
        os._exit(3)  # as the out-of-memory killer would end it

    monkeypatch.setattr(bench_gpu, "run_part", part)
    scale = dataclasses.replace(bench_gpu.smoke_scale(), limits={"decode_1b": 2})
    started = time.perf_counter()
    outcome = bench_gpu.run_isolated("decode_1b", scale, threads=1)
    assert time.perf_counter() - started < 10
    assert outcome["error"] == error and outcome["partial"] == {"compile_s": 61.5, "compiled_ms_per_step": 3.0}
    assert "compile_s 61.5, compiled_ms_per_step 3" in bench_gpu.report("decode_1b", outcome)
