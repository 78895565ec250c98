"""The README's Python example runs as printed, leaves a usable adapter and learns at its own settings."""

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
from conftest import make_dry_run
from peft import PeftModel

from trl_t2i import TINY_JANUS, load_model
from trl_t2i.cli import grpo
from trl_t2i.data import load_prompt_dataset


README = Path(__file__).parents[1] / "README.md"


def _python_example() -> str:
    text = README.read_text()
    return re.search(r"The same from Python:\n\n```python\n(.*?)```", text, re.DOTALL).group(1)


@pytest.mark.slow
def test_readme_python_example_trains_and_leaves_a_usable_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(_python_example(), str(README), "exec"), namespace)  # noqa: S102 -- the README's own code
    output_dir = tmp_path / namespace["trainer"].args.output_dir
    assert (output_dir / "adapter_model.safetensors").is_file() and (output_dir / "README.md").is_file()
    PeftModel.from_pretrained(load_model(TINY_JANUS), output_dir)  # loads as printed in the model card
    rewards = [log["reward"] for log in namespace["trainer"].state.log_history if "reward" in log]
    # measured: 0.52 at step 10, 0.70 at step 40
    assert rewards[-1] - rewards[0] > 0.1, rewards
    assert json.loads((output_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_the_tiny_models_size_agrees_across_readme_recipe_and_code():
    from trl_t2i.models import build_tiny_janus

    model, _ = build_tiny_janus()
    millions = f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"
    recipe = (README.parent / "recipes" / "tiny" / "cpu_demo.yaml").read_text()
    tiny_module = (README.parent / "trl_t2i" / "models" / "tiny.py").read_text()
    for text in (README.read_text(), recipe, tiny_module):
        assert millions in text.replace(" M-parameter", " M")


def test_the_sampler_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    example = re.search(r"Using the sampler directly:\n\n```python\n(.*?)```", README.read_text(), re.DOTALL).group(1)
    exec(compile(example, str(README), "exec"), {})  # noqa: S102 -- the README's own code
    assert (tmp_path / "red_cat.png").is_file()


def test_make_demo_runs_the_readmes_demo_command_which_trains_what_the_readme_says():
    text = README.read_text()
    command = re.search(r"`make demo` runs .*?```bash\n(.*?)```", text, re.DOTALL).group(1)
    words = shlex.split(command.replace("\\\n", " "))
    venv = Path(sys.prefix)
    printed = make_dry_run("demo")
    assert shlex.split(printed.replace("\\\n", " ")) == [f"{venv}/bin/{words[0]}", *words[1:]]
    script_args, training_args, model_args = grpo.make_parser().parse_args_and_config(
        words[words.index("scripts/grpo_t2i.py") + 1 :]
    )
    # "trains the built-in tiny Janus with GRPO + JS penalty", LoRA, where the README says the outputs go
    assert model_args.model_name_or_path == TINY_JANUS and model_args.use_peft and training_args.divergence == "js"
    assert f"`{training_args.output_dir}/samples/`" in text and script_args.reward_funcs == ["colour_match"]


def _own_prompts_section() -> str:
    return re.search(r"### Your own prompts\n(.*?)\n### ", README.read_text(), re.DOTALL).group(1)


def test_the_readme_prompt_files_load_as_its_commands_say(tmp_path, monkeypatch):
    section = _own_prompts_section()
    text_file, jsonl_file = re.findall(r"```(?:text|json)\n(.*?)```", section, re.DOTALL)
    (tmp_path / "my_prompts.txt").write_text(text_file)
    (tmp_path / "my_prompts.jsonl").write_text(jsonl_file)
    monkeypatch.chdir(tmp_path)
    commands = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1).splitlines()
    datasets = []
    for command in commands:
        assert command.startswith("trl-t2i grpo ")
        script_args, _, _ = grpo.make_parser().parse_args_and_config(shlex.split(command)[2:])
        if Path(script_args.dataset_name).is_file():  # the last one is a Hub dataset
            datasets.append(load_prompt_dataset(script_args.dataset_name, prompt_column=script_args.prompt_column))
    assert len(datasets) == 2
    for dataset in datasets:
        assert dataset["prompt"] == ["a red apple on a wooden table", "a blue bicycle leaning against a wall"]
    assert datasets[1]["colour"] == ["red", "blue"]  # for the rewards


# How to bring about each refusal the README lists: the files to write, the dataset name and the prompt column.
REFUSALS = {
    "a file that is not there": ({}, "my_prompts.txt", "prompt"),
    "a file without a caption": ({"my_prompts.txt": "\n \n"}, "my_prompts.txt", "prompt"),
    "only empty captions": (
        {"my_prompts.jsonl": '{"caption": ""}\n{"caption": " "}\n'}, "my_prompts.jsonl", "caption"
    ),
    "no such column": (
        {"my_prompts.jsonl": '{"caption": "a red cat", "colour": "red"}\n'}, "my_prompts.jsonl", "prompt"
    ),
    "a file of another type": ({"my_prompts.tsv": "prompt\na red cat\n"}, "my_prompts.tsv", "prompt"),
    "neither a prompt set nor a file, and not on the Hub": ({}, "colour_object", "prompt"),
}  # fmt: skip


def test_the_readme_lists_every_prompt_refusal_with_its_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # what `datasets` raises for a Hub dataset that cannot be reached, at once (offline, no retries)
    hub = ConnectionError("Couldn't reach 'colour_object' on the Hub (OfflineModeIsEnabled)")
    monkeypatch.setattr("trl_t2i.data.load_dataset", lambda *args, **kwargs: (_ for _ in ()).throw(hub))
    listed = dict(line[2:].split(" → ", 1) for line in _own_prompts_section().splitlines() if line.startswith("* "))
    assert sorted(listed) == sorted(REFUSALS)
    for situation, (files, name, column) in REFUSALS.items():
        for file, content in files.items():
            (tmp_path / file).write_text(content)
        with pytest.raises((ValueError, FileNotFoundError)) as refusal:
            load_prompt_dataset(name, prompt_column=column)
        expected = re.escape(listed[situation]).replace("…", ".*")
        assert re.fullmatch(expected, str(refusal.value)), situation
        for file in files:
            (tmp_path / file).unlink()
