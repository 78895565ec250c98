import csv
import dataclasses
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import QUICK_FLAGS, prompt_length, prompt_limit, train_tiny_recipe
from peft import LoraConfig, get_peft_model
from PIL import Image

from trl_t2i import evaluation
from trl_t2i.cli import evaluate, frontier, sample
from trl_t2i.data import load_prompt_dataset
from trl_t2i.decoding import sample_image_tokens
from trl_t2i.images import to_pil
from trl_t2i.metrics import diversity_summary, pixel_features
from trl_t2i.models import (
    TINY_JANUS,
    TINY_LLAMAGEN,
    build_tiny_janus,
    get_family,
    load_family,
    load_model,
    load_processor,
)
from trl_t2i.rewards import colour_match
from trl_t2i.run_settings import RUN_SETTINGS_FILE, RunSettings
from trl_t2i.sampling import image_logp_table


# A few large steps: the trained adapter must visibly differ from the base model, in seconds.
QUICK = {"learning_rate": "1e-2", "image_log_steps": "0", "save_strategy": "no", "disable_tqdm": "true"}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A training output directory of `trl-t2i grpo`: a LoRA adapter trained for two steps with JS, β = 0.25."""
    output_dir = tmp_path_factory.mktemp("js-run")
    flags = [item for key, value in QUICK.items() for item in (f"--{key}", value)]
    train_tiny_recipe(output_dir, *flags, "--divergence", "js", "--beta", "0.25")
    return output_dir


@pytest.fixture(scope="module")
def zero_adapter(tmp_path_factory):
    """A LoRA adapter whose B matrices are zero (PEFT's default init): exactly the base model's weights.

    It adapts the query projections only, so that where it is attached over a trained adapter that was not detached,
    the trained adapter's other layers still act.
    """
    model, _ = build_tiny_janus()
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=r".*language_model\.layers\.\d+\.self_attn\.q_proj")
    )
    assert all(not param.any() for name, param in peft_model.named_parameters() if "lora_B" in name)
    assert any(param.any() for name, param in peft_model.named_parameters() if "lora_A" in name)
    output_dir = tmp_path_factory.mktemp("zero-adapter")
    peft_model.save_pretrained(output_dir)
    return output_dir


def _evaluate(output_dir, runs, **overrides) -> list[dict]:
    settings = {
        "runs": [str(run) for run in runs],
        "num_prompts": 3,
        "num_images_per_prompt": 3,
        "grid_prompts": 3,
        "device": "cpu",
        "output_dir": str(output_dir),
    }
    return evaluate.main(evaluate.EvaluateArguments(**{**settings, **overrides}))


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _floats(rows, column) -> np.ndarray:
    return np.array([float(row[column]) for row in rows])


def test_evaluation_writes_consistent_tables_grids_and_frontier(tmp_path, trained_run):
    _evaluate(tmp_path, [f"js={trained_run}"])
    reward, k, num_prompts, labels = "colour_match", 3, 3, ["base", "js"]
    metrics = [f"{reward}_mean", f"{reward}_std", *evaluation.DIVERSITY_METRICS]

    per_image = _read_csv(tmp_path / "per_image.csv")
    assert list(per_image[0]) == ["run", "prompt_index", "prompt", "image_index", reward]
    assert len(per_image) == len(labels) * num_prompts * k
    per_prompt = _read_csv(tmp_path / "per_prompt.csv")
    assert list(per_prompt[0]) == ["run", "prompt_index", "prompt", *metrics]
    assert len(per_prompt) == len(labels) * num_prompts
    assert [row["prompt"] for row in per_prompt[:num_prompts]] == load_prompt_dataset("colour_objects")["prompt"][:3]
    summary = _read_csv(tmp_path / "summary.csv")
    assert [row["run"] for row in summary] == labels
    assert {*metrics, *(f"{metric}_sem" for metric in metrics), "divergence", "beta"} <= set(summary[0])
    assert json.loads((tmp_path / "summary.json").read_text())["runs"][1]["divergence"] == "js"

    for label, row in zip(labels, summary, strict=True):
        prompt_rows = [r for r in per_prompt if r["run"] == label]
        for metric in metrics:
            values = _floats(prompt_rows, metric)
            assert float(row[metric]) == pytest.approx(values.mean(), rel=1e-12)
            assert float(row[f"{metric}_sem"]) == pytest.approx(values.std(ddof=1) / math.sqrt(len(values)))
        for prompt_row in prompt_rows:
            images = [r for r in per_image if r["run"] == label and r["prompt_index"] == prompt_row["prompt_index"]]
            assert len(images) == k
            assert float(prompt_row[f"{reward}_mean"]) == pytest.approx(_floats(images, reward).mean(), rel=1e-12)
            assert float(prompt_row[f"{reward}_std"]) == pytest.approx(_floats(images, reward).std(ddof=1))
    # Not vacuous: the two steps at a large learning rate changed the images.
    assert not np.array_equal(
        _floats(per_image[: num_prompts * k], reward), _floats(per_image[num_prompts * k :], reward)
    )

    for name in ("grid_base.png", "grid_js.png", "frontier.png"):
        with Image.open(tmp_path / name) as image:
            image.verify()
            assert image.format == "PNG"
    with Image.open(tmp_path / "grid_base.png") as grid:
        assert grid.width == k * 128 and grid.height >= num_prompts * 128  # one row of k images per prompt


GENEVAL_LINES = [  # GenEval's metadata format (`prompts/evaluation_metadata.jsonl`), prompts written for this test
    {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a photo of a red cat"},
    {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
     "prompt": "a photo of two dogs"},
    {"tag": "position", "include": [{"class": "car", "count": 1}, {"class": "tree", "count": 1, "position":
     ["left of", 0]}], "prompt": "a photo of a tree left of a blue car"},
]  # fmt: skip


def read_like_geneval(folder) -> list[tuple[dict, Image.Image]]:
    """What GenEval's `evaluation/evaluate_images.py <folder>` scores, by its own rules: in every sub-folder named with
    digits only, `metadata.jsonl` read with `json.load` and every `samples/<digits>.png` (here in name order)."""
    found = []
    for subfolder in sorted(os.listdir(folder)):
        path = folder / subfolder
        if not path.is_dir() or not subfolder.isdigit():
            continue
        with open(path / "metadata.jsonl") as file:
            metadata = json.load(file)
        for name in sorted(os.listdir(path / "samples")):
            if (path / "samples" / name).is_file() and re.match(r"\d+\.png", name):
                found.append((metadata, Image.open(path / "samples" / name).convert("RGB")))
    return found


def test_geneval_metadata_gives_the_prompts_and_the_layout_its_scorer_reads(tmp_path, trained_run):
    metadata_file = tmp_path / "evaluation_metadata.jsonl"
    metadata_file.write_text("\n".join(json.dumps(line) for line in GENEVAL_LINES) + "\n\n")
    summary = evaluate.main(
        evaluate.EvaluateArguments(
            runs=[f"js={trained_run}"], geneval_metadata=str(metadata_file), save_images=True, device="cpu",
            grid_prompts=0, output_dir=str(tmp_path / "out"),
        )
    )  # fmt: skip
    k = 4  # GenEval's images per prompt, the default with `geneval_metadata`
    per_image = _read_csv(tmp_path / "out" / "per_image.csv")
    assert [row["num_prompts"] for row in summary] == [len(GENEVAL_LINES)] * 2
    for run in ("base", "js"):
        found = read_like_geneval(tmp_path / "out" / "geneval" / run)
        assert [metadata for metadata, _ in found] == [line for line in GENEVAL_LINES for _ in range(k)]
        scored = [row for row in per_image if row["run"] == run]  # in prompt order, then image order
        assert [row["prompt"] for row in scored] == [metadata["prompt"] for metadata, _ in found]
        # the very images that were scored (colour_match reads their pixels)
        rescored = [colour_match([metadata["prompt"]], [image])[0] for metadata, image in found]
        assert rescored == [float(row["colour_match"]) if row["colour_match"] else None for row in scored]
        assert sum(value is not None for value in rescored) == 2 * k  # two of the three prompts name a colour

        plain = tmp_path / "out" / "images" / run
        index = [json.loads(line) for line in (plain / "prompts.jsonl").read_text().splitlines()]
        assert [(row["prompt_index"], row["image_index"]) for row in index] == [
            (i, j) for i in range(3) for j in range(k)
        ]
        for row, (metadata, image) in zip(index, found, strict=True):
            assert (
                row["prompt"] == metadata["prompt"]
                and row["file"] == f"{row['prompt_index']:05d}_{row['image_index']:02d}.png"
            )
            assert np.array_equal(np.asarray(Image.open(plain / row["file"]).convert("RGB")), np.asarray(image))


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"tag": "colors", "include": []}'], "Line 1 of .* is not a GenEval metadata object with a `prompt`"),
        (['{"prompt": "a cat"}', "not json"], "Line 2 of"),
        ([], "holds no prompts"),
    ],
)
def test_bad_geneval_metadata_is_an_error_before_loading_the_model(tmp_path, no_model_loading, lines, message):
    metadata_file = tmp_path / "evaluation_metadata.jsonl"
    metadata_file.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=message):
        _evaluate(tmp_path, [], geneval_metadata=str(metadata_file))


def test_geneval_metadata_and_prompts_exclude_each_other(tmp_path):
    with pytest.raises(ValueError, match="`prompts` or `geneval_metadata`"):
        evaluate.EvaluateArguments(prompts=["a cat"], geneval_metadata=str(tmp_path / "m.jsonl"))
    with pytest.raises(FileNotFoundError, match="GenEval metadata '.*nothing.jsonl' does not exist"):
        _evaluate(tmp_path, [], geneval_metadata=str(tmp_path / "nothing.jsonl"))


def test_same_seed_same_images_and_runs_differ_only_by_weights(tmp_path, trained_run, zero_adapter):
    full_copy = tmp_path / "full-copy"  # a full model directory holding the base weights
    model, processor = build_tiny_janus()
    model.save_pretrained(full_copy)
    processor.save_pretrained(full_copy)
    # The trained run goes first, so the zero adapter also checks that detaching it restored the base model.
    _evaluate(tmp_path / "first", [f"trained={trained_run}", f"zero={zero_adapter}", f"full={full_copy}"])
    _evaluate(tmp_path / "second", [])

    def pixels(name):
        return np.asarray(Image.open(name).convert("RGB"))

    base = pixels(tmp_path / "first" / "grid_base.png")
    assert np.array_equal(base, pixels(tmp_path / "second" / "grid_base.png"))
    assert np.array_equal(base, pixels(tmp_path / "first" / "grid_zero.png"))
    assert np.array_equal(base, pixels(tmp_path / "first" / "grid_full.png"))
    assert not np.array_equal(base, pixels(tmp_path / "first" / "grid_trained.png"))

    rows = _read_csv(tmp_path / "first" / "per_prompt.csv")
    by_run = {
        label: [{k: v for k, v in r.items() if k != "run"} for r in rows if r["run"] == label]
        for label in ("base", "zero", "full")
    }
    assert by_run["zero"] == by_run["base"]  # every reward and diversity metric, to the last digit
    for column in ("colour_match_mean", *evaluation.DIVERSITY_METRICS):  # another load, same numbers
        assert _floats(by_run["full"], column) == pytest.approx(_floats(by_run["base"], column), rel=1e-6)


def test_a_compiled_evaluation_writes_the_same_rows(tmp_path, trained_run):
    _evaluate(tmp_path / "eager", [f"trained={trained_run}"])
    _evaluate(tmp_path / "compiled", [f"trained={trained_run}"], compile=True)
    eager, compiled = (_read_csv(tmp_path / name / "per_prompt.csv") for name in ("eager", "compiled"))
    assert compiled == eager and {row["run"] for row in eager} == {"base", "trained"}


def test_per_prompt_metrics_match_a_direct_computation(tmp_path):
    _evaluate(tmp_path, [], seed=7)
    row = _read_csv(tmp_path / "per_prompt.csv")[1]
    prompt, k = load_prompt_dataset("colour_objects")["prompt"][1], 3
    assert row["prompt"] == prompt

    model = load_model(TINY_JANUS).eval()
    family = get_family(model, load_processor(TINY_JANUS))
    family.patch_forward(model)
    conditioning = family.encode_prompts([prompt] * k)
    generator = evaluation.prompt_generator(7, 1, "cpu")
    with torch.no_grad():
        tokens = sample_image_tokens(family, model, conditioning, generator=generator).image_tokens
        logp_table = image_logp_table(family, model, conditioning, tokens)
    images = to_pil(family.decode(model, tokens))
    expected = diversity_summary(pixel_features(images), tokens, family.codebook_size, logp_table)
    assert float(row["colour_match_mean"]) == pytest.approx(np.mean(colour_match([prompt] * k, images)))
    for name, value in expected.items():
        assert float(row[name]) == pytest.approx(value, rel=1e-5), name


def test_labels_come_from_the_run_settings_not_the_pickled_training_args(tmp_path, trained_run, zero_adapter):
    run_dir = shutil.copytree(trained_run, tmp_path / trained_run.name)
    (run_dir / "training_args.bin").unlink()  # never read: the run's settings are plain JSON
    run = evaluation.read_run(str(run_dir))
    assert (run.label, run.kind, run.settings.divergence, run.settings.beta) == (run_dir.name, "peft", "js", 0.25)
    assert run.settings.beta_schedule == "constant" and run.settings.divergence_estimator == "exact"
    assert evaluation.read_run(f"mine={run_dir}").label == "mine"
    row = {"run": "mine", "path": str(run_dir), "divergence": "js", "beta": 0.25, "beta_schedule": "constant"}
    assert evaluation.point_label(row) == "js β=0.25"
    assert evaluation.point_label({**row, "beta": 0.0}) == "β=0"
    assert evaluation.point_label({"run": "base", "path": "", "divergence": None, "beta": None}) == "base"

    plain = evaluation.read_run(str(zero_adapter))  # an adapter saved without training: no run_settings.json
    assert (plain.label, plain.settings) == (zero_adapter.name, None)
    assert evaluation.point_label(
        {"run": plain.label, "path": str(zero_adapter), "divergence": None, "beta": None}
    ) == (zero_adapter.name)


def test_malformed_run_settings_name_the_file(tmp_path, trained_run):
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    (run_dir / RUN_SETTINGS_FILE).write_text("{")
    with pytest.raises(ValueError, match=f"{run_dir / RUN_SETTINGS_FILE} is not a valid run settings file"):
        evaluation.read_run(str(run_dir))


def test_runs_trained_with_another_sampling_distribution_are_flagged(tmp_path, trained_run, no_model_loading):
    with pytest.warns(
        UserWarning, match="trained with SamplingConfig\\(cfg_scale=5.0.*evaluated with .*cfg_scale=2.0"
    ):
        with pytest.raises(AssertionError, match="a model was loaded"):
            _evaluate(tmp_path, [trained_run], cfg_scale=2.0)


@pytest.mark.slow
def test_frontier_sweep_trains_evaluates_and_skips_finished_runs(tmp_path, monkeypatch):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a pink ball\na white house\na grey cup\n")
    args = frontier.FrontierArguments(
        divergences=["reverse_kl", "js"],
        betas=[0.5],
        max_steps=2,
        training_overrides=[
            # the quick flags but the first, --max_steps, which the sweep sets
            f"{flag[2:]}={value}"
            for flag, value in zip(QUICK_FLAGS[2::2], QUICK_FLAGS[3::2], strict=True)
        ]
        + [f"{key}={value}" for key, value in QUICK.items()]
        + ["compile_rollouts=true"]  # and `compile` below: the compiled decode through the whole sweep
        # a watched reward on held-out prompts, which the frontier shows on its x axis
        + ["eval_reward_funcs=jpeg_incompressibility", f"eval_dataset_name={held_out}"]
        + ["eval_strategy=steps", "eval_steps=2", "per_device_eval_batch_size=8"],
        num_prompts=2,
        num_images_per_prompt=2,
        frontier_x="jpeg_incompressibility",
        device="cpu",
        output_dir=str(tmp_path),
        compile=True,
    )
    frontier.main(args)
    runs = sorted(path.name for path in (tmp_path / "runs").iterdir())
    assert runs == ["js-beta2", "reverse_kl-beta0.5"]  # JS's β is scaled by 1/f''(1) = 4
    summary = _read_csv(tmp_path / "eval" / "summary.csv")
    assert sorted((row["run"], row["divergence"], row["beta"]) for row in summary) == [
        (
            "base",
            "",
            "",
        ),
        ("js-beta2", "js", "2.0"),
        ("reverse_kl-beta0.5", "reverse_kl", "0.5"),
    ]
    assert (tmp_path / "eval" / "frontier.png").stat().st_size > 0
    settings = json.loads((tmp_path / "eval" / "summary.json").read_text())["settings"]
    assert settings["rewards"] == ["colour_match", "jpeg_incompressibility"]  # trained, then watched
    assert (
        settings["prompts"] == ["a pink ball", "a white house"] and settings["frontier_x"] == "jpeg_incompressibility"
    )
    assert all(float(row["jpeg_incompressibility_mean"]) > 0 for row in summary)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(frontier.grpo, "main", refuse)
    for run_dir in (tmp_path / "runs").iterdir():
        (run_dir / "training_args.bin").unlink()  # finished runs are recognised and compared by run_settings.json
    js_run = tmp_path / "runs" / "js-beta2"
    dataclasses.replace(RunSettings.load(js_run), learning_rate=0.5).save(js_run)
    with pytest.warns(
        UserWarning, match="Skipping .*js-beta2, which was trained with learning_rate=0.5 \\(now 0.01\\)"
    ):
        summary = frontier.main(args)
    assert len(summary) == 3


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"runs": ["/no/such/run"]}, FileNotFoundError, "'/no/such/run' is not a directory"),
        ({"runs": ["js=/no/such/run"]}, FileNotFoundError, "'/no/such/run' is not a directory"),
        ({"reward_funcs": ["colour_matc"]}, ValueError, "Unknown reward 'colour_matc'.*colour_match"),
        ({"num_images_per_prompt": 1}, ValueError, "num_images_per_prompt must be >= 2.*got 1"),
        ({"frontier_y": "diversity"}, ValueError, "Unknown frontier_y column 'diversity'.*pairwise_distance, vendi"),
        ({"skip_base": True}, ValueError, "Nothing to evaluate"),
    ],
)
def test_bad_input_fails_clearly_before_loading_the_model(tmp_path, no_model_loading, overrides, error, message):
    with pytest.raises(error, match=message):
        overrides = dict(overrides)
        _evaluate(tmp_path, overrides.pop("runs", []), **overrides)


def test_run_directory_without_a_model_and_clashing_labels_are_errors(tmp_path, no_model_loading, zero_adapter):
    with pytest.raises(FileNotFoundError, match="neither a PEFT adapter"):
        _evaluate(tmp_path, [str(tmp_path)])
    with pytest.raises(ValueError, match="share the labels \\['a'\\]"):
        _evaluate(tmp_path, [f"a={zero_adapter}", f"a={zero_adapter}"])
    with pytest.raises(ValueError, match="'base' is reserved"):
        _evaluate(tmp_path, [f"base={zero_adapter}"])


# ------------------------------------------------------------------ what the evaluation side reads


@pytest.fixture(scope="module")
def llamagen_run(tmp_path_factory):
    """A finished LoRA run of the tiny LlamaGen."""
    output_dir = tmp_path_factory.mktemp("llamagen-run")
    flags = [item for key, value in QUICK.items() for item in (f"--{key}", value)]
    train_tiny_recipe(output_dir, *flags, "--model_name_or_path", TINY_LLAMAGEN, "--max_steps", "1")
    return output_dir


def test_an_adapter_of_another_family_is_refused_before_loading_the_model(tmp_path, llamagen_run, no_model_loading):
    message = (
        f"Run 'lg' \\({llamagen_run}\\) is an adapter of the 'llamagen' family, but the base model "
        f"'{TINY_JANUS}' is a 'janus' model: .*`--model_name_or_path {TINY_LLAMAGEN}`"
    )
    with pytest.raises(ValueError, match=message):
        _evaluate(tmp_path, [f"lg={llamagen_run}"])
    with pytest.raises(ValueError, match="is an adapter of the 'llamagen' family"):
        sample.main(sample.SampleArguments(adapter=str(llamagen_run), output_dir=str(tmp_path / "samples")))


def test_an_adapter_that_does_not_fit_the_base_model_is_named_with_its_own_base(tmp_path, zero_adapter):
    # Bare PEFT adapters (no run_settings.json, their base not a local folder): nothing says their family before PEFT
    # tries them, which said only "Target modules ... not found in the base model"
    named = shutil.copytree(zero_adapter, tmp_path / "named")
    adapter_config = json.loads((named / "adapter_config.json").read_text())
    (named / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": TINY_JANUS}))
    message = f"The adapter '{named}' does not fit the base model '{TINY_LLAMAGEN}': it was trained on '{TINY_JANUS}'"
    with pytest.raises(ValueError, match=message):
        sample.main(
            sample.SampleArguments(
                model_name_or_path=TINY_LLAMAGEN, adapter=str(named), output_dir=str(tmp_path / "samples")
            )
        )
    message = (
        f"Run 'zero' \\(the adapter '{zero_adapter}'\\) does not fit the base model '{TINY_LLAMAGEN}': load it on "
        "the base model it was trained on"
    )
    with pytest.raises(ValueError, match=message):
        _evaluate(tmp_path / "eval", [f"zero={zero_adapter}"], model_name_or_path=TINY_LLAMAGEN)


@pytest.mark.parametrize(
    ("file", "damage", "error", "message"),
    [
        ("adapter_model.safetensors", "truncate", ValueError, "{file} is damaged \\(SafetensorError"),
        ("adapter_model.safetensors", "delete", FileNotFoundError, "has adapter_config.json but no weights"),
        ("adapter_config.json", "truncate", ValueError, "{file} is damaged \\(JSONDecodeError"),
        ("run_settings.json", "delete", FileNotFoundError, "{file} is missing, which T2IGRPOTrainer writes"),
    ],
)
def test_a_damaged_or_incomplete_run_is_named_before_loading_the_model(
    tmp_path, trained_run, no_model_loading, file, damage, error, message
):
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    path = run_dir / file
    path.unlink() if damage == "delete" else path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(error, match=message.format(file=path)):
        _evaluate(tmp_path / "eval", [str(run_dir)])
    with pytest.raises(error, match=message.format(file=path)):
        sample.main(sample.SampleArguments(adapter=str(run_dir), output_dir=str(tmp_path / "samples")))


def test_an_unfinished_run_names_its_latest_checkpoint(tmp_path, no_model_loading):
    (tmp_path / "run" / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"training did not finish.*{tmp_path / 'run' / 'checkpoint-3'}"):
        _evaluate(tmp_path / "eval", [str(tmp_path / "run")])


def test_a_missing_adapter_directory_is_named_before_loading_the_model(tmp_path, no_model_loading):
    missing = str(tmp_path / "no" / "run")
    with pytest.raises(FileNotFoundError, match=f"--adapter '{missing}' is not a directory, nor a Hub id"):
        sample.main(sample.SampleArguments(adapter=missing, output_dir=str(tmp_path / "samples")))


def test_frontier_rejects_unknown_divergences_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(frontier.grpo, "main", lambda *args: pytest.fail("trained despite bad input"))
    with pytest.raises(ValueError, match="Unknown divergences \\['kl'\\].*js.*reverse_kl"):
        frontier.main(frontier.FrontierArguments(divergences=["kl", "js"], output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="not `key=value`"):
        frontier.main(frontier.FrontierArguments(training_overrides=["--learning_rate"], output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="Unknown frontier_x column 'pickscore'. Valid choices: colour_match_mean"):
        frontier.main(frontier.FrontierArguments(frontier_x="pickscore", output_dir=str(tmp_path)))


def test_frontier_checks_its_evaluation_prompts_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(frontier.grpo, "main", lambda *args: pytest.fail("trained despite bad input"))
    family = load_family(TINY_JANUS)
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(f"a pink ball\n{'red ' * prompt_limit(family)}\n")
    arguments = frontier.FrontierArguments(
        training_overrides=[f"eval_dataset_name={held_out}"], output_dir=str(tmp_path)
    )
    with pytest.raises(ValueError, match=f"'{held_out}', line 2: the caption has"):
        frontier.main(arguments)


def test_prompt_generators_depend_only_on_seed_and_prompt_index():
    def draw(seed, index):
        return torch.rand(4, generator=evaluation.prompt_generator(seed, index, "cpu"))

    assert torch.equal(draw(0, 3), draw(0, 3))
    assert not torch.equal(draw(0, 3), draw(0, 4)) and not torch.equal(draw(0, 3), draw(1, 3))


def _summary_row(run, divergence, beta, reward, diversity):
    return {
        "run": run, "path": "" if run == "base" else f"runs/{run}", "divergence": divergence, "beta": beta,
        "beta_schedule": None if run == "base" else "constant", "reward": reward, "reward_sem": 0.01,
        "diversity": diversity, "diversity_sem": 0.02 if divergence == "js" else 0.04,
    }  # fmt: skip


def test_divergences_are_compared_at_matched_rewards_along_their_curves():
    summary = [
        _summary_row("base", None, None, 0.5, 0.6),
        _summary_row("beta0", "js", 0.0, 0.9, 0.3),
        _summary_row("js-beta0.3", "js", 0.3, 0.8, 0.45),
        _summary_row("js-beta1", "js", 1.0, 0.7, 0.5),
        _summary_row("reverse_kl-beta0.1", "reverse_kl", 0.1, 0.8, 0.35),
        _summary_row("reverse_kl-beta0.3", "reverse_kl", 0.3, 0.7, 0.4),
    ]
    rows = evaluation.at_matched_rewards(summary, "reward", "diversity")
    # between the base model (0.5) and the unregularised run (0.9) both curves share
    assert [row["reward"] for row in rows] == pytest.approx([0.6, 0.7, 0.8])
    assert [row["js"] for row in rows] == pytest.approx([0.55, 0.5, 0.45])
    assert [row["reverse_kl"] for row in rows] == pytest.approx([0.5, 0.4, 0.35])
    # halfway between the base model and a run, the two errors combine; on a run, it is that run's
    assert rows[0]["js_sem"] == pytest.approx(math.hypot(0.5 * 0.04, 0.5 * 0.02))  # the base model, a JS run
    assert rows[1]["js_sem"] == pytest.approx(0.02)
    assert rows[1]["reverse_kl_sem"] == pytest.approx(0.04)


def test_a_curve_is_read_where_it_first_reaches_a_reward_coming_from_the_base_model():
    # the smallest penalty gained more reward than none at all: the curve turns back at its end
    summary = [
        _summary_row("base", None, None, 0.5, 0.6),
        _summary_row("beta0", "js", 0.0, 0.75, 0.2),
        _summary_row("js-beta0.1", "js", 0.1, 0.8, 0.3),
        _summary_row("reverse_kl-beta0.1", "reverse_kl", 0.1, 0.8, 0.3),
    ]
    (row,) = evaluation.at_matched_rewards(summary, "reward", "diversity", count=1)
    assert row["reward"] == pytest.approx(0.65)
    assert row["js"] == pytest.approx(0.6 - 0.3 * 0.15 / 0.3)  # on the way from the base model, not the way back
    assert evaluation.at_matched_rewards(summary[:3], "reward", "diversity") == []  # one divergence: nothing to match


def test_evaluate_refuses_a_caption_longer_than_the_model_takes_before_loading_it(tmp_path, no_model_loading):
    family = load_family(TINY_JANUS)
    long = "red " * prompt_limit(family)
    message = (
        f"The evaluation prompts, prompt 2: the caption has {prompt_length(family, long)} prompt tokens, more than "
        f"the {prompt_limit(family)} the model takes"
    )
    with pytest.raises(ValueError, match=message):
        _evaluate(tmp_path, [], prompts=["a red cat", long], num_prompts=None)


def test_sample_refuses_a_caption_longer_than_the_model_takes_before_loading_it(tmp_path, no_model_loading):
    family = load_family(TINY_LLAMAGEN)
    long = "red " * prompt_limit(family)
    arguments = sample.SampleArguments(
        model_name_or_path=TINY_LLAMAGEN, prompts=[long], device="cpu", output_dir=str(tmp_path)
    )
    with pytest.raises(ValueError, match=f"The prompts, prompt 1: the caption has {prompt_length(family, long)}"):
        sample.main(arguments)
