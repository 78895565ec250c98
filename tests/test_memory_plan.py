"""`trl-t2i plan` (`trl_t2i.memory_plan`): the largest batches that fit a GPU, keeping a recipe's optimizer step."""

import dataclasses
import doctest
import re
import shlex
from pathlib import Path

import pytest
import yaml

from trl_t2i import memory_plan
from trl_t2i.cli import main as cli_main
from trl_t2i.cli import plan as plan_command
from trl_t2i.cli.grpo import make_parser as grpo_parser
from trl_t2i.cli.parsing import RECIPES
from trl_t2i.memory import GB, Architecture
from trl_t2i.memory_plan import MODELS, RecipeMemory, architecture_for, candidate_batches, plan
from trl_t2i.models import build_tiny_janus


QLORA_7B = "recipes/janus_pro_7b/qlora_single_gpu.yaml"
LORA_1B = "recipes/janus_pro_1b/lora_single_gpu.yaml"


def _fits(recipe: RecipeMemory, mode: str, batch, gpu_memory_gb: float) -> bool:
    return recipe.estimate(mode, batch).peak <= gpu_memory_gb * GB


@pytest.mark.parametrize(
    "recipe_path, gpu_memory_gb",
    [(LORA_1B, 24), (LORA_1B, 48), (QLORA_7B, 24), ("recipes/janus_pro_7b/full_zero3.yaml", 80)],
)
def test_the_plan_fits_keeps_the_optimizer_step_and_nothing_larger_fits(recipe_path, gpu_memory_gb):
    recipe = plan_command.read_recipe(recipe_path)
    result = plan(recipe, gpu_memory_gb)
    assert result.estimate.peak <= gpu_memory_gb * GB
    assert result.batch.images_per_step == recipe.batch.images_per_step
    assert result.batch.gradient_accumulation_steps % result.batch.steps_per_generation == 0  # whole rollouts per step
    for batch in candidate_batches(recipe.batch):
        if batch.rollout_images > result.batch.rollout_images or (
            batch.rollout_images == result.batch.rollout_images and batch.micro_batch > result.batch.micro_batch
        ):
            assert not _fits(recipe, result.mode, batch, gpu_memory_gb), batch
        if batch.micro_batch > result.largest_micro_batch.micro_batch:
            assert not _fits(recipe, result.mode, batch, gpu_memory_gb), batch


def test_more_memory_plans_larger_batches():
    recipe = plan_command.read_recipe(LORA_1B)
    small, large = plan(recipe, 16), plan(recipe, 40)
    assert small.batch.rollout_images < large.batch.rollout_images
    assert small.largest_micro_batch.micro_batch < large.largest_micro_batch.micro_batch


def test_lora_or_qlora_only_when_the_recipes_way_does_not_fit():
    recipe = plan_command.read_recipe("recipes/janus_pro_7b/full_zero3.yaml")
    single = dataclasses.replace(  # the same full fine-tuning on one GPU, without ZeRO
        recipe,
        setup=dataclasses.replace(recipe.setup, num_processes=1, zero_stage=0),
        batch=dataclasses.replace(recipe.batch, num_processes=1),
    )
    least = {mode: plan(single, 1000).least[mode].peak / GB for mode in ("full fine-tuning", "LoRA", "QLoRA")}
    assert least["full fine-tuning"] > least["LoRA"] > least["QLoRA"]
    assert plan(single, least["full fine-tuning"] + 1).mode == "full fine-tuning"

    lora = plan(single, (least["full fine-tuning"] + least["LoRA"]) / 2)
    assert lora.mode == "LoRA"
    assert lora.flags()[-4:] == ["--use_peft", "true", "--lora_r", str(recipe.lora_r)]

    qlora = plan(single, (least["LoRA"] + least["QLoRA"]) / 2)
    assert qlora.mode == "QLoRA"
    assert qlora.flags()[-8:] == [
        "--use_peft", "true", "--lora_r", str(recipe.lora_r),
        "--load_in_4bit", "true", "--use_bnb_nested_quant", "true",
    ]  # fmt: skip
    assert qlora.estimate.peak <= qlora.gpu_memory_gb * GB


def test_nothing_fitting_says_the_least_each_way_needs():
    recipe = plan_command.read_recipe(QLORA_7B)
    least = plan(recipe, 1000).least["QLoRA"].peak / GB
    with pytest.raises(ValueError, match=rf"Nothing fits in {least - 1:g} GB per GPU.*QLoRA {least:.1f} GB"):
        plan(recipe, least - 1)


@pytest.mark.parametrize("gpu_memory_gb", [0, -24, float("nan")])
def test_a_budget_that_is_not_a_positive_number_is_an_error(gpu_memory_gb):
    with pytest.raises(ValueError, match="`gpu_memory_gb` must be a positive number"):
        plan(plan_command.read_recipe(QLORA_7B), gpu_memory_gb)


def test_the_printed_flags_give_the_trainer_the_planned_batches(capsys):
    result = plan_command.main(plan_command.PlanArguments(config=LORA_1B, gpu_memory_gb=16))
    command = capsys.readouterr().out.split("Train with:\n  ")[1].split()
    assert command[:4] == ["trl-t2i", "grpo", "--config", LORA_1B]
    _, training_args, _ = grpo_parser().parse_args_and_config([*command[2:], "--use_cpu", "true"])
    assert training_args.per_device_train_batch_size == result.batch.micro_batch
    assert training_args.generation_batch_size == result.batch.rollout_images
    assert training_args.gradient_accumulation_steps == result.batch.gradient_accumulation_steps


def test_a_global_generation_batch_is_shared_by_the_processes(tmp_path):
    recipe = yaml.safe_load((RECIPES / "janus_pro_1b" / "lora_single_gpu.yaml").read_text())
    recipe.update(per_device_train_batch_size=2, gradient_accumulation_steps=4, generation_batch_size=32)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    # TRL splits generation_batch_size among the processes: 8 images each on 4, 32 on 1
    assert plan_command.read_recipe(path, num_processes=4).setup.rollout_images == 8
    assert plan_command.read_recipe(path).setup.rollout_images == 32
    flags = plan(plan_command.read_recipe(path, num_processes=4), 80).flags()
    assert "--generation_batch_size" in flags and "--steps_per_generation" not in flags


def test_processes_and_zero_stage_come_from_the_recipes_launch_command():
    header = plan_command.read_recipe("recipes/janus_pro_7b/paper_js.yaml")  # deepspeed_zero3.yaml, 4 processes
    assert (header.batch.num_processes, header.setup.zero_stage) == (4, 3)
    given = plan_command.read_recipe("recipes/janus_pro_7b/paper_js.yaml", num_processes=2, zero_stage=2)
    assert (given.batch.num_processes, given.setup.zero_stage) == (2, 2)


@pytest.mark.parametrize(
    "flags, message",
    [({"num_processes": 0}, "`num_processes` must be at least 1, got 0"), ({"zero_stage": 1}, "must be 0, 2 or 3")],
)
def test_bad_processes_or_zero_stage_are_errors(flags, message):
    with pytest.raises(ValueError, match=message):
        plan_command.read_recipe(QLORA_7B, **flags)


def test_an_unknown_model_is_an_error_that_names_the_known_ones():
    with pytest.raises(ValueError, match="does not know 'me/my-model'.*deepseek-community/Janus-Pro-7B"):
        architecture_for("me/my-model")
    assert set(MODELS) >= {"deepseek-community/Janus-Pro-1B", "deepseek-community/Janus-Pro-7B"}


def test_a_local_model_folder_is_read_from_its_config(tmp_path):
    model, _ = build_tiny_janus(hidden_size=64, num_layers=3)
    model.config.save_pretrained(tmp_path)
    assert architecture_for(str(tmp_path)) == Architecture.from_janus_config(model.config, name=str(tmp_path))


def test_the_readme_shows_what_the_command_prints(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    command, printed = re.search(r"```bash\n(trl-t2i plan [^\n]*)\n```\n\n```\n(.*?)\n```", readme, re.DOTALL).groups()
    cli_main(shlex.split(command)[1:])
    assert capsys.readouterr().out.rstrip("\n") == printed


def test_the_modules_example_is_what_plan_gives():
    # the docstring's example had drifted from the memory model (no test ran it)
    assert doctest.testmod(memory_plan).failed == 0
