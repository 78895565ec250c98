"""Watched rewards and diversity at evaluation, and the over-optimisation alarm: its rule on made-up histories, and
real tiny runs where a hacked reward raises it and a policy that does not move does not."""

import logging
import math

import numpy as np
import pytest
from conftest import TRAINING_PROMPTS, make_config, train_tiny_recipe
from datasets import Dataset
from peft import LoraConfig

from trl_t2i import TINY_JANUS, T2IGRPOTrainer
from trl_t2i.evaluation import frontier_axes
from trl_t2i.overoptimization import (
    DIVERSITY,
    DIVERSITY_METRIC,
    TRAINED,
    Evaluation,
    check_window,
    fitted_change,
)
from trl_t2i.rewards import colour_match, jpeg_compressibility, jpeg_incompressibility


HELD_OUT = ["a red car", "a blue bird", "a green hat", "a yellow ball", "a pink cat", "a white dog", "an orange fox"]


def history(*rows, std=1.0, count=64):
    """Evaluations at steps 0, 10, 20, ...: each row maps metric names to means, with the same std and count."""
    return [
        Evaluation(10 * index, dict(row), dict.fromkeys(row, std), dict.fromkeys(row, count))
        for index, row in enumerate(rows)
    ]


ROWS = [
    {TRAINED: 0.0, "ocr": 0.0, DIVERSITY: 0.50},
    {TRAINED: 0.4, "ocr": -0.3, DIVERSITY: 0.50},
    {TRAINED: 0.9, "ocr": -0.8, DIVERSITY: 0.49},
]
RISING_WHILE_FALLING = history(*ROWS)


def test_fitted_change_is_the_least_squares_slope_times_the_span():
    steps, values = [0, 10, 30, 35], [1.0, 3.0, 2.0, 6.0]
    change, weights = fitted_change(steps, values)
    assert change == pytest.approx(np.polyfit(steps, values, 1)[0] * 35)
    assert weights @ np.array(values) == pytest.approx(change)


def test_the_alarm_rises_when_the_trained_reward_rises_while_a_watched_metric_falls():
    alarm, changes = check_window(RISING_WHILE_FALLING, window=3, threshold=0.5)
    assert alarm
    assert changes[TRAINED] == pytest.approx(0.9) and changes["ocr"] == pytest.approx(-0.8)
    assert changes[DIVERSITY] == pytest.approx(-0.01)


@pytest.mark.parametrize(
    ("evaluations", "window", "threshold"),
    [
        (RISING_WHILE_FALLING, 3, 0.9),  # the fall (0.8 std) is below the threshold
        (RISING_WHILE_FALLING[:2], 3, 0.5),  # fewer evaluations than the window
        (RISING_WHILE_FALLING, 0, 0.5),  # the alarm is off
        (history(*({**row, TRAINED: -row[TRAINED]} for row in ROWS)), 3, 0.5),
        (history(*ROWS, count=4), 3, 0.5),  # 4 images per evaluation: a fall within the noise
    ],
    ids=["small fall", "too few evaluations", "off", "trained reward falls too", "noise"],
)
def test_no_alarm(evaluations, window, threshold):
    assert not check_window(evaluations, window, threshold)[0]


def test_the_window_is_the_last_evaluations():
    hacked_then_flat = history(*ROWS, *[{TRAINED: 0.9, "ocr": -0.8, DIVERSITY: 0.49}] * 2)
    assert check_window(hacked_then_flat, window=5, threshold=0.5)[0]
    assert not check_window(hacked_then_flat, window=3, threshold=0.5)[0]  # the last three: nothing moves


def test_metrics_without_spread_are_ignored():
    flat = history({TRAINED: 0.0, "ocr": 0.0}, {TRAINED: 1.0, "ocr": -1.0}, {TRAINED: 2.0, "ocr": -2.0}, std=0.0)
    assert check_window(flat, window=3, threshold=0.5) == (False, {})


def alarm_run(tmp_path, reward, learning_rate):
    """8 LoRA steps at β = 0, evaluated on held-out captions at the start and every 2 steps, `colour_match`
    watched; returns the evaluation logs."""
    trainer = T2IGRPOTrainer(
        model=TINY_JANUS,
        reward_funcs=reward,
        args=make_config(
            tmp_path,
            max_steps=8,
            learning_rate=learning_rate,
            beta=0.0,
            eval_strategy="steps",
            eval_steps=2,
            eval_on_start=True,
            per_device_eval_batch_size=16,
        ),
        train_dataset=Dataset.from_dict({"prompt": TRAINING_PROMPTS}),
        eval_dataset=Dataset.from_dict({"prompt": HELD_OUT + ["a purple cup"]}),
        peft_config=LoraConfig(r=4, lora_alpha=8),
        eval_reward_funcs=[colour_match],
    )
    trainer.train()
    return [log for log in trainer.state.log_history if "eval_reward" in log]


def test_a_hacked_reward_raises_the_alarm_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_t2i.overoptimization"):
        evaluations = alarm_run(tmp_path, jpeg_compressibility, learning_rate=1e-2)
    assert [log["step"] for log in evaluations] == [0, 2, 4, 6, 8]
    for log in evaluations:  # the watched reward and the diversity, at every evaluation
        assert 0 < log["eval_rewards/colour_match/mean"] < 1 and 0 <= log[f"eval_{DIVERSITY_METRIC}"] <= 1
    alarms = [log["eval_overoptimization/alarm"] for log in evaluations]
    # measured: the images flatten, the diversity falls by 4.4 std over steps 2-6 while the compressibility rises
    assert alarms[:2] == [0.0, 0.0] and 1.0 in alarms
    first = evaluations[alarms.index(1.0)]
    assert first["eval_overoptimization/reward_change"] > 0
    assert min(first[f"eval_overoptimization/{name}_change"] for name in ("colour_match", DIVERSITY)) < -0.5
    assert f"Over-optimisation alarm at step {first['step']}" in caplog.text


def test_a_policy_that_does_not_move_raises_no_alarm(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_t2i.overoptimization"):
        evaluations = alarm_run(tmp_path, jpeg_compressibility, learning_rate=0.0)
    changes = [value for log in evaluations for key, value in log.items() if key.endswith("_change")]
    assert len(changes) == 9 and all(math.isfinite(value) for value in changes)  # three windows, three metrics
    assert [log["eval_overoptimization/alarm"] for log in evaluations] == [0.0] * 5
    assert "Over-optimisation alarm" not in caplog.text


def test_grpo_cli_evaluates_held_out_prompts_with_watched_rewards(tmp_path):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a pink ball\na white house\n")
    trainer = train_tiny_recipe(
        tmp_path / "run",
        *["--eval_strategy", "steps", "--eval_steps", "2", "--per_device_eval_batch_size", "8"],
        *["--eval_dataset_name", str(held_out), "--eval_reward_funcs", "jpeg_incompressibility"],
    )
    assert trainer.eval_dataset["prompt"] == ["a pink ball", "a white house"]
    (evaluation,) = [log for log in trainer.state.log_history if "eval_reward" in log]
    assert evaluation["eval_rewards/jpeg_incompressibility/mean"] > 0  # watched
    assert "eval_overoptimization/alarm" in evaluation
    assert "rewards/jpeg_incompressibility/mean" not in trainer.state.log_history[0]  # not trained on


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"eval_reward_funcs": [jpeg_incompressibility]}, "scored at evaluation, which is off"),
        (
            {"eval_reward_funcs": [colour_match], "eval_strategy": "steps", "eval_steps": 1},
            r"\['colour_match'\] are both trained on and watched",
        ),
        ({"overoptimization_window": 1}, "must be 0 \\(no alarm\\) or at least 2"),
        ({"overoptimization_threshold": 0.0}, "`overoptimization_threshold` > 0"),
    ],
)
def test_bad_alarm_settings_are_clear_errors(tmp_path, no_model_loading, overrides, message):
    overrides = dict(overrides)
    eval_reward_funcs = overrides.pop("eval_reward_funcs", None)
    with pytest.raises(ValueError, match=message):
        T2IGRPOTrainer(
            TINY_JANUS,
            colour_match,
            args=make_config(tmp_path, **overrides),
            train_dataset=Dataset.from_dict({"prompt": TRAINING_PROMPTS}),
            eval_reward_funcs=eval_reward_funcs,
        )


def test_the_frontier_can_show_a_held_out_reward():
    assert frontier_axes("ocr", "vendi", ["colour_match", "ocr"]) == ("ocr_mean", "vendi")
    assert frontier_axes(None, "vendi", ["colour_match", "ocr"]) == ("colour_match_mean", "vendi")
    with pytest.raises(ValueError, match="Unknown frontier_x column 'pickscore'.*colour_match_mean, .*ocr_mean"):
        frontier_axes("pickscore", "vendi", ["colour_match", "ocr"])
