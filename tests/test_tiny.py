import pytest
import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from trl_t2i.models import (
    TINY_JANUS,
    TINY_LLAMAGEN,
    build_tiny_janus,
    get_family,
    load_model,
    load_processor,
    resolve_name,
)


def _state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_build_is_deterministic_in_the_seed():
    first, second, other = (build_tiny_janus(seed=s)[0] for s in (0, 0, 1))
    a, b, c = _state(first), _state(second), _state(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_build_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_janus(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_name_resolves_to_a_saved_model_that_reloads_identically():
    path = resolve_name(TINY_JANUS)
    assert resolve_name(TINY_JANUS) == path  # built once, then reused
    assert resolve_name("some/other-model") == "some/other-model"
    reloaded, built = load_model(TINY_JANUS), build_tiny_janus(seed=0)[0]
    loaded_state, built_state = _state(reloaded), _state(built)
    assert loaded_state.keys() == built_state.keys()
    assert all(torch.equal(loaded_state[k], built_state[k]) for k in built_state)

    processor = load_processor(TINY_JANUS)
    family = get_family(reloaded, processor)
    input_ids, _ = family.tokenize_prompts(["a red cat"])
    tokens = processor.tokenizer.convert_ids_to_tokens(input_ids[0])
    assert tokens[:2] == ["<｜begin▁of▁sentence｜>", "<|User|>"]
    assert tokens[-3:] == ["<|Assistant|>", ":", "<begin_of_image>"]
    assert "red" in tokens and "<unk>" not in tokens


@pytest.mark.parametrize("name", [TINY_JANUS, TINY_LLAMAGEN])
def test_a_tiny_models_name_is_no_hub_id_so_it_hides_no_repo(name):
    with pytest.raises(HFValidationError):
        validate_repo_id(name)


@pytest.mark.parametrize(
    "former, name", [("trl-t2i/tiny-janus", TINY_JANUS), ("trl-t2i/tiny-llamagen", TINY_LLAMAGEN)]
)
def test_a_former_tiny_name_goes_to_the_hub_and_its_failure_names_the_new_one(monkeypatch, former, name):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert resolve_name(former) == former  # a Hub repo of that name would load
    with pytest.raises(OSError, match=f"'{former}'.*now '{name}'"):
        load_model(former)


def test_codes_decode_to_distinct_colours_spread_over_rgb(tiny_janus):
    model, _, family = tiny_janus
    codes = torch.arange(family.codebook_size)[:, None].repeat(1, family.num_image_tokens)
    colours = family.decode(model, codes).float().mean(dim=(1, 2))  # (K, 3) mean colour of each code
    assert (colours.std(dim=0) >= 40).all(), colours.std(dim=0)
    # every channel spans most of the range, so "red" and "blue" images exist
    assert (colours.amin(dim=0) < 40).all() and (colours.amax(dim=0) > 215).all()


def test_a_pixel_depends_only_on_its_own_code(tiny_janus):
    model, _, family = tiny_janus
    mosaic = torch.randint(0, family.codebook_size, (4, family.num_image_tokens))
    flat = mosaic[:, :1].repeat(1, family.num_image_tokens)
    assert torch.equal(family.decode(model, mosaic)[:, :2, :2], family.decode(model, flat)[:, :2, :2])
