"""A newcomer's first hour: the first commands run quietly (every line they print is theirs to read, none a warning to
wonder about), and CI checks what a contributor is asked to keep."""

import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).parents[1]


def test_make_demo_prints_no_warnings(tmp_path):
    venv = Path(sys.prefix)  # the environment running the tests; `-o` keeps make from reinstalling it
    flags = f"--max_steps 2 --per_device_train_batch_size 16 --output_dir {tmp_path / 'demo'}"
    command = ["make", "-o", str(venv / ".installed"), "demo", f"VENV={venv}", f"DEMO_ARGS={flags}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "demo" / "adapter_model.safetensors").is_file()
    assert "Warning" not in result.stderr, result.stderr
    assert "were not passed to `accelerate launch`" not in result.stderr, result.stderr


def test_ci_runs_the_linters_before_the_tests():
    steps = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert steps[0] == "set -euo pipefail"
    assert steps.index("make lint") < steps.index("make test")
    venv = Path(sys.prefix)
    result = subprocess.run(
        ["make", "--dry-run", "-o", str(venv / ".installed"), "lint", f"VENV={venv}"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert f"{venv}/bin/ruff check ." in result.stdout and f"{venv}/bin/ruff format --check ." in result.stdout


def test_the_demo_runs_one_cpu_thread_however_many_cores_the_machine_has(tmp_path):
    # One thread per core spin-waits on a busy machine (scripts/bench_demo.py): a 64-core machine gets 1 thread too.
    getconf = tmp_path / "getconf"
    getconf.write_text("#!/bin/sh\necho 64\n")
    getconf.chmod(0o755)
    venv = Path(sys.prefix)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    command = ["make", "--dry-run", "-o", str(venv / ".installed"), "demo", f"VENV={venv}"]
    printed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    assert "--num_cpu_threads_per_process 1 " in printed, printed
