"""One contract test per assumption `trl_t2i.trl_boundary` makes about the private surface of TRL's `GRPOTrainer`
and of transformers' `Trainer`.

When an upgrade breaks one, it fails here, naming the assumption, instead of training with a silently wrong loss.
"""

from pathlib import Path

import pytest
import torch
from conftest import TRAINING_PROMPTS, first_batch, make_config, make_trainer, perturb_adapters
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from PIL import Image
from trl import GRPOTrainer
from trl.trainer import grpo_trainer

from trl_t2i import TINY_JANUS, T2IGRPOTrainer
from trl_t2i import trl_boundary as boundary
from trl_t2i.models import load_model
from trl_t2i.rewards import colour_match


def _generation_batch(trainer, prompts=TRAINING_PROMPTS[:2]):
    trainer.model.train()
    return [{"prompt": prompt} for prompt in prompts for _ in range(trainer.num_generations)]


def _spy_on_rollouts(trainer) -> list[tuple]:
    """What `trainer._generate` returns, in TRL's slots, one entry per call."""
    rollouts, generate = [], trainer._generate
    trainer._generate = lambda prompts: rollouts.append(generate(prompts)) or rollouts[-1]
    return rollouts


# ---------------------------------------------------------------------------------------------- TRL's GRPOTrainer


def test_trls_generation_batch_holds_the_rollout_as_the_named_layout_says(tmp_path):
    seen = {}

    def reward(prompts, completions, **kwargs):
        seen["completions"] = completions
        return colour_match(prompts, completions)

    # the policy moves before the batch's last update (old log-probs); a reference; a loss mask (critical tokens)
    trainer = make_trainer(tmp_path, reward=reward, num_iterations=2, beta=0.1, token_selection="critical")
    rollouts = _spy_on_rollouts(trainer)
    batch = boundary.Batch.of(trainer._generate_and_score_completions(_generation_batch(trainer)))
    prompt_ids, image_tokens, loss_mask, images, sampling_logps, *_ = rollouts[0]
    for row, ids in enumerate(prompt_ids):  # TRL left-pads the prompts
        assert batch.prompt_ids[row, -len(ids) :].tolist() == ids and batch.prompt_mask[row].sum() == len(ids)
    assert torch.equal(batch.image_tokens, torch.tensor(image_tokens)) and batch.image_mask.bool().all()
    assert torch.equal(batch.loss_mask, torch.tensor(loss_mask)) and 0 < batch.loss_mask.float().mean() < 1
    assert batch.num_items_in_batch == batch.loss_mask.sum()
    torch.testing.assert_close(batch.sampling_logps, torch.tensor(sampling_logps))
    # teacher-forced with the sampling weights, and the reference is the policy before any update
    torch.testing.assert_close(batch.old_logps, batch.sampling_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.reference_logps, batch.sampling_logps, atol=1e-5, rtol=0)
    groups = batch.advantages.view(-1, trainer.num_generations)  # one per image, normalised in its prompt's group
    assert groups.abs().sum() > 0 and torch.allclose(groups.sum(-1), torch.zeros(len(groups)), atol=1e-4)
    assert seen["completions"] is images and all(isinstance(image, Image.Image) for image in images)


def test_compute_loss_scores_the_policy_with_one_scorer_call_which_can_be_answered(tmp_path):
    trainer = make_trainer(tmp_path, beta=0.0, num_iterations=2)
    inputs = first_batch(trainer)
    perturb_adapters(trainer.model)  # policy ≠ old policy: TRL's loss depends on the log-probs' values
    trainer.current_gradient_accumulation_steps = 1
    calls, scorer = [], trainer._get_per_token_logps_and_entropies
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (
        calls.append((args, kwargs)) or scorer(*args, **kwargs)
    )
    scored = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    del trainer._get_per_token_logps_and_entropies
    ((model, input_ids, attention_mask, logits_to_keep), kwargs) = calls[0]
    assert len(calls) == 1 and kwargs["compute_entropy"] and logits_to_keep == inputs["completion_ids"].size(1)
    assert torch.equal(input_ids, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1))
    assert torch.equal(attention_mask, torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1))

    logps, entropies, _ = scorer(model, input_ids, attention_mask, logits_to_keep, compute_entropy=True)
    with boundary.policy_scores_given(trainer, logps, entropies):
        given = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    torch.testing.assert_close(given, scored)
    assert "_get_per_token_logps_and_entropies" not in vars(trainer)  # the trainer's own scorer again
    with boundary.policy_scores_given(trainer, logps + 0.1, torch.zeros_like(entropies)):
        other = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    assert (other - given).abs() > 1e-3 and trainer._metrics["train"]["entropy"][-1] == 0.0  # TRL read both


def test_compute_loss_weighs_each_token_by_per_token_advantages(tmp_path):
    trainer = make_trainer(tmp_path, beta=0.0, loss_type="bnpo")
    inputs = first_batch(trainer)
    trainer.current_gradient_accumulation_steps = 1
    advantages = inputs["advantages"]
    per_token = advantages[:, None].expand_as(inputs["completion_ids"])
    halved = per_token * (torch.arange(per_token.size(1)) % 2)  # every other token's term dropped
    loss = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    torch.testing.assert_close(
        GRPOTrainer._compute_loss(trainer, trainer.model, boundary.with_advantages(inputs, per_token)), loss
    )
    torch.testing.assert_close(
        GRPOTrainer._compute_loss(trainer, trainer.model, boundary.with_advantages(inputs, halved)), loss / 2
    )
    assert inputs["advantages"] is advantages  # the buffered batch keeps TRL's


def test_metrics_buffers_are_averaged_and_cleared_by_log(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.model.train()
    boundary.record_metric(trainer, "probe", 1.0)
    boundary.record_metric(trainer, "probe", 3.0)
    assert (
        boundary.recorded_metric(trainer, "probe") == [1.0, 3.0] and boundary.recorded_metric(trainer, "absent") == []
    )
    boundary.set_metric(trainer, "total", 5.0)
    boundary.set_metric(trainer, "total", 7.0)
    trainer.log({})
    assert trainer.state.log_history[-1]["probe"] == 2.0 and trainer.state.log_history[-1]["total"] == 7.0
    assert "probe" not in trainer._metrics["train"]


def test_calculate_rewards_gathers_every_ranks_rewards_in_rank_order_and_trl_keeps_this_ranks_rows(
    tmp_path, monkeypatch
):
    seen = []

    def reward(prompts, completions, **kwargs):
        seen.append(colour_match(prompts, completions))
        return seen[-1]

    trainer = make_trainer(tmp_path, reward=reward)
    inputs = _generation_batch(trainer)
    torch.manual_seed(0)
    alone = trainer._generate_and_score_completions(inputs)

    # As rank 1 of 2: the other rank's rewards (these, its prompt groups in reverse order) come first when gathered
    gathered = []

    def gather_two_ranks(tensor):
        other = tensor.view(-1, trainer.num_generations, tensor.size(-1)).flip(0).reshape(tensor.shape)
        gathered.append(torch.cat([other, tensor]))
        return gathered[-1]

    monkeypatch.setattr(grpo_trainer, "gather", gather_two_ranks)
    monkeypatch.setattr(type(trainer.accelerator), "process_index", property(lambda accelerator: 1))
    torch.manual_seed(0)
    as_rank_1 = trainer._generate_and_score_completions(inputs)
    assert len(gathered) == 1 and not torch.equal(gathered[0][: len(inputs)], gathered[0][len(inputs) :])
    torch.testing.assert_close(as_rank_1["advantages"], alone["advantages"])  # TRL kept this rank's rows
    torch.testing.assert_close(boundary.local_rows(trainer, gathered[0], len(inputs))[:, 0], torch.tensor(seen[-1]))


def test_logged_completions_feed_trls_table_as_images(tmp_path):
    trainer = make_trainer(tmp_path, log_completions=True)
    trainer._generate_and_score_completions(_generation_batch(trainer))
    completions = list(trainer._logs["completion"])
    assert completions and all(isinstance(image, Image.Image) for image in completions)
    boundary.completions_as_images(trainer)
    assert list(trainer._logs["completion"]) == ["<image 8x8>"] * len(completions)
    assert [images[0] for images in trainer._logs["images"]] == completions


def test_parameter_gathering_for_generation_is_a_context(tmp_path):
    trainer = make_trainer(tmp_path)
    with boundary.gathered_parameters(trainer):
        pass


@pytest.mark.parametrize("importance_sampling_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo", "cispo", "sapo", "luspo"])
def test_penalty_is_weighted_and_normalised_like_trls_k3(tmp_path, loss_type, importance_sampling_level):
    # Our reverse-KL sampled penalty is TRL's k3 term: with TRL's own k3 switched on instead, TRL's loss and gradients
    # must be ours, which holds only if `importance_ratio` and `aggregate_like_trl` reproduce TRL's.
    beta = 0.3
    trainer = make_trainer(
        tmp_path,
        beta=beta,
        divergence="reverse_kl",
        divergence_estimator="sampled",
        use_bias_correction_kl=True,
        loss_type=loss_type,
        importance_sampling_level=importance_sampling_level,
        num_iterations=2,
        gradient_accumulation_steps=2,  # exercises the accumulation part of every normaliser
    )
    perturb_adapters(trainer.model)  # policy ≠ reference, so the penalty is not zero
    inputs = first_batch(trainer)
    perturb_adapters(trainer.model, std=0.1)  # policy ≠ old policy, so the importance ratio is not one
    parameters = [p for p in trainer.model.parameters() if p.requires_grad]
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by the train loop

    ours = trainer._compute_loss(trainer.model, inputs)
    our_grads = torch.autograd.grad(ours, parameters)
    trainer.beta = beta  # TRL's own k3 path, with TRL's beta
    trls = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    trl_grads = torch.autograd.grad(trls, parameters)
    trainer.beta = 0.0  # back to ours: TRL's k3 KL off
    without_penalty = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)

    torch.testing.assert_close(ours, trls)
    assert (trls - without_penalty).abs() > 1e-3  # the penalty is really part of what was compared
    for ours_grad, trl_grad in zip(our_grads, trl_grads, strict=True):
        torch.testing.assert_close(ours_grad, trl_grad, rtol=1e-4, atol=1e-5)  # luspo sums: float32 round-off


def test_trls_own_kl_and_reference_pass_stay_off(tmp_path):
    forwards = []
    trainer = make_trainer(tmp_path, divergence_estimator="exact", beta=0.1)
    reference_table = trainer._reference_logp_table
    trainer._reference_logp_table = lambda *args: forwards.append(1) or reference_table(*args)
    assert trainer.beta == 0.0
    batch = first_batch(trainer)
    assert "ref_per_token_logps" not in batch and not forwards  # the exact estimator recomputes the tables instead
    trainer.args.divergence_estimator = "sampled"
    batch = first_batch(trainer)
    assert batch["ref_per_token_logps"].shape == batch["completion_ids"].shape and forwards


def test_a_model_with_a_trained_adapter_keeps_it_as_the_reference_even_at_beta_zero(tmp_path):
    # TRL copies a pre-existing adapter as the frozen "ref" adapter only when it sees beta != 0 (`init_settings`).
    model = get_peft_model(load_model(TINY_JANUS), LoraConfig(r=4, target_modules=r".*language_model.*\.q_proj"))
    perturb_adapters(model)
    trainer = T2IGRPOTrainer(
        model=model,
        reward_funcs=colour_match,
        args=make_config(tmp_path, beta=0.0),
        train_dataset=Dataset.from_dict({"prompt": TRAINING_PROMPTS}),
    )
    assert boundary.reference_adapter_name(trainer.model) == "ref" and trainer.args.beta == 0.0
    batch = first_batch(trainer)
    with torch.no_grad():
        policy = trainer._teacher_forced_logits(
            trainer.model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"]
        ).log_softmax(-1)
    torch.testing.assert_close(
        batch["ref_per_token_logps"], policy.gather(-1, batch["completion_ids"][..., None])[..., 0]
    )


def test_max_completion_length_comes_from_the_model(tmp_path):
    assert make_trainer(tmp_path).args.max_completion_length == 16  # the tiny Janus: 4 × 4 image tokens
    with pytest.raises(ValueError, match="`max_completion_length=512` does not match.*16 tokens"):
        make_trainer(tmp_path, max_completion_length=512)


# ---------------------------------------------------------------------------------------------- transformers' Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trainer after one optimizer step: it has the state and optimizer a checkpoint saves."""
    trainer = make_trainer(tmp_path_factory.mktemp("run"), max_steps=1)
    trainer.train()
    return trainer


def test_save_checkpoint_writes_where_get_output_dir_says_and_pushes_only_through_push_from_checkpoint(
    trained, tmp_path, monkeypatch
):
    output_dir = Path(trained.args.output_dir)
    monkeypatch.setattr(trained.args, "push_to_hub", True)  # what may reach the Hub: `_push_from_checkpoint` alone
    with boundary.checkpoint_saved_into(trained, str(tmp_path)):
        GRPOTrainer._save_checkpoint(trained, trained.model, None)
    assert (tmp_path / "checkpoint-1" / "trainer_state.json").is_file() and not list(output_dir.glob("checkpoint-*"))
    assert boundary.run_dir(trained) == str(output_dir)  # the trainer's own folder again

    pushed = []
    trained._push_from_checkpoint = pushed.append
    try:
        GRPOTrainer._save_checkpoint(trained, trained.model, None)
    finally:
        del trained._push_from_checkpoint
    assert (
        pushed == [str(output_dir / "checkpoint-1")] and (output_dir / "checkpoint-1" / "trainer_state.json").is_file()
    )


def test_every_save_of_the_weights_goes_through_save(trained, tmp_path):
    saved, save = [], trained._save
    trained._save = lambda output_dir=None, state_dict=None: saved.append(output_dir) or save(output_dir, state_dict)
    try:
        trained.save_model(str(tmp_path / "model"))
        with boundary.checkpoint_saved_into(trained, str(tmp_path / "staging")):
            GRPOTrainer._save_checkpoint(trained, trained.model, None)
    finally:
        del trained._save
    assert saved == [str(tmp_path / "model"), str(tmp_path / "staging" / "checkpoint-1")]
    assert all((Path(folder) / "adapter_model.safetensors").is_file() for folder in saved)


def test_grad_norm_is_read_once_per_optimizer_step_with_the_gradients_before_the_update(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, gradient_accumulation_steps=2)
    trainable = [param for param in trainer.model.parameters() if param.requires_grad]
    initial = [param.detach().clone() for param in trainable]
    seen = []
    get_grad_norm = trainer._get_grad_norm

    def spy(model, grad_norm=None):
        norm = get_grad_norm(model, grad_norm)
        gradients = torch.cat([param.grad.flatten() for param in trainable])
        seen.append(
            (trainer.state.global_step, float(norm), gradients.norm().item(), [p.detach().clone() for p in trainable])
        )
        return norm

    trainer._get_grad_norm = spy
    trainer.train()
    assert [step for step, *_ in seen] == [0, 1]  # once per optimizer step, not per micro-batch
    for _, norm, clipped_norm, _ in seen:  # the pre-clip norm of the gradients, which are clipped already
        assert clipped_norm == pytest.approx(min(norm, trainer.args.max_grad_norm), rel=1e-4)
    assert [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log] == [
        norm for _, norm, *_ in seen
    ]
    assert all(torch.equal(a, b) for a, b in zip(seen[0][3], initial, strict=True))  # before the first update
    assert not all(torch.equal(a, b) for a, b in zip(seen[1][3], initial, strict=True))  # after it
