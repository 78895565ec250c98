"""Shared fixtures and helpers. Every registered model family has a `FamilyCase`: the family contract tests
(`test_family_contract.py`) run for each, so a new family gets them by adding its case here."""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from trl_t2i.models import build_tiny_janus, get_family
from trl_t2i.sampling import SamplingConfig


PROMPTS = ["a red cat", "a big blue dog on the beach", "sky", "a photo of two green apples"]


@dataclass
class FamilyCase:
    """How the contract tests build a tiny model of a family and what they compare its sampler with.

    Attributes:
        build: `seed -> (model, processing_class)`, a tiny random model built locally.
        reference_generate: `(model, family, conditioning, sampling, do_sample) -> image tokens`, an implementation
            of CFG generation that is not ours (Janus: transformers' `generate`).
        language_model_prefix: module-path fragment of the language model, where LoRA and 4-bit layers belong.
    """

    build: Callable
    reference_generate: Callable
    language_model_prefix: str


def _janus_generate(model, family, conditioning, sampling: SamplingConfig, do_sample: bool) -> torch.Tensor:
    return model.generate(
        **conditioning.tensors,
        generation_mode="image",
        guidance_scale=sampling.cfg_scale,
        do_sample=do_sample,
        temperature=sampling.temperature,
        top_k=sampling.top_k,  # generate's own default is 50; ours (and TRL's) 0 = disabled
        top_p=sampling.top_p,
    )


FAMILY_CASES = {
    "janus": FamilyCase(
        build=lambda seed=0: build_tiny_janus(seed=seed),
        reference_generate=_janus_generate,
        language_model_prefix=".language_model.layers.",
    ),
}


@pytest.fixture(autouse=True)
def _isolated_tiny_cache(tmp_path_factory, monkeypatch):
    """Tiny models resolved by name are built into a per-session temporary cache, never into the user's."""
    monkeypatch.setenv("TRL_T2I_CACHE", str(tmp_path_factory.getbasetemp() / "trl_t2i_cache"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def _built(case: FamilyCase):
    model, processor = case.build()
    model.eval()
    family = get_family(model, processor)
    family.patch_forward(model)
    return model, processor, family


@pytest.fixture
def tiny_janus():
    """A fresh tiny Janus (eval mode, forward patched), its processor and family."""
    return _built(FAMILY_CASES["janus"])


@pytest.fixture(params=sorted(FAMILY_CASES))
def tiny_family(request):
    """For every registered family: a fresh tiny model (eval mode, forward patched), its processor, family and case."""
    case = FAMILY_CASES[request.param]
    return (*_built(case), case)


@pytest.fixture
def prompts():
    return list(PROMPTS)
