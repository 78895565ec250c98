"""Time `make demo` at each CPU thread count, on the machine as it is and with half of its cores kept busy.

    python scripts/bench_demo.py [--threads 1 2] [--repeats 2] [--demo_args "--max_steps 50"]

Every round runs `make demo CPU_THREADS=<n>` once per (extra load, thread count), interleaved, so that the machine's
own load falls on every setting alike; the table gives the median wall time of the whole command (start-up included)
and of the training alone (TRL's `train_runtime`), with the machine (CPU model, cores) and the 1-minute load average
before each run. "Half the cores busy" is one spinning process per two cores, started before the run and stopped
after it: what another job on a shared machine does. It runs the demo of this checkout with the Python environment
running the script (`make -o` keeps make from reinstalling it) into temporary folders.
"""

import argparse
import contextlib
import multiprocessing
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def _spin() -> None:
    while True:
        pass


@contextlib.contextmanager
def busy_cores(count: int):
    """`count` processes that each keep one core busy for the duration of the block."""
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(count)]
    for spinner in spinners:
        spinner.start()
    try:
        yield spinners
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.join()


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def time_demo(threads: int, demo_args: str) -> tuple[float, float]:
    """Seconds of `make demo` with `threads` CPU threads: the whole command, and the training (`train_runtime`)."""
    venv = Path(sys.prefix)
    with tempfile.TemporaryDirectory() as output_dir:
        flags = f"{demo_args} --output_dir {shlex.quote(output_dir)}"
        command = ["make", "-o", f"{venv}/.installed", "demo", f"VENV={venv}", f"CPU_THREADS={threads}"]
        start = time.perf_counter()
        result = subprocess.run([*command, f"DEMO_ARGS={flags}"], cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"`make demo` failed with {threads} thread(s):\n{result.stderr[-3000:]}")
    training = re.search(r"'train_runtime': '?([\d.]+)", result.stdout + result.stderr)
    return wall, float(training.group(1)) if training else float("nan")


def main(threads: list[int], repeats: int, demo_args: str) -> dict[tuple[str, int], list[tuple[float, float, float]]]:
    cores = os.cpu_count()
    loads = {"as found": 0, f"+{cores // 2} busy": cores // 2}
    runs = {(load, count): [] for load in loads for count in threads}
    for _ in range(repeats):
        for load, spinners in loads.items():
            for count in threads:
                before = os.getloadavg()[0]
                with busy_cores(spinners):
                    wall, training = time_demo(count, demo_args)
                runs[load, count].append((wall, training, before))
                print(f"{load}, {count} thread(s): {wall:.1f} s ({training:.1f} s training), load before {before:.2f}")
    print(f"\n`make demo {demo_args}`".rstrip() + f" on {cpu_model()}, {cores} cores; median of {repeats} rounds\n")
    print("| extra load | threads | wall (s) | training (s) | load average before (1 min) |")
    print("|---|---|---|---|---|")
    for (load, count), measured in runs.items():
        wall, training, before = (statistics.median(values) for values in zip(*measured, strict=True))
        print(f"| {load} | {count} | {wall:.1f} | {training:.1f} | {before:.2f} |")
    return runs


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count()], help="CPU thread counts.")
    parser.add_argument("--repeats", type=int, default=2, help="Interleaved rounds; the median is reported.")
    parser.add_argument("--demo_args", default="", help='More flags for the demo (DEMO_ARGS), e.g. "--max_steps 50".')
    arguments = parser.parse_args()
    main(arguments.threads, arguments.repeats, arguments.demo_args)
