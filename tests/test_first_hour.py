"""A new user's first commands run quietly: every line they print is theirs to read, none a warning to wonder about."""

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
