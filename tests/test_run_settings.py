import dataclasses
import json
from pathlib import Path

import pytest
from conftest import train_tiny_recipe

import trl_t2i
from trl_t2i.models import JanusFamily
from trl_t2i.run_settings import RUN_SETTINGS_FILE, RunSettings, check_resume
from trl_t2i.sampling import SamplingConfig


@pytest.fixture(scope="module")
def alpha_run(tmp_path_factory):
    """A 2-step LoRA run of the tiny recipe with the α-divergence at its default α, saved after every step."""
    return train_tiny_recipe(
        tmp_path_factory.mktemp("alpha-run"),
        *["--save_steps", "1", "--image_log_steps", "0", "--divergence", "alpha"],
        *["--divergence_estimator", "sampled", "--beta", "0.1", "--top_k", "7"],
    )


def test_every_save_writes_the_run_settings(alpha_run):
    output_dir = Path(alpha_run.args.output_dir)
    for directory in (output_dir, output_dir / "checkpoint-1", output_dir / "checkpoint-2"):
        assert RunSettings.load(directory) == RunSettings.from_trainer(alpha_run), directory


def test_run_settings_are_resolved_with_the_defaults_filled_in(alpha_run):
    written = json.loads((Path(alpha_run.args.output_dir) / RUN_SETTINGS_FILE).read_text())
    assert written == {
        "trl_t2i_version": trl_t2i.__version__,
        "base_model": "tiny:janus",
        "divergence": "alpha",
        "divergence_params": {"alpha": 0.5},  # `divergence_alpha` was unset: the divergence's own default
        "divergence_estimator": "sampled",
        "use_bias_correction_kl": True,
        "beta": 0.1,
        "beta_schedule": "constant",
        "beta_end": None,
        "sampling": {"cfg_scale": 5.0, "temperature": 1.0, "top_k": 7, "top_p": 1.0},
        "cfg_logprobs": "guided",
        "reward_names": ["colour_match"],
        "reward_weights": [1.0],
        "loss_type": alpha_run.args.loss_type,
        "num_generations": 4,
        "learning_rate": 1e-3,
        "max_steps": 2,
        "seed": 0,
        "per_device_train_batch_size": 8,
        "divergence_target": None,
        "token_selection": "all",
        "dynamic_advantage": False,
        "divergence_in": "loss",
        "sampler_correction": False,
        "sampler_correction_mode": "token_truncate",
        "model_type": "janus",
        "lora": {
            "r": 16,
            "lora_alpha": 32,
            "target_modules": JanusFamily.lora_target_modules,  # the family's, as the recipe sets none
            "use_rslora": False,
            "use_dora": False,
        },
        "resumes": [],
    }
    assert RunSettings.load(alpha_run.args.output_dir).sampling == SamplingConfig(top_k=7)


def test_missing_run_settings_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"No {tmp_path / RUN_SETTINGS_FILE}"):
        RunSettings.load(tmp_path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda data: "{not json",
        lambda data: json.dumps([data]),
        lambda data: json.dumps({key: value for key, value in data.items() if key != "beta"}),
        lambda data: json.dumps({**data, "sampling": {**data["sampling"], "top_p": 2.0}}),
    ],
    ids=["not-json", "not-an-object", "missing-field", "invalid-sampling"],
)
def test_malformed_run_settings_name_the_file(tmp_path, alpha_run, edit):
    settings = RunSettings.load(alpha_run.args.output_dir)
    path = tmp_path / RUN_SETTINGS_FILE
    path.write_text(edit(json.loads(json.dumps(dataclasses.asdict(settings)))))
    with pytest.raises(ValueError, match=f"{path} is not a valid run settings file"):
        RunSettings.load(tmp_path)


def test_settings_written_before_the_paper_loss_options_were_recorded_still_load(tmp_path, alpha_run):
    data = dataclasses.asdict(RunSettings.load(alpha_run.args.output_dir))
    older = {key: value for key, value in data.items() if key not in ("divergence_target", "token_selection")}
    for recorded_later in (
        "divergence_in",
        "sampler_correction",
        "sampler_correction_mode",
        "model_type",
        "lora",
        "resumes",
    ):
        older.pop(recorded_later)
    (tmp_path / RUN_SETTINGS_FILE).write_text(json.dumps({**older, "dynamic_advantage": True}))
    loaded = RunSettings.load(tmp_path)
    assert (loaded.divergence_target, loaded.token_selection, loaded.dynamic_advantage) == (None, "all", True)
    assert (loaded.divergence_in, loaded.sampler_correction, loaded.sampler_correction_mode) == (
        "loss",
        False,
        "token_truncate",
    )
    assert (loaded.model_type, loaded.lora, loaded.resumes) == (None, None, [])


def test_a_checkpoint_written_before_the_model_was_recorded_still_resumes(tmp_path, alpha_run):
    current = RunSettings.load(alpha_run.args.output_dir)
    dataclasses.replace(current, model_type=None, lora=None).save(tmp_path)
    assert check_resume(tmp_path, current) == []  # nothing to compare the model and adapter with; nothing else changed
    dataclasses.replace(current, model_type="llamagen").save(tmp_path)
    with pytest.raises(ValueError, match="model_type 'llamagen', not 'janus'"):
        check_resume(tmp_path, current)
