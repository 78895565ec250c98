"""`T2IGRPOTrainer` on the tiny LlamaGen: LoRA and full fine-tuning, every divergence and estimator, learning."""

import math

import pytest
import torch
from conftest import QUICK_FLAGS, clone_parameters, make_trainer

from trl_t2i.cli import grpo
from trl_t2i.cli.parsing import RECIPES
from trl_t2i.divergences import DIVERGENCES
from trl_t2i.models import TINY_LLAMAGEN


@pytest.mark.parametrize("estimator", ["sampled", "exact"])
@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_lora_trains_with_every_divergence_and_estimator(tmp_path, divergence, estimator):
    trainer = make_trainer(tmp_path, model=TINY_LLAMAGEN, divergence=divergence, divergence_estimator=estimator)
    before = clone_parameters(trainer.model)
    trainer.train()
    after = clone_parameters(trainer.model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("lora_" in name and ".transformer.layers." in name for name in changed)
    first, second = (log for log in trainer.state.log_history if "loss" in log)
    for key in ["divergence/reverse_kl", f"divergence/{divergence}_penalty", "rewards/colour_match/mean"]:
        assert math.isfinite(first[key]) and math.isfinite(second[key]), key
    assert first["divergence/reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    assert second["divergence/reverse_kl"] > 1e-4
    assert first["sampling/logp_gap_max"] < 1e-4  # the sampler's log-probs are the teacher-forced ones


def test_full_finetuning_never_touches_t5_or_the_vq_model(tmp_path):
    trainer = make_trainer(tmp_path, model=TINY_LLAMAGEN, lora=False, beta=0.04, learning_rate=1e-3)
    optimised = {id(param) for group in trainer.create_optimizer().param_groups for param in group["params"]}
    named = dict(trainer.model.named_parameters())
    frozen = [name for name in named if name.startswith(("text_encoder.", "vqmodel."))]
    assert frozen and not any(id(named[name]) in optimised for name in frozen)
    before = clone_parameters(trainer.model)
    trainer.train()
    after = clone_parameters(trainer.model)
    changed = {name.split(".")[0] for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"caption_embedder", "transformer", "image_head"}
    assert trainer.ref_model is not None  # a frozen copy is the reference


def test_the_demo_recipe_trains(tmp_path):
    argv = ["--config", str(RECIPES / "tiny" / "llamagen_demo.yaml"), *QUICK_FLAGS, "--output_dir", str(tmp_path)]
    trainer = grpo.main(*grpo.make_parser().parse_args_and_config(argv))
    assert trainer.family.model_type == "llamagen" and trainer.state.global_step == 2
    assert (tmp_path / "adapter_model.safetensors").is_file()
