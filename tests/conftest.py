import pytest
import torch

from trl_t2i.models import build_tiny_janus, get_adapter


@pytest.fixture(autouse=True)
def _isolated_tiny_cache(tmp_path_factory, monkeypatch):
    """Tiny models resolved by name are built into a per-session temporary cache, never into the user's."""
    monkeypatch.setenv("TRL_T2I_CACHE", str(tmp_path_factory.getbasetemp() / "trl_t2i_cache"))


@pytest.fixture
def tiny_janus():
    """A fresh tiny Janus (eval mode, forward patched), its processor and adapter."""
    model, processor = build_tiny_janus(seed=0)
    model.eval()
    adapter = get_adapter(model, processor)
    adapter.patch_forward(model)
    return model, processor, adapter


@pytest.fixture
def prompts():
    return ["a red cat", "a big blue dog on the beach", "sky", "a photo of two green apples"]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
