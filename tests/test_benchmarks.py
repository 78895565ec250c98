"""The benchmark scripts run (on the tiny model) and print what the README quotes from them."""

from conftest import load_script


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
