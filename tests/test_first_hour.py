"""A newcomer's first hour: the first commands run quietly (every line they print is theirs to read, none a warning to
wonder about), and CI checks what a contributor is asked to keep."""

import errno
import inspect
import os
import re
import shlex
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
from conftest import make_dry_run, make_trainer
from PIL import Image

from trl_t2i.cli import frontier, grpo
from trl_t2i.cli import main as cli_main
from trl_t2i.cli.parsing import RECIPES
from trl_t2i.models import load_model, load_processor
from trl_t2i.rewards import HPSv2Reward


ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_make_demo_prints_no_warnings(tmp_path):
    venv = Path(sys.prefix)  # the environment running the tests; `-o` keeps make from reinstalling it
    flags = f"--max_steps 2 --per_device_train_batch_size 16 --output_dir {tmp_path / 'demo'}"
    command = ["make", "-o", str(venv / ".installed"), "demo", f"VENV={venv}", f"DEMO_ARGS={flags}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "demo" / "adapter_model.safetensors").is_file()
    assert "Warning" not in result.stderr, result.stderr
    assert "were not passed to `accelerate launch`" not in result.stderr, result.stderr


def test_ci_runs_the_linters_then_the_tests_and_stops_at_the_first_failure(tmp_path):
    calls = tmp_path / "calls"
    make = tmp_path / "make"  # records the targets CI asks for; fails the one named by $FAIL
    make.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n[ "$1" != "$FAIL" ]\n')
    make.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    subprocess.run([str(ROOT / ".ci" / "run")], env=env, check=True)
    assert calls.read_text().split() == ["lint", "test"]
    calls.unlink()
    assert subprocess.run([str(ROOT / ".ci" / "run")], env={**env, "FAIL": "lint"}).returncode != 0
    assert calls.read_text().split() == ["lint"]
    venv = Path(sys.prefix)
    printed = make_dry_run("lint")
    assert f"{venv}/bin/ruff check ." in printed and f"{venv}/bin/ruff format --check ." in printed


def test_the_demo_runs_one_cpu_thread_however_many_cores_the_machine_has(tmp_path):
    # One thread per core spin-waits on a busy machine (scripts/bench_demo.py): a 64-core machine gets 1 thread too.
    getconf = tmp_path / "getconf"
    getconf.write_text("#!/bin/sh\necho 64\n")
    getconf.chmod(0o755)
    printed = make_dry_run("demo", env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert "--num_cpu_threads_per_process 1 " in printed, printed


def _imported_modules(*argv: str) -> set[str]:
    """The top-level packages that `python -m trl_t2i.cli <argv>` imports (from `-X importtime`)."""
    command = [sys.executable, "-X", "importtime", "-m", "trl_t2i.cli", *argv]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    lines = [line.split("|")[-1] for line in result.stderr.splitlines() if line.startswith("import time:")]
    return {line.strip().split(".")[0] for line in lines}


def test_cli_help_imports_no_heavy_package():
    # `trl-t2i --help` printed 11 lines after 7-17 s of importing torch, transformers and TRL
    for argv in (["--help"], ["no-such-command"]):
        imported = _imported_modules(*argv)
        assert "trl_t2i" in imported and not imported & {"torch", "transformers", "trl", "datasets", "numpy"}, argv


QUIET_PROBE = """
import logging, trl_t2i
logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
message = logging.makeLogRecord({"msg": "Failed to load CPU gemm_4bit_forward from kernels-community"})
library = logger.filter(message)
import trl_t2i.cli
print(bool(library), bool(logger.filter(message)), bool(logger.filter(logging.makeLogRecord({"msg": "another"}))))
"""


def test_the_library_leaves_logging_alone_and_the_commands_quiet_the_bitsandbytes_kernel_message():
    result = subprocess.run([sys.executable, "-c", QUIET_PROBE], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "False", "True"]


@pytest.mark.parametrize(
    ("config_flags", "message"),
    [
        (["--config", "recipes/tiny/cpu_demo.yaml", "--config=recipes/tiny/frontier.yaml"], "--config given 2 times"),
        (["--max_steps", "1", "--config"], "--config needs a recipe"),
    ],
)
def test_config_given_twice_or_without_a_recipe_is_a_usage_error(capsys, config_flags, message):
    with pytest.raises(SystemExit) as failure:
        cli_main(["grpo", *config_flags])
    assert failure.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def no_hub(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr("trl_t2i.hub.HfApi", refuse)


def test_push_dry_run_lists_the_files_and_the_repo_without_contacting_the_hub(tmp_path, capsys, no_hub):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\0" * 2_000_000)
    (tmp_path / "README.md").write_text("card")
    (tmp_path / "checkpoint-2").mkdir()
    cli_main(["push", "--output_dir", str(tmp_path), "--hub_model_id", "me/run", "--dry_run"])
    printed = capsys.readouterr().out
    assert "me/run" in printed and "adapter_model.safetensors  (2.00 MB)" in printed and "README.md" in printed
    assert "checkpoint-2" not in printed


def test_push_of_a_missing_directory_names_it(tmp_path, no_hub):
    missing = tmp_path / "runs" / "janus-js"
    for dry_run in ([], ["--dry_run"]):
        with pytest.raises(FileNotFoundError, match=f"No output directory '{missing}'.*output_dir` of a finished"):
            cli_main(["push", "--output_dir", str(missing), "--hub_model_id", "me/run", *dry_run])


def test_demo_frontier_sweeps_js_and_reverse_kl_with_one_thread():
    printed = make_dry_run("demo-frontier")
    words = shlex.split(printed.replace("\\\n", " "))
    assert words[0] == "OMP_NUM_THREADS=1"  # torch reads it at start-up: one thread, as `make demo`
    (args,) = frontier.make_parser().parse_args_and_config(words[words.index("scripts/frontier_t2i.py") + 1 :])
    assert {"js", "reverse_kl"} <= set(args.divergences)
    assert 0 in args.betas and len([beta for beta in args.betas if beta > 0]) >= 2  # a curve for each, and β = 0


@pytest.fixture
def offline(monkeypatch):
    """No Hub (as with HF_HUB_OFFLINE=1): what a machine without network meets, without a minute of retries."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("load", [load_model, load_processor])
def test_a_model_that_cannot_be_downloaded_is_named_with_how_to_get_it(offline, load):
    with pytest.raises(OSError) as failure:
        load("nobody-here/no-such-model")
    message = str(failure.value)
    assert message.startswith("Could not load the model 'nobody-here/no-such-model' (`model_name_or_path`)")
    assert "`hf download nobody-here/no-such-model`" in message and "pass `--model_name_or_path FOLDER`" in message


def test_a_missing_local_model_folder_is_named(offline):
    with pytest.raises(OSError, match="model './llamagen-t2i-xl-256'.*no such local folder.*convert_llamagen"):
        load_model("./llamagen-t2i-xl-256")


def _install_table() -> list[tuple[list[str], str, str]]:
    """The README's table of what each GPU recipe installs and downloads: (recipe patterns, install, downloads)."""
    section = (ROOT / "README.md").read_text().split("**From a recipe to a GPU run.**")[1]
    rows = []
    for line in section.split("\n\n")[1].splitlines()[2:]:
        recipes, install, downloads = (cell.strip() for cell in line.strip("|").split(" | "))
        downloads = rows[-1][2] if downloads == "as the line above" else downloads
        rows.append((re.findall(r"`([^`]+\.yaml)`", recipes), install, downloads))
    return rows


@pytest.mark.parametrize(
    "recipe",
    sorted(path for path in RECIPES.rglob("*.yaml") if path.parent.name not in ("accelerate", "tiny")),
    ids=lambda path: str(path.relative_to(RECIPES)),
)
def test_the_readme_says_what_each_gpu_recipe_installs_and_downloads(recipe):
    name = str(recipe.relative_to(RECIPES))
    ((_, install, downloads),) = [row for row in _install_table() if any(fnmatch(name, p) for p in row[0])]
    script_args, _, model_args = grpo.make_parser().parse_args_and_config(
        ["--config", str(recipe), "--use_cpu", "true"]
    )
    hps = inspect.signature(HPSv2Reward).parameters
    hps_download = f"`{hps['model_id'].default}` `{hps['filename'].default}`"
    assert ("hpsv2" in script_args.reward_funcs) == ("hps" in install) == (hps_download in downloads)
    assert bool(model_args.load_in_4bit) == ("quantization" in install)
    assert ("deepspeed_zero" in recipe.read_text().split("\n\n")[0]) == ("`deepspeed`" in install)  # its header
    model = model_args.model_name_or_path
    if model.count("/") == 1:  # a Hub id
        assert f"`{model}`" in downloads
    else:  # a converted LlamaGen
        assert (
            f"the local folder `{model}` that `trl-t2i convert_llamagen` writes" in downloads and "llamagen" in install
        )


def _full_disk(monkeypatch):
    """PNG writes fail as on a full disk: the file is created, then nothing fits in it."""

    def save(image, fp, format=None, **params):
        Path(fp).write_bytes(b"")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", save)


def test_a_full_disk_leaves_no_empty_image_grid_and_names_it(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=1, image_log_steps=1)
    trainer.train()  # a grid in samples/, which the card shows as sample_grid.png
    grid = tmp_path / "samples" / "step_000001.png"
    size = grid.stat().st_size
    _full_disk(monkeypatch)
    with pytest.raises(OSError, match="No space left on device"):
        trainer.create_model_card()
    assert not (tmp_path / "sample_grid.png").exists()
    with pytest.raises(OSError, match=f"Could not write {grid} .*No space left on device.*nothing was written"):
        trainer.image_grids.log_grid(trainer.state)
    assert list((tmp_path / "samples").iterdir()) == [grid] and grid.stat().st_size == size  # the grid as it was
