"""A run fails early and clearly on bad input (captions longer than the model takes, non-finite settings), stops
before the update when training goes non-finite (or skips the step) and never saves non-finite weights, owns its
output directory, writes checkpoints atomically, names a damaged checkpoint and compares the settings at resume, and
stops on SIGTERM/SIGINT with a checkpoint, the command that resumes it and a non-zero exit status."""

import errno
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import DEMO_RECIPE, QUICK_FLAGS, make_config, make_trainer, prompt_length, prompt_limit
from datasets import Dataset
from transformers import TrainerCallback, TrainerControl, TrainerState
from trl import GRPOTrainer

from trl_t2i import checkpoints, output_dir
from trl_t2i.cli.grpo import main, make_parser
from trl_t2i.models import TINY_JANUS, TINY_LLAMAGEN, load_family
from trl_t2i.nonfinite import NonFiniteTrainingError
from trl_t2i.preemption import PreemptionCallback, resume_command
from trl_t2i.run_settings import RunSettings
from trl_t2i.sampling import SamplingConfig
from trl_t2i.sharding import check_sharding


def _parse(*argv):
    return make_parser().parse_args_and_config(
        ["--config", str(DEMO_RECIPE), *QUICK_FLAGS, "--image_log_steps", "0", *argv]
    )


def _run(out, *argv):
    return main(*_parse("--output_dir", str(out), *argv))


# ------------------------------------------------------------------ prompts


def test_empty_prompt_file_fails_before_loading_the_model(tmp_path, no_model_loading):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n")
    with pytest.raises(ValueError, match=f"Prompt file '{prompts}' has no prompts"):
        _run(tmp_path / "out", "--dataset_name", str(prompts))


@pytest.fixture(scope="module")
def janus_family():
    return load_family(TINY_JANUS)


def test_a_caption_longer_than_the_model_takes_fails_before_loading_the_model(
    tmp_path,
    janus_family,
    no_model_loading,  # noqa: F811
):
    prompts = tmp_path / "prompts.txt"
    long = "red " * prompt_limit(janus_family)
    prompts.write_text(f"a red cat\n{long}\n")
    length, limit = prompt_length(janus_family, long), prompt_limit(janus_family)
    with pytest.raises(
        ValueError, match=f"'{prompts}', line 2: the caption has {length} prompt tokens, more than the {limit}"
    ):
        _run(tmp_path / "out", "--dataset_name", str(prompts))


def test_the_trainer_checks_its_prompts_before_loading_the_model(tmp_path, janus_family, no_model_loading):  # noqa: F811
    long = "red " * 15_000  # the 50 KB caption
    dataset = Dataset.from_dict({"prompt": ["a red cat", long]})
    message = f"The train dataset, row 1: the caption has {prompt_length(janus_family, long)} prompt tokens"
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, dataset=dataset)


def test_max_prompt_length_gives_the_trainer_the_cut_captions(tmp_path, janus_family):
    long = "red " * 300
    with pytest.warns(UserWarning, match="cut 1 caption"):
        trainer = make_trainer(
            tmp_path, dataset=Dataset.from_dict({"prompt": ["a red cat", long]}), max_prompt_length=20
        )
    short, cut = trainer.train_dataset["prompt"]
    assert short == "a red cat" and long.startswith(cut) and prompt_length(janus_family, cut) == 20


# ------------------------------------------------------------------ settings


# Each setting with the companions it needs to be accepted at all.
NUMERIC_SETTINGS = {
    "beta": {},
    "beta_end": {"beta_schedule": "linear"},
    "temperature": {},
    "cfg_scale": {},
    "beta_max": {"beta_schedule": "adaptive", "divergence_target": 0.1},
    "divergence_target": {"beta_schedule": "adaptive"},
    "divergence_alpha": {"divergence": "alpha"},
}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", sorted(NUMERIC_SETTINGS))
def test_non_finite_settings_are_refused_by_the_config(tmp_path, name, value):
    companions = NUMERIC_SETTINGS[name]
    with pytest.raises(ValueError, match=f"`{name}={value}`.*finite"):
        make_config(tmp_path, **companions, **{name: value})


@pytest.mark.parametrize("name", ["cfg_scale", "temperature", "top_p"])
def test_non_finite_sampling_settings_are_refused_by_every_command(name):
    with pytest.raises(ValueError, match=f"`{name}=nan`.*finite"):
        SamplingConfig(**{name: math.nan})


def test_an_alpha_whose_estimator_would_overflow_fails_before_loading_the_model(tmp_path, no_model_loading):  # noqa: F811
    with pytest.raises(ValueError, match=r"alpha=50.0 is outside \[-1, 2\]"):
        _run(tmp_path, "--divergence", "alpha", "--divergence_alpha", "50", "--divergence_estimator", "sampled")


def test_non_finite_flag_fails_before_loading_the_model(tmp_path, no_model_loading):  # noqa: F811
    with pytest.raises(ValueError, match="`beta=nan`.*finite"):
        _run(tmp_path, "--beta", "nan")


# ------------------------------------------------------------------ non-finite training


def _non_finite_at_step_2(trainer, monkeypatch, term):
    """Make `term` NaN/inf in the second optimizer step only."""

    def in_step_2():
        return trainer.state.global_step == 1

    if term == "penalty":
        sampled = trainer.divergence.sampled
        monkeypatch.setattr(
            trainer.divergence, "sampled", lambda *args: sampled(*args) * (math.inf if in_step_2() else 1.0)
        )
    elif term == "loss":
        policy_loss = GRPOTrainer._compute_loss

        def nan_loss(self, model, inputs):
            return policy_loss(self, model, inputs) * (math.nan if in_step_2() else 1.0)

        monkeypatch.setattr(GRPOTrainer, "_compute_loss", nan_loss)
    else:  # the gradient alone
        lora = next(param for name, param in trainer.model.named_parameters() if "lora_A" in name)
        lora.register_hook(lambda grad: grad * math.nan if in_step_2() else grad)


class _Snapshots(TrainerCallback):
    """The trainable weights at the end of every optimizer step."""

    def __init__(self):
        self.weights = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {
            name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad
        }


def _trainable(trainer):
    return {name: param.detach() for name, param in trainer.model.named_parameters() if param.requires_grad}


@pytest.mark.parametrize(
    ("term", "named"),
    [
        ("penalty", r"the divergence penalty \(β · reverse_kl, sampled estimator\) is inf"),
        ("loss", r"the policy loss \(TRL's GRPO term\) is nan"),
        ("gradient", "the gradient norm is nan"),
    ],
    ids=["penalty", "loss", "gradient"],
)
def test_a_non_finite_step_stops_the_run_naming_the_term_before_the_update(tmp_path, monkeypatch, term, named):
    trainer = make_trainer(tmp_path, max_steps=3, save_strategy="steps", save_steps=1)
    snapshots = _Snapshots()
    trainer.add_callback(snapshots)
    _non_finite_at_step_2(trainer, monkeypatch, term)
    message = (
        f"non-finite at step 2: .*{named}.*latest checkpoint is {tmp_path / 'checkpoint-1'}.*skip_nonfinite_steps"
    )
    with pytest.raises(NonFiniteTrainingError, match=message):
        trainer.train()
    assert [path.name for path in tmp_path.glob("checkpoint-*")] == ["checkpoint-1"]
    for name, weight in _trainable(trainer).items():  # as step 1 left them: finite, the update never applied
        assert torch.equal(weight, snapshots.weights[1][name]), name


def test_skip_nonfinite_steps_drops_those_steps_and_stops_past_the_limit(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=3, skip_nonfinite_steps=1)
    snapshots = _Snapshots()
    trainer.add_callback(snapshots)
    _non_finite_at_step_2(trainer, monkeypatch, "penalty")
    trainer.train()
    assert trainer.state.global_step == 3
    for name, weight in snapshots.weights[2].items():
        assert torch.equal(weight, snapshots.weights[1][name]), name  # step 2 skipped
        assert not torch.equal(snapshots.weights[3][name], weight) and torch.isfinite(snapshots.weights[3][name]).all()
    skipped = {
        log["step"]: log["nonfinite/skipped_steps"]
        for log in trainer.state.log_history
        if "nonfinite/skipped_steps" in log
    }
    assert skipped == {2: 1}

    again = make_trainer(tmp_path / "again", max_steps=3, skip_nonfinite_steps=1)
    monkeypatch.setattr(again.divergence, "sampled", lambda *args: torch.full_like(args[0], math.inf))
    with pytest.raises(NonFiniteTrainingError, match=r"non-finite at step 2: .*\(1 were skipped already.\)"):
        again.train()


def test_non_finite_weights_are_never_saved(tmp_path):
    trainer = make_trainer(tmp_path)
    name, lora = next((name, param) for name, param in trainer.model.named_parameters() if "lora_B" in name)
    with torch.no_grad():
        lora[0, 0] = math.nan
    with pytest.raises(NonFiniteTrainingError, match=f"non-finite weights to {tmp_path / 'out'}: {re.escape(name)}"):
        trainer.save_model(str(tmp_path / "out"))
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------ the output directory


@pytest.mark.parametrize("where", ["is_a_file", "under_a_file"])
def test_output_dir_that_cannot_be_a_folder_fails_before_loading_the_model(
    tmp_path,
    no_model_loading,  # noqa: F811
    where,
):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    out = a_file if where == "is_a_file" else a_file / "run"
    with pytest.raises(NotADirectoryError, match=f"output_dir '{out}' cannot be created: '{a_file}' is a file"):
        _run(out)


@pytest.mark.parametrize("where", ["existing", "missing_under_existing"])
def test_unwritable_output_dir_is_reported_naming_the_folder(tmp_path, monkeypatch, where):
    # Tests run as root, which writes into read-only folders: the probe's failure is simulated.
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("tempfile.TemporaryFile", refuse)
    out = tmp_path if where == "existing" else tmp_path / "new" / "run"
    with pytest.raises(PermissionError, match=f"output_dir '{out}' is not writable: .* in '{tmp_path}' .*Permission"):
        output_dir.check_output_dir(out)


def test_writable_output_dir_passes_the_probe_and_leaves_nothing(tmp_path):
    output_dir.check_output_dir(tmp_path / "new" / "run")
    assert list(tmp_path.iterdir()) == []


HOLD_LOCK = """
import sys
from trl_t2i.output_dir import locked
with locked(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # until killed
"""


@pytest.mark.slow
def test_second_run_into_a_locked_output_dir_fails_naming_the_first_and_a_killed_run_frees_it(
    tmp_path,
    no_model_loading,  # noqa: F811
):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline() == b"locked\n"
        other_run = f"in use by another run \\(pid {holder.pid} on host {socket.gethostname()}\\)"
        with pytest.raises(RuntimeError, match=other_run):
            _run(out)
    finally:
        holder.kill()  # a crash: the kernel releases the lock
        holder.wait()
    with output_dir.locked(out):
        pass


@pytest.mark.parametrize("earlier", ["checkpoint-4", "adapter_model.safetensors", "run_settings.json", "samples"])
def test_new_run_into_an_earlier_runs_output_dir_is_refused(tmp_path, no_model_loading, earlier):  # noqa: F811
    (tmp_path / earlier).mkdir() if "." not in earlier else (tmp_path / earlier).write_text("{}")
    message = f"earlier run's outputs \\({earlier}\\).*--resume_from_checkpoint true.*--overwrite_output_dir true"
    with pytest.raises(FileExistsError, match=message):
        _run(tmp_path)


def test_overwrite_output_dir_starts_over_without_the_earlier_checkpoints(tmp_path):
    (tmp_path / "checkpoint-40").mkdir()
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "step_000040.png").write_bytes(b"")
    trainer = _run(tmp_path, "--overwrite_output_dir", "true", "--save_steps", "1")
    assert trainer.state.global_step == 2
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (tmp_path / "samples").exists()  # image_log_steps 0: no grid of this run, none of the earlier one


# ------------------------------------------------------------------ resuming


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A 2-step run that saved checkpoint-1 and checkpoint-2."""
    out = tmp_path_factory.mktemp("saved_run")
    _run(out, "--save_steps", "1", "--overwrite_output_dir", "true")
    return out


def test_resume_true_is_the_latest_checkpoint(saved_run):
    assert checkpoints.resolve_resume("true", saved_run) == str(saved_run / "checkpoint-2")
    assert checkpoints.resolve_resume(True, saved_run) == str(saved_run / "checkpoint-2")  # from a YAML `true`
    assert checkpoints.resolve_resume("false", saved_run) is None


def test_resume_true_without_a_checkpoint_fails_before_loading_the_model(tmp_path, no_model_loading):  # noqa: F811
    with pytest.raises(FileNotFoundError, match=f"latest checkpoint-N in output_dir '{tmp_path}', but there is none"):
        _run(tmp_path, "--resume_from_checkpoint", "true")


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_truncated_checkpoint_file_is_named_at_resume_with_the_previous_checkpoint(
    tmp_path,
    saved_run,
    no_model_loading,  # noqa: F811
    damaged,
):
    out = tmp_path / "out"
    shutil.copytree(saved_run, out)
    file = out / "checkpoint-2" / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    message = (
        f"Checkpoint file '{file}' is damaged .*Checkpoints in '{out}': checkpoint-1, checkpoint-2. "
        f"Resume from the previous one: `--resume_from_checkpoint {out / 'checkpoint-1'}`"
    )
    with pytest.raises(ValueError, match=message):
        _run(out, "--resume_from_checkpoint", "true")


def test_resuming_with_a_model_of_another_family_is_refused_before_loading_the_model(
    tmp_path,
    saved_run,
    no_model_loading,  # noqa: F811
):
    out = shutil.copytree(saved_run, tmp_path / "out")
    message = (
        f"Cannot resume from {out / 'checkpoint-2'}: it was trained with base_model 'tiny:janus', not "
        "'tiny:llamagen'; model_type 'janus', not 'llamagen'"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        _run(out, "--resume_from_checkpoint", "true", "--model_name_or_path", "tiny:llamagen")


def test_the_trainer_refuses_a_checkpoint_of_another_family_before_loading_it(tmp_path, saved_run):
    trainer = make_trainer(tmp_path, model=TINY_LLAMAGEN)  # and the checkpoint is a Janus adapter
    with pytest.raises(ValueError, match="model_type 'janus', not 'llamagen'"):
        trainer.train(resume_from_checkpoint=str(saved_run / "checkpoint-2"))


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [("--lora_r", "8", "lora.r 16, not 8"), ("--lora_alpha", "64", "lora.lora_alpha 32, not 64")],
)
def test_resuming_with_another_lora_adapter_is_refused(tmp_path, saved_run, flag, value, named):
    out = shutil.copytree(saved_run, tmp_path / "out")
    with pytest.raises(ValueError, match=f"Cannot resume from .*checkpoint-2: it was trained with {named}\\. "):
        _run(out, "--resume_from_checkpoint", "true", flag, value)


def test_resuming_under_other_settings_names_each_change_and_the_card_records_it(tmp_path, saved_run):
    out = shutil.copytree(saved_run, tmp_path / "out")
    changes = ["--divergence", "reverse_kl", "--beta", "0.1", "--max_steps", "3"]
    with pytest.warns(UserWarning) as warned:
        trainer = _run(out, "--resume_from_checkpoint", "true", *changes, "--save_strategy", "no")
    (message,) = [str(warning.message) for warning in warned if "other settings" in str(warning.message)]
    assert f"Resuming from {out / 'checkpoint-2'} (step 2) with other settings" in message
    for change in ("divergence: 'js' → 'reverse_kl'", "beta: 0.04 → 0.1", "max_steps: 2 → 3"):
        assert change in message, change
    assert "learning_rate" not in message and trainer.state.global_step == 3
    recorded = RunSettings.load(out).resumes
    assert recorded == [
        {"step": 2, "changes": {"divergence": ["js", "reverse_kl"], "beta": [0.04, 0.1], "max_steps": [2, 3]}}
    ]
    card = (out / "README.md").read_text()
    assert "| resumed with other settings | at step 2: divergence `js` → `reverse_kl`, beta `0.04` → `0.1`" in card


# ------------------------------------------------------------------ atomic checkpoints


def test_checkpoints_appear_only_once_complete_and_still_rotate(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=1, save_total_limit=1)
    visible_while_written = []
    save_rng_state = trainer._save_rng_state

    def recording_save_rng_state(folder):
        visible_while_written.append((tmp_path / f"checkpoint-{trainer.state.global_step}").exists())
        save_rng_state(folder)

    monkeypatch.setattr(trainer, "_save_rng_state", recording_save_rng_state)
    trainer.train()
    assert visible_while_written == [False, False]
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(("checkpoint", "."))) == [
        "checkpoint-2"  # save_total_limit=1 rotated checkpoint-1 out; no staging folder left
    ]
    checkpoints.check_checkpoint(tmp_path / "checkpoint-2")
    assert {"adapter_model.safetensors", "optimizer.pt", "rng_state.pth", "run_settings.json"} <= {
        path.name for path in (tmp_path / "checkpoint-2").iterdir()
    }


def test_full_disk_while_saving_leaves_no_checkpoint_and_says_so(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=1)
    save_optimizer = trainer._save_optimizer_and_scheduler

    def disk_full_at_step_2(folder):
        if trainer.state.global_step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        save_optimizer(folder)

    monkeypatch.setattr(trainer, "_save_optimizer_and_scheduler", disk_full_at_step_2)
    message = (
        f"no space left on device while saving checkpoint-2 to {tmp_path}; "
        f"the previous checkpoint {tmp_path / 'checkpoint-1'} is intact"
    )
    with pytest.raises(OSError, match=re.escape(message)):
        trainer.train()
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(("checkpoint", "."))) == [
        "checkpoint-1"
    ]
    checkpoints.check_checkpoint(tmp_path / "checkpoint-1")


# ------------------------------------------------------------------ preemption


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_prints_the_resume_command_exits_non_zero_and_the_run_resumes(
    tmp_path, monkeypatch, capsys, signum
):
    import trl_t2i.trainer as trainer_module

    generate = trainer_module.T2IGRPOTrainer._generate

    def preempted_during_the_first_step(self, prompts):
        if self.state.global_step == 0:
            os.kill(os.getpid(), signum)  # as a cluster scheduler (or Ctrl-C) would
        return generate(self, prompts)

    monkeypatch.setattr(trainer_module.T2IGRPOTrainer, "_generate", preempted_during_the_first_step)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(SystemExit) as stopped:
        _run(tmp_path, "--max_steps", "3", "--save_strategy", "no")
    assert stopped.value.code == 128 + signum  # 143 or 130: never 0, the run is not finished
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers  # restored
    assert [path.name for path in tmp_path.glob("checkpoint-*")] == ["checkpoint-1"]
    assert not (tmp_path / "adapter_model.safetensors").exists()  # no final save: the run is not finished
    printed = capsys.readouterr().out
    assert f"--resume_from_checkpoint {tmp_path / 'checkpoint-1'}" in printed.splitlines()[-1]

    monkeypatch.setattr(trainer_module.T2IGRPOTrainer, "_generate", generate)
    resumed = _run(tmp_path, "--max_steps", "3", "--save_strategy", "no", "--resume_from_checkpoint", "true")
    assert resumed.state.global_step == 3 and (tmp_path / "adapter_model.safetensors").is_file()
    assert [log["step"] for log in resumed.state.log_history if "loss" in log] == [1, 2, 3]


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_under_accelerate_launch_a_preempted_run_exits_143_and_prints_the_launch_command(tmp_path):
    # As `make demo` starts it: the launcher by a relative path, with its config file. SIGTERM goes to the run itself
    # (the launcher's own handling of signals is accelerate's).
    out = tmp_path / "run"
    accelerate = os.path.relpath(Path(sys.executable).parent / "accelerate", ROOT)
    command = [
        accelerate, "launch", "--config_file", "recipes/accelerate/cpu.yaml", "--num_cpu_threads_per_process", "1",
        "scripts/grpo_t2i.py", "--config", "recipes/tiny/cpu_demo.yaml", *QUICK_FLAGS, "--max_steps", "1000",
        "--save_steps", "1", "--image_log_steps", "0", "--output_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "stdout", "w+") as stdout, open(tmp_path / "stderr", "w+") as stderr:
        launcher = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout, stderr=stderr, text=True)
        try:
            deadline = time.monotonic() + 300
            while not (out / "checkpoint-1").is_dir() and launcher.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            (run,) = psutil.Process(launcher.pid).children()
            run.send_signal(signal.SIGTERM)
            launcher.wait(timeout=300)
        finally:
            launcher.kill()
        stdout.seek(0), stderr.seek(0)
        printed, errors = stdout.read(), stderr.read()
    assert "returned non-zero exit status 143" in errors, errors[-3000:]  # 128 + SIGTERM, which accelerate reports
    stopped_at = max(int(path.name.split("-")[1]) for path in out.glob("checkpoint-*"))
    resume = printed.strip().splitlines()[-1].strip()
    launched = shlex.join(command[:-1])  # the output directory is absolute in the resume command too
    assert resume.startswith(launched.replace(accelerate, "accelerate", 1)), resume
    assert resume.endswith(f"--resume_from_checkpoint {out / f'checkpoint-{stopped_at}'}"), resume


def test_ctrl_c_requests_a_save_at_the_next_step_end_and_twice_stops_at_once(tmp_path):
    preemption = PreemptionCallback()
    args, state, control = make_config(tmp_path), TrainerState(global_step=4, max_steps=10), TrainerControl()
    with preemption.catching_signals():
        preemption.on_step_end(args, state, control)
        assert not control.should_save and preemption.stopped_at is None
        os.kill(os.getpid(), signal.SIGINT)
        preemption.on_step_end(args, state, control)
        assert control.should_save and control.should_training_stop and preemption.stopped_at == 4
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_resume_command_replaces_earlier_resume_and_overwrite_options():
    argv = ["trl-t2i", "grpo", "--config", "r.yaml", "--resume_from_checkpoint=old", "--overwrite_output_dir", "true"]
    assert resume_command("/runs/a/checkpoint-7", argv) == (
        "trl-t2i grpo --config r.yaml --resume_from_checkpoint /runs/a/checkpoint-7"
    )


# ------------------------------------------------------------------ sharding


@pytest.mark.parametrize(
    ("environment", "flags", "message"),
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, {}, "FSDP2.*deepspeed_zero3.yaml.*fsdp_version: 1"),
        ({}, {"fsdp": "full_shard"}, "FSDP2"),  # transformers' `--fsdp` defaults to version 2
        ({"ACCELERATE_USE_FSDP": "true"}, {"use_cpu": True}, "FSDP is set up but so is `use_cpu`.*cpu_ddp.yaml"),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, {"use_cpu": True}, "DeepSpeed is set up but so is `use_cpu`"),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true"},
            {"skip_nonfinite_steps": 1},
            "`skip_nonfinite_steps` cannot.*DeepSpeed",
        ),
    ],
)
def test_sharded_setups_that_would_not_train_as_asked_are_refused(tmp_path, monkeypatch, environment, flags, message):
    args = make_config(tmp_path, **{"use_cpu": False, **flags})
    for name, value in environment.items():  # after the config: with DeepSpeed's, it imports deepspeed (not installed)
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        check_sharding(args)


def test_fsdp1_on_gpus_is_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    check_sharding(make_config(tmp_path, use_cpu=False))


def test_fsdp_on_cpu_fails_before_loading_the_model(tmp_path, monkeypatch, no_model_loading):  # noqa: F811
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ValueError, match="FSDP is set up but so is `use_cpu`"):
        _run(tmp_path)


def test_the_trainer_refuses_fsdp2_for_python_users_too(tmp_path, monkeypatch, no_model_loading):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ValueError, match="FSDP"):
        make_trainer(tmp_path)
