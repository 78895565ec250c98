import dataclasses
import sys
from pathlib import Path

import pytest
import yaml
from conftest import DEMO_RECIPE, QUICK_FLAGS, train_tiny_recipe
from huggingface_hub import HfApi

from trl_t2i import hub
from trl_t2i.run_settings import RunSettings
from trl_t2i.sampling import SamplingConfig


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step LoRA run of the tiny recipe, with logged grids and a card."""
    output_dir = tmp_path_factory.mktemp("run")
    flags = ["--image_log_steps", "1", "--hub_model_id", "someone/tiny-janus-grpo-js"]
    argv = ["--config", str(DEMO_RECIPE), *QUICK_FLAGS, "--output_dir", str(output_dir), *flags]
    with pytest.MonkeyPatch.context() as patch:  # the card records the command line the script was started with
        patch.setattr("sys.orig_argv", [sys.executable, "scripts/grpo_t2i.py", *argv])
        patch.setattr(hub, "_parent_argv", lambda: ["bash"])
        return train_tiny_recipe(output_dir, *flags)


class FakeHub:
    """Records what would be sent to the Hub, at huggingface_hub's API boundary."""

    def __init__(self, fail=False):
        self.repos, self.commits, self.fail = [], [], fail

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs))

    def create_commit(self, api, repo_id, operations, **kwargs):
        if self.fail:
            raise ConnectionError("no network")
        self.commits.append((repo_id, [op.path_in_repo for op in operations], kwargs))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


def _install(monkeypatch, fake: FakeHub) -> FakeHub:
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: fake.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(
        HfApi,
        "create_commit",
        lambda api, repo_id, operations, **kw: fake.create_commit(api, repo_id, operations, **kw),
    )
    return fake


@pytest.fixture
def fake_hub(monkeypatch):
    return _install(monkeypatch, FakeHub())


def _card(output_dir: Path) -> tuple[dict, str]:
    text = (output_dir / "README.md").read_text()
    _, metadata, body = text.split("---", 2)
    return yaml.safe_load(metadata), body


def test_model_card_metadata_and_content(trained):
    metadata, body = _card(Path(trained.args.output_dir))
    assert metadata["base_model"] == "tiny:janus"
    assert metadata["library_name"] == "peft" and metadata["pipeline_tag"] == "text-to-image"
    assert {"trl-t2i", "grpo", "js", "lora"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["colour_objects"]
    for expected in ["`js`", "`exact`", "| β | 0.04 |", "5.0 / `guided`", "`colour_match` (1)", "`colour_objects`"]:
        assert expected in body, expected
    assert "divergence/js" in body and "reward" in body  # final metrics
    assert f"python scripts/grpo_t2i.py --config {DEMO_RECIPE}" in body  # the command line
    assert 'PeftModel.from_pretrained(load_model("tiny:janus"' in body
    assert f"![Samples from the end of training]({hub.SAMPLE_GRID})" in body
    assert (Path(trained.args.output_dir) / hub.SAMPLE_GRID).is_file()


def test_card_settings_are_the_run_settings_with_their_defaults(trained, tmp_path):
    settings = RunSettings.load(trained.args.output_dir)  # what the trainer wrote at its final save
    settings = dataclasses.replace(
        settings, divergence="alpha", divergence_params={"alpha": 0.5}, reward_weights=[2.0]
    )
    card = hub.model_card(settings=settings, output_dir=tmp_path / "my-run", is_adapter=True, metrics={})
    assert "| divergence | `alpha` (alpha = 0.5) |" in card  # the default α, though `divergence_alpha` was unset
    assert "| rewards (weights) | `colour_match` (2) |" in card
    assert "# my-run" in card


def test_card_names_the_adaptive_target_and_the_paper_loss_options(trained, tmp_path):
    settings = dataclasses.replace(
        RunSettings.load(trained.args.output_dir),
        beta_schedule="adaptive",
        divergence_target=0.3,
        token_selection="critical",
        dynamic_advantage=True,
        divergence_in="reward",
    )
    card = hub.model_card(settings=settings, output_dir=tmp_path / "run", is_adapter=True, metrics={})
    assert "| β | 0.04 (adaptive, steering `js` to 0.3) |" in card
    assert "| tokens trained | `critical`, dynamic advantage |" in card
    assert "| penalty in | the loss and the reward (sequence-level gradient) |" in card


def test_the_usage_snippet_samples_with_the_runs_settings(trained, tmp_path):
    settings = dataclasses.replace(
        RunSettings.load(trained.args.output_dir), sampling=SamplingConfig(cfg_scale=3.0, top_k=16)
    )
    card = hub.model_card(settings=settings, output_dir=tmp_path / "run", is_adapter=True, metrics={})
    assert "SamplingConfig(cfg_scale=3.0, top_k=16)" in card


def test_a_missing_or_non_finite_metric_never_breaks_the_card(trained, tmp_path):
    # a reward that scored nothing in a logging window is logged as None (and NaN may reach the history)
    settings = RunSettings.load(trained.args.output_dir)
    metrics = {"rewards/colour_match/mean": None, "reward": float("nan"), "divergence/js": 0.01234567}
    card = hub.model_card(settings=settings, output_dir=tmp_path / "run", is_adapter=True, metrics=metrics)
    assert "| rewards/colour_match/mean | — |" in card and "| reward | — |" in card
    assert "| divergence/js | 0.01235 |" in card


def test_usage_snippet_in_the_card_runs_on_the_available_device(trained):
    _, body = _card(Path(trained.args.output_dir))
    snippet = body.split("```python\n")[1].split("```")[0]
    assert 'device = "cuda" if torch.cuda.is_available() else "cpu"' in snippet
    assert "SamplingConfig(cfg_scale=5.0)" in snippet  # the run's guidance
    snippet = snippet.replace('"someone/tiny-janus-grpo-js"', repr(trained.args.output_dir))
    snippet = snippet.replace('"fox.png"', repr(str(Path(trained.args.output_dir) / "fox.png")))
    exec(snippet, {})
    assert (Path(trained.args.output_dir) / "fox.png").is_file()


def test_usage_snippet_of_a_full_model_loads_it_without_peft():
    snippet = hub._usage(
        "deepseek-community/Janus-Pro-7B", "me/janus-grpo", is_adapter=False, sampling=SamplingConfig(cfg_scale=3.0)
    )
    compile(snippet, "usage.py", "exec")
    assert "PeftModel" not in snippet and 'load_model("me/janus-grpo", dtype=dtype)' in snippet
    assert "torch.cuda.is_available()" in snippet and "SamplingConfig(cfg_scale=3.0)" in snippet


VENV = "/home/me/.venv/bin"


@pytest.mark.parametrize(
    ("argv", "parent_argv", "expected"),
    [
        (  # accelerate launch: the parent's command line, with the console script by name
            ["/usr/bin/python3.11", "scripts/grpo_t2i.py", "--config", "a b.yaml"],
            [f"{VENV}/python", f"{VENV}/accelerate", "launch", "--config_file", "cpu.yaml", "scripts/grpo_t2i.py",
             "--config", "a b.yaml"],
            "accelerate launch --config_file cpu.yaml scripts/grpo_t2i.py --config 'a b.yaml'",
        ),
        (
            [f"{VENV}/python", "-m", "trl_t2i.cli", "grpo"],
            [f"{VENV}/python", f"{VENV}/torchrun", "--nproc_per_node", "2", "-m", "trl_t2i.cli", "grpo"],
            "torchrun --nproc_per_node 2 -m trl_t2i.cli grpo",
        ),
        (
            ["/usr/bin/python3", "probe.py"],
            ["/usr/bin/python3", "-m", "accelerate.commands.launch", "--num_processes", "2", "probe.py"],
            "python -m accelerate.commands.launch --num_processes 2 probe.py",
        ),
        # no launcher: the run's own command line
        ([f"{VENV}/python", f"{VENV}/trl-t2i", "grpo", "--beta", "0.1"], ["-bash"], "trl-t2i grpo --beta 0.1"),
        ([f"{VENV}/python", "-m", "trl_t2i.cli", "grpo"], ["/usr/bin/make", "demo"], "python -m trl_t2i.cli grpo"),
        (["python3", "scripts/grpo_t2i.py", "--divergence", "js"], [], "python scripts/grpo_t2i.py --divergence js"),
    ],
)  # fmt: skip
def test_card_records_the_command_as_launched(argv, parent_argv, expected):
    assert hub.launch_command(argv, parent_argv) == expected


@pytest.mark.parametrize("launcher", [".venv/bin/accelerate", "../project/.venv/bin/accelerate"])
def test_a_launcher_started_by_a_relative_path_is_recorded(tmp_path, monkeypatch, launcher):
    # `make demo` runs `.venv/bin/accelerate launch ...`: the kernel passes the script's path as it was typed
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    python = str(project / ".venv" / "bin" / "python")
    parent_argv = [python, launcher, "launch", "--config_file", "cpu.yaml", "grpo_t2i.py", "--beta", "0.1"]
    expected = "accelerate launch --config_file cpu.yaml grpo_t2i.py --beta 0.1"
    assert hub.launch_command([python, "grpo_t2i.py", "--beta", "0.1"], parent_argv) == expected


def test_push_uploads_only_the_adapter_processor_card_and_grid(trained, fake_hub):
    url = trained.push_to_hub()
    assert url.startswith("https://huggingface.co/someone/tiny-janus-grpo-js")
    ((repo_id, files, _),) = fake_hub.commits
    assert repo_id == "someone/tiny-janus-grpo-js"
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", hub.SAMPLE_GRID} <= set(files)
    assert any(name.startswith(("tokenizer", "processor")) for name in files)
    assert "model.safetensors" not in files  # never the base weights
    assert all("/" not in name for name in files)  # no checkpoints, logs or sample folders


def test_failed_push_keeps_the_output_and_says_how_to_retry(trained, monkeypatch):
    _install(monkeypatch, FakeHub(fail=True))
    before = sorted(path.name for path in Path(trained.args.output_dir).iterdir())
    with pytest.raises(RuntimeError, match="local output is intact.*trl-t2i push"):
        trained.push_to_hub()
    assert sorted(path.name for path in Path(trained.args.output_dir).iterdir()) == before


def test_push_refuses_a_directory_without_weights(tmp_path, fake_hub):
    (tmp_path / "README.md").write_text("card")
    with pytest.raises(FileNotFoundError, match="No weights"):
        hub.push_output(tmp_path, "someone/empty")
    assert not fake_hub.commits


def test_card_says_the_tokens_were_weighted_by_the_sampler_correction(trained, tmp_path):
    settings = dataclasses.replace(
        RunSettings.load(trained.args.output_dir), sampler_correction=True, sampler_correction_mode="token_mask"
    )
    card = hub.model_card(settings=settings, output_dir=tmp_path / "run", is_adapter=True, metrics={})
    assert "| tokens trained | `all`, weighted by π_old/π_sampler (`token_mask`) |" in card
