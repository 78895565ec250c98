"""SIGTERM to `accelerate launch` (what `timeout`, a container stop or a scheduler sends): the run saves its
preemption checkpoint and stops, with one process and with several. Real launches: the signal path is the
behaviour under test."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO_RECIPE, QUICK_FLAGS

from trl_t2i.cli.parsing import RECIPES
from trl_t2i.preemption import PreemptionCallback


ROOT = Path(__file__).parents[1]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the launcher's end reaches the run through Linux's prctl")
@pytest.mark.parametrize("accelerate_config", ["cpu.yaml", "cpu_ddp.yaml"])
def test_sigterm_to_accelerate_launch_saves_a_checkpoint_and_ends_the_run(tmp_path, accelerate_config):
    output_dir = tmp_path / "run"
    config = RECIPES / "accelerate" / accelerate_config
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        str(ROOT / "scripts" / "grpo_t2i.py"), "--config", str(DEMO_RECIPE), *QUICK_FLAGS, "--max_steps", "500",
        "--save_strategy", "no", "--image_log_steps", "0", "--disable_tqdm", "true", "--output_dir", str(output_dir),
    ]  # fmt: skip
    launcher = subprocess.Popen(
        command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,  # a process group the test can clean up
    )  # fmt: skip
    try:
        printed = []
        for line in launcher.stdout:  # until the first step is logged: the run is training
            printed.append(line)
            if "'loss'" in line:
                break
        launcher.send_signal(signal.SIGTERM)
        # until every run has closed the output it inherited: a run left behind trains its 500 steps
        printed.append(launcher.communicate(timeout=120)[0])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
    printed = "".join(printed)
    (checkpoint,) = output_dir.glob("checkpoint-*")
    assert (checkpoint / "trainer_state.json").is_file() and int(checkpoint.name.split("-")[1]) < 500
    assert f"saved to {checkpoint}. Resume with" in printed, printed[-3000:]
    # the launch command, launcher included, though the launcher has ended when the run prints it
    assert f"\n  python -m accelerate.commands.launch --config_file {config} " in printed, printed[-3000:]


def test_the_launchers_end_after_a_ctrl_c_changes_nothing_and_a_ctrl_c_after_sigterm_stops_at_once(capfd):
    # A terminal's Ctrl-C reaches a one-process launch twice: itself, then SIGTERM as its launcher ends
    preemption = PreemptionCallback()
    preemption._handle(signal.SIGINT, None)
    preemption._handle(signal.SIGTERM, None)
    assert preemption.received == signal.SIGINT and capfd.readouterr().err.count("saving a checkpoint") == 1
    preemption = PreemptionCallback()
    preemption._handle(signal.SIGTERM, None)
    with pytest.raises(KeyboardInterrupt):
        preemption._handle(signal.SIGINT, None)
