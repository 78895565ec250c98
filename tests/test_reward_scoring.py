"""A reward that starts failing mid-run: its scored fraction is logged, a warning names it, and the run stops once it
has scored nothing for `max_unscored_steps` steps."""

import logging

import pytest
from conftest import make_trainer

from trl_t2i.reward_scoring import RewardFailure
from trl_t2i.rewards import colour_match


def failing_from(step: int, partial: bool = False):
    """A reward that scores every image of the rollouts of steps before `step` (the half of them with `partial`),
    then returns None: what a reward backed by a crashed model or a dead server returns."""

    def flaky(prompts, completions, trainer_state, **kwargs):
        if trainer_state.global_step + 1 >= step:
            return [None] * len(prompts)
        return [0.5 if not partial or index % 2 else None for index in range(len(prompts))]

    return flaky


def test_a_reward_that_stops_scoring_is_warned_about_then_stops_the_run(tmp_path, caplog):
    trainer = make_trainer(
        tmp_path, reward=[colour_match, failing_from(3, partial=True)], max_steps=10, max_unscored_steps=3,
        save_strategy="steps", save_steps=1,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="trl_t2i"), pytest.raises(RewardFailure) as failure:
        trainer.train()
    message = str(failure.value)
    assert "'flaky' has scored no image (only None or NaN) since step 3: 3 steps" in message
    assert f"latest checkpoint is {tmp_path / 'checkpoint-4'}" in message
    assert trainer.state.global_step == 4  # steps 3 and 4 trained without it, the rollout of step 5 stopped the run
    warnings = [record.getMessage() for record in caplog.records if "'flaky' scored none" in record.getMessage()]
    assert len(warnings) == 1 and "of step 3" in warnings[0]  # once, when it stopped scoring
    scored = [(log["rewards/flaky/scored"], log["rewards/colour_match/scored"]) for log in trainer.state.log_history]
    assert scored == [(0.5, 1.0), (0.5, 1.0), (0.0, 1.0), (0.0, 1.0)]


def test_a_reward_that_recovers_in_time_does_not_stop_the_run(tmp_path):
    calls = []

    def outage(prompts, completions, **kwargs):  # scores nothing in the rollouts of steps 2 and 3 only
        calls.append(None)
        return [None if len(calls) in (2, 3) else 0.5 for _ in prompts]

    trainer = make_trainer(tmp_path, reward=[colour_match, outage], max_steps=5, max_unscored_steps=3)
    trainer.train()
    assert [log["rewards/outage/scored"] for log in trainer.state.log_history if "loss" in log] == [1, 0, 0, 1, 1]


def test_max_unscored_steps_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="`max_unscored_steps` must be >= 1, got 0"):
        make_trainer(tmp_path, max_unscored_steps=0)
