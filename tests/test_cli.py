import importlib
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from conftest import DEMO_RECIPE, QUICK_FLAGS

from trl_t2i.cli import COMMANDS
from trl_t2i.cli import main as cli_main
from trl_t2i.cli.frontier import FrontierArguments
from trl_t2i.cli.grpo import main, make_parser
from trl_t2i.cli.parsing import RECIPES, field_names, find_recipe
from trl_t2i.config import UNSUPPORTED_SETTINGS, T2IGRPOConfig
from trl_t2i.data import PROMPT_SETS
from trl_t2i.rewards import REWARDS
from trl_t2i.trainer import T2IGRPOTrainer


ROOT = Path(__file__).parents[1]
TRAINING_RECIPES = sorted(path for path in RECIPES.rglob("*.yaml") if path.parent.name != "accelerate")
ACCELERATE_CONFIGS = sorted((RECIPES / "accelerate").glob("*.yaml"))


def _parse(*argv):
    return make_parser().parse_args_and_config(list(argv))


@pytest.mark.parametrize("recipe", TRAINING_RECIPES, ids=lambda path: str(path.relative_to(RECIPES)))
def test_every_training_recipe_parses_with_the_real_parser(recipe):
    raw = yaml.safe_load(recipe.read_text())
    assert recipe.read_text().startswith("#"), "every recipe starts with a header comment"
    # GPU recipes ask for bf16, which transformers refuses on a CPU-only machine unless use_cpu is set
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # e.g. a deprecated key (`gradient_checkpointing`)
        script_args, training_args, model_args = _parse("--config", str(recipe), "--use_cpu", "true")
    assert training_args.divergence == raw["divergence"]
    assert script_args.dataset_name in PROMPT_SETS or Path(script_args.dataset_name).exists()
    assert all(name in REWARDS for name in script_args.reward_funcs)
    assert model_args.model_name_or_path
    if model_args.load_in_4bit:
        assert model_args.use_peft


# What each accelerate config promises (its header comment), checked on the config accelerate loads.
GPU_NODE = {"num_processes": 8, "num_machines": 1, "mixed_precision": "bf16", "use_cpu": False}
ACCELERATE_PROMISES = {
    "cpu.yaml": {"distributed_type": "NO", "num_processes": 1, "mixed_precision": "no", "use_cpu": True},
    # a multi-process launch; `use_cpu: true` in the training config makes each rank a MULTI_CPU (gloo) process
    "cpu_ddp.yaml": {"distributed_type": "MULTI_GPU", "num_processes": 2, "mixed_precision": "no", "use_cpu": False},
    "single_gpu.yaml": {"distributed_type": "NO", "num_processes": 1, "mixed_precision": "bf16", "gpu_ids": "0"},
    "multi_gpu.yaml": {**GPU_NODE, "distributed_type": "MULTI_GPU", "gpu_ids": "all"},
    "deepspeed_zero2.yaml": {
        **GPU_NODE,
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {"zero_stage": 2, "zero3_init_flag": False, "offload_optimizer_device": "none"},
    },
    "deepspeed_zero3.yaml": {
        **GPU_NODE,
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {"zero_stage": 3, "zero3_init_flag": True, "zero3_save_16bit_model": True},
    },
    "fsdp.yaml": {
        **GPU_NODE,
        "distributed_type": "FSDP",
        "fsdp_config": {
            "fsdp_version": 1,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",  # Janus' decoder layer (see below)
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_reshard_after_forward": "FULL_SHARD",
        },
    },
}


def test_every_accelerate_config_has_its_promises_checked():
    assert sorted(path.name for path in ACCELERATE_CONFIGS) == sorted(ACCELERATE_PROMISES)


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda path: path.name)
def test_every_accelerate_config_loads_with_what_it_promises(config):
    loaded = load_config_from_file(str(config))
    for key, expected in ACCELERATE_PROMISES[config.name].items():
        value = getattr(loaded, key)
        if isinstance(expected, dict):  # deepspeed_config, fsdp_config: the settings that make the promise
            assert {name: value.get(name) for name in expected} == expected, key
        else:
            assert value == expected, key


def test_fsdp_wraps_a_layer_class_of_janus(tiny_janus):
    model, _, _ = tiny_janus
    wrapped = ACCELERATE_PROMISES["fsdp.yaml"]["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]
    assert wrapped in {type(module).__name__ for module in model.modules()}


def _help_sections(parser) -> dict[str, list[str]]:
    """The options that `--help` shows, by section title, in order."""
    sections, title = {}, None
    for line in parser.format_help().splitlines():
        if re.fullmatch(r"\S.*:", line):
            title = line[:-1]
            sections[title] = []
        elif title and (option := re.match(r"  (--\w+)", line)):
            sections[title].append(option.group(1))
    return sections


def _documented_parameters(config_class) -> list[str]:
    """The parameters a config's docstring documents, in its order ("a, b (`type`, ...)" and "a (...) and b (...)")."""
    names = []
    for line in config_class.__doc__.split("Parameters:")[1].splitlines():
        if re.match(r" {8}[a-z]", line):
            names += [name for group in re.findall(r"((?:[a-z_]+, )*[a-z_]+) \(`", line) for name in group.split(", ")]
    return names


def test_grpo_help_lists_trl_t2i_options_in_the_order_of_the_config_docstring():
    documented = _documented_parameters(T2IGRPOConfig)
    shown = [
        option[2:] for option in _help_sections(make_parser())["trl_t2i options"] if not option.startswith("--no_")
    ]
    assert [name for name in shown if name in documented] == documented
    # every other own field is one whose default differs from GRPOConfig's (the docstring's preamble names them)
    assert {name for name in shown if name not in documented} == {"beta", "disable_dropout", "gradient_checkpointing",
                                                                    "max_completion_length"}  # fmt: skip


def test_grpo_help_shows_trl_t2i_options_first_and_hides_rejected_settings():
    sections = _help_sections(make_parser())
    assert list(sections) == [
        "options",
        "trl_t2i options",
        "script options",
        "TRL/transformers training options",
        "model options (TRL's ModelConfig)",
    ]
    assert "--config" in sections["options"]
    own = [f"--{name}" for name in field_names(T2IGRPOConfig, own=True)]
    assert [option for option in sections["trl_t2i options"] if not option.startswith("--no_")] == own
    assert {"--divergence", "--cfg_scale", "--image_log_count", "--beta"} <= set(own)
    assert (
        "--reward_funcs" in sections["script options"] and "--lora_r" in sections["model options (TRL's ModelConfig)"]
    )
    shown = {option for options in sections.values() for option in options}
    assert "--learning_rate" in shown
    assert not shown & {f"--{name}" for name, _, _ in UNSUPPORTED_SETTINGS}


@pytest.mark.parametrize(
    ("flags", "message"), [(["--use_vllm", "true"], "vLLM"), (["--pad_to_multiple_of", "8"], "pad")]
)
def test_hidden_settings_still_parse_and_are_rejected_by_the_config(flags, message):
    with pytest.raises(ValueError, match=message):
        _parse("--config", str(DEMO_RECIPE), *flags)


@pytest.mark.parametrize(
    "config_flag",
    [
        ["--config", "recipes/tiny/cpu_demo.yaml"],
        ["--config=recipes/tiny/cpu_demo.yaml"],
        ["--config", "tiny/cpu_demo.yaml"],  # the name under `recipes/`, as `trl-t2i plan` users type it
        ["--config", "tiny/cpu_demo"],
    ],
)
def test_recipe_paths_resolve_to_the_packaged_recipes_from_any_directory(tmp_path, monkeypatch, config_flag):
    monkeypatch.chdir(tmp_path)  # no `recipes/` here: an installed user's working directory
    _, training_args, model_args = _parse(*config_flag, "--max_steps", "0", "--output_dir", "out")
    assert training_args.divergence == "js" and model_args.model_name_or_path == "tiny:janus"
    assert find_recipe(FrontierArguments().recipe) == RECIPES / "tiny" / "frontier.yaml"
    with pytest.raises(FileNotFoundError, match="recipes/no_such.yaml.*recipes/tiny/cpu_demo.yaml"):
        _parse("--config", "recipes/no_such.yaml")


# A key each command's `--config` may set, and the value the test recipe gives it (grpo and plan are tested with
# real packaged recipes).
COMMAND_RECIPES = {
    "sample": {"num_images_per_prompt": 3},
    "evaluate": {"num_images_per_prompt": 3},
    "frontier": {"max_steps": 7},
    "push": {"output_dir": "run", "hub_model_id": "me/run"},
    "convert_llamagen": {"gpt_checkpoint": "gpt.pt", "vq_checkpoint": "vq.pt", "output_dir": "converted"},
    "serve_reward": {"reward": "pickscore", "port": 8001},
}


@pytest.mark.parametrize("command", sorted(COMMAND_RECIPES))
def test_every_command_resolves_packaged_recipes_from_any_directory(tmp_path, monkeypatch, command):
    assert set(COMMAND_RECIPES) | {"grpo", "plan"} == set(COMMANDS)  # a new command gets a case here
    packaged = tmp_path / "package_recipes"
    (packaged / "mine").mkdir(parents=True)
    (packaged / "mine" / f"{command}.yaml").write_text(yaml.safe_dump(COMMAND_RECIPES[command]))
    monkeypatch.setattr("trl_t2i.cli.parsing.RECIPES", packaged)
    monkeypatch.chdir(tmp_path)  # no `recipes/` here
    module = importlib.import_module(f"trl_t2i.cli.{command}")
    (args,) = module.make_parser().parse_args_and_config(["--config", f"recipes/mine/{command}.yaml"])
    for key, value in COMMAND_RECIPES[command].items():
        assert getattr(args, key) == value


def test_plan_resolves_packaged_recipes_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no `recipes/` here
    cli_main(["plan", "--config", "recipes/janus_pro_1b/lora_single_gpu.yaml", "--gpu_memory_gb", "24"])
    out = capsys.readouterr().out
    assert out.startswith("Janus-Pro-1B, LoRA r=32 on one 24 GB GPU.")
    assert "trl-t2i grpo --config recipes/janus_pro_1b/lora_single_gpu.yaml --per_device_train_batch_size" in out


def test_the_default_device_is_the_machines_when_the_arguments_are_made_not_at_import(monkeypatch):
    from trl_t2i.cli.sample import SampleArguments
    from trl_t2i.evaluation import EvaluationSettings

    for cuda in (True, False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert SampleArguments().device == EvaluationSettings().device == ("cuda" if cuda else "cpu")
    assert EvaluationSettings(device="cuda:1").device == "cuda:1"


def test_recipes_ship_in_the_package_and_the_checkout_links_to_them():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {path for pattern in package_data["trl_t2i"] for path in (ROOT / "trl_t2i").glob(pattern)}
    assert set(RECIPES.rglob("*.yaml")) <= shipped and RECIPES / "tiny" / "cpu_demo.yaml" in shipped
    assert (ROOT / "recipes").resolve() == RECIPES  # `--config recipes/...` from a checkout, as in the README


def test_cli_flags_override_the_recipe():
    _, training_args, _ = _parse("--config", str(DEMO_RECIPE), "--divergence", "forward_kl", "--beta", "0.5")
    assert training_args.divergence == "forward_kl" and training_args.beta == 0.5


def test_unknown_yaml_key_is_an_error(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(DEMO_RECIPE.read_text() + "\ndivergance: js\n")
    with pytest.raises(ValueError, match="divergance"):
        _parse("--config", str(recipe))


def test_bad_divergence_name_is_an_error(capsys):
    with pytest.raises(SystemExit):
        _parse("--config", str(DEMO_RECIPE), "--divergence", "kl")
    assert "invalid choice: 'kl'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dataset_name", "no_such_prompts.txt"], "no_such_prompts.txt"),
        (["--prompt_column", "caption"], "'caption' not found.*columns are \\['prompt'\\]"),
        (["--reward_funcs", "pickscor"], "pickscor"),
        (["--use_peft", "false", "--load_in_4bit", "true"], "use_peft"),
        (["--reward_weights", "1.0", "2.0"], "2 entries but there are 1"),
    ],
)
def test_bad_settings_fail_before_loading_the_model(tmp_path, no_model_loading, flags, message):
    args = _parse("--config", str(DEMO_RECIPE), "--output_dir", str(tmp_path), *flags)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        main(*args)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_cli_help_lists_every_command_and_succeeds(flag, capsys):
    cli_main([flag])  # returns normally: the console script exits with 0
    out = capsys.readouterr().out
    for name, help in COMMANDS.items():
        assert re.search(rf"^  {name} +{re.escape(help)}$", out, re.MULTILINE), name


@pytest.mark.parametrize(("argv", "problem"), [(["trian"], "Unknown command 'trian'"), ([], "No command given")])
def test_cli_without_a_valid_command_fails_with_the_listing(argv, problem):
    with pytest.raises(SystemExit) as failure:
        cli_main(argv)
    message = str(failure.value.code)  # a message as exit code: printed to stderr, exit status 1
    assert message.startswith(f"{problem}. Valid commands: {', '.join(COMMANDS)}.")
    assert all(help in message for help in COMMANDS.values())


@pytest.mark.slow
def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    common = [
        "--config",
        str(DEMO_RECIPE),
        *QUICK_FLAGS,
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--image_log_steps",
        "0",
    ]
    full = main(*_parse(*common, "--output_dir", str(tmp_path / "full")))
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= {
        path.name for path in checkpoint.iterdir()
    }
    resumed = main(
        *_parse(*common, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", str(checkpoint))
    )

    def history(trainer):
        keys = ("loss", "reward", "divergence/js", "entropy")
        return {log["step"]: [log[key] for key in keys] for log in trainer.state.log_history if "loss" in log}

    expected, got = history(full), history(resumed)
    assert sorted(got) == [1, 2, 3, 4]  # 1 and 2 come from the checkpoint's state, 3 and 4 were trained again
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-7), step


PROBE = """
import sys, torch
import trl_t2i.trainer as trainer_module
from trl_t2i.cli.grpo import main, make_parser

seen = []
generate = trainer_module.T2IGRPOTrainer._generate
def recording_generate(self, prompts):
    seen.append(list(prompts))
    return generate(self, prompts)
trainer_module.T2IGRPOTrainer._generate = recording_generate

trainer = main(*make_parser().parse_args_and_config())
accelerator = trainer.accelerator
params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
torch.save(
    {"params": params, "prompts": seen, "world": accelerator.num_processes, "type": str(accelerator.distributed_type),
     "group_left": torch.distributed.is_initialized()},
    f"{trainer.args.output_dir}/rank{accelerator.process_index}.pt",
)
"""


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["cpu_demo.yaml", "llamagen_demo.yaml"])
def test_two_process_cpu_ddp_ends_with_identical_weights(tmp_path, recipe):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    output_dir = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(RECIPES / "accelerate" / "cpu_ddp.yaml"),
        str(probe), "--config", str(RECIPES / "tiny" / recipe), *QUICK_FLAGS,
        "--max_steps", "3", "--output_dir", str(output_dir),
        "--divergence", "js", "--image_log_steps", "0", "--save_strategy", "no",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(output_dir / f"rank{rank}.pt") for rank in (0, 1)]
    assert all(rank["world"] == 2 and rank["type"] == "DistributedType.MULTI_CPU" for rank in ranks)
    assert not any(rank["group_left"] for rank in ranks)  # `main` ends the run as TRL's script does
    # each rank generated its own half of every generation batch
    for batch_0, batch_1 in zip(ranks[0]["prompts"], ranks[1]["prompts"], strict=True):
        assert len(batch_0) == len(batch_1) == 8 and batch_0 != batch_1
    params_0, params_1 = ranks[0]["params"], ranks[1]["params"]
    assert params_0.keys() == params_1.keys() and params_0
    assert all(torch.equal(params_0[name], params_1[name]) for name in params_0)
    assert any(param.abs().sum() > 0 for name, param in params_0.items() if "lora_B" in name)  # it trained


@pytest.mark.slow
def test_installed_cli_samples_images_with_a_trained_adapter(tmp_path):
    run = main(
        *_parse(
            "--config", str(DEMO_RECIPE), *QUICK_FLAGS, "--output_dir", str(tmp_path / "run"), "--save_strategy", "no"
        )
    )
    command = [
        sys.executable, "-m", "trl_t2i.cli", "sample", "--adapter", run.args.output_dir, "--prompts", "a red cat",
        "a blue car", "--num_images_per_prompt", "3", "--output_dir", str(tmp_path / "samples"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr
    written = sorted(path.name for path in (tmp_path / "samples").iterdir())
    assert written == ["0000.png", "0001.png", "0002.png", "0003.png", "0004.png", "0005.png", "grid.png"]


def test_grpo_ends_the_trainer_as_trls_script_does(tmp_path, monkeypatch):
    # trainer.end() finishes the trackers and destroys the process group (TRL's scripts/grpo.py calls it)
    ended, end = [], T2IGRPOTrainer.end
    monkeypatch.setattr(T2IGRPOTrainer, "end", lambda trainer: ended.append(trainer) or end(trainer))
    trainer = main(*_parse("--config", str(DEMO_RECIPE), *QUICK_FLAGS, "--output_dir", str(tmp_path)))
    assert ended == [trainer]
