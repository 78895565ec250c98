import io
import json
import sys
import weakref

import huggingface_hub
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from trl_t2i import pretrained
from trl_t2i.cli import evaluate, grpo
from trl_t2i.metrics import ImageFeatureModel
from trl_t2i.rewards import (
    REWARDS,
    AestheticMLP,
    AestheticReward,
    CLIPScoreReward,
    colour_match,
    get_reward,
    get_rewards,
    jpeg_compressibility,
    jpeg_incompressibility,
)


MODEL_REWARDS = ["clip_score", "pickscore", "aesthetic", "hpsv2"]
CAPTION_REWARDS = ["clip_score", "pickscore", "hpsv2"]  # the aesthetic predictor ignores the caption
CAPTIONS = ["a red cat", "a big blue dog on the beach", "sky", "two green apples", "a photo of a yellow car"]


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIPModel and its processor, saved like a hub checkpoint and built with no network."""
    path = tmp_path_factory.mktemp("tiny_clip")
    # A byte-level BPE vocabulary with no merges: each printable ASCII character is a token, enough for the captions.
    chars = [chr(code) for code in range(33, 127)]
    vocab = chars + [char + "</w>" for char in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    text_config = dict(
        vocab_size=len(vocab),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = dict(image_size=32, patch_size=8)
    for config in (text_config, vision_config):
        config.update(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def aesthetic_head_dir(tmp_path_factory):
    """A random aesthetic head for the tiny CLIP, saved as a plain state dict like `aesthetic-model.pth`."""
    path = tmp_path_factory.mktemp("aesthetic_head")
    torch.manual_seed(0)
    torch.save(AestheticMLP(in_features=16).state_dict(), path / "aesthetic-model.pth")
    return str(path)


@pytest.fixture(scope="session")
def tiny_hps(tmp_path_factory):
    """A tiny random open_clip CLIP saved as an HPS checkpoint (`{"state_dict": ...}`), and the kwargs to load it."""
    open_clip = pytest.importorskip("open_clip")
    path = tmp_path_factory.mktemp("tiny_hps")
    model_config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (path / "tiny-hps-test.json").write_text(json.dumps(model_config))
    open_clip.add_model_config(path / "tiny-hps-test.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-hps-test", pretrained=None)
    torch.save({"state_dict": model.state_dict()}, path / "HPS_v2.1_compressed.pt")
    return {"model_id": str(path), "filename": "HPS_v2.1_compressed.pt", "architecture": "tiny-hps-test"}


@pytest.fixture
def tiny_kwargs(request, tiny_clip_dir, aesthetic_head_dir):
    """`get_reward` kwargs that point each model reward at the tiny local models."""

    def kwargs_for(name):
        if name == "hpsv2":
            return request.getfixturevalue("tiny_hps")
        return {
            "clip_score": {"model_id": tiny_clip_dir},
            "pickscore": {"model_id": tiny_clip_dir, "processor_id": tiny_clip_dir},
            "aesthetic": {"model_id": tiny_clip_dir, "head_id": aesthetic_head_dir},
        }[name]

    return kwargs_for


@pytest.fixture
def fresh_model_cache(monkeypatch):
    """Forget the models other tests' rewards may still hold, so that loads can be counted."""
    monkeypatch.setattr(pretrained, "_SHARED_MODELS", weakref.WeakValueDictionary())


@pytest.fixture
def images():
    """Five different non-square images: flat colours and noise."""
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    return [Image.new("RGB", (48, 40), (255, 0, 0)), Image.new("RGB", (48, 40), (0, 0, 255)), *noise]


def loader_of(name):
    """The (object, attribute) that loads the weights of the reward `name`, to count the loads."""
    if name == "hpsv2":
        return sys.modules["open_clip"], "create_model"
    return CLIPModel, "from_pretrained"


class Spy:
    """Wraps a callable (a processor, a tokenizer) and records its calls; everything else is passed through."""

    def __init__(self, wrapped):
        self.wrapped, self.calls = wrapped, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.wrapped(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.wrapped, name)


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_model_reward_returns_one_float_per_image(name, tiny_kwargs, images):
    reward = get_reward(name, **tiny_kwargs(name))
    scores = reward(CAPTIONS, images)
    assert len(scores) == len(images)
    assert all(type(score) is float for score in scores)
    assert reward.__name__ == name


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_batching_does_not_change_scores(name, tiny_kwargs, images):
    small_batches = get_reward(name, batch_size=2, **tiny_kwargs(name))(CAPTIONS, images)
    one_batch = get_reward(name, batch_size=64, **tiny_kwargs(name))(CAPTIONS, images)
    reward = get_reward(name, **tiny_kwargs(name))
    one_by_one = [reward([caption], [image])[0] for caption, image in zip(CAPTIONS, images, strict=True)]
    assert small_batches == pytest.approx(one_batch, rel=1e-5, abs=1e-6)
    assert one_by_one == pytest.approx(one_batch, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_scores_are_deterministic(name, tiny_kwargs, images):
    reward = get_reward(name, **tiny_kwargs(name))
    assert reward(CAPTIONS, images) == reward(CAPTIONS, images)


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_scores_follow_the_image(name, tiny_kwargs, images):
    reward = get_reward(name, **tiny_kwargs(name))
    scores = reward(["a red cat"] * len(images), images)
    assert len(set(scores)) == len(images)


@pytest.mark.parametrize("name", CAPTION_REWARDS)
def test_scores_follow_the_caption(name, tiny_kwargs, images):
    reward = get_reward(name, **tiny_kwargs(name))
    scores = reward(CAPTIONS, [images[0]] * len(CAPTIONS))
    assert len(set(scores)) == len(CAPTIONS)


def test_aesthetic_ignores_the_caption(tiny_kwargs, images):
    reward = get_reward("aesthetic", **tiny_kwargs("aesthetic"))
    assert reward(CAPTIONS, images) == reward(CAPTIONS[::-1], images)


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_model_is_loaded_lazily_and_once(name, tiny_kwargs, images, fresh_model_cache, monkeypatch):
    tiny = tiny_kwargs(name)
    owner, attribute = loader_of(name)
    load = getattr(owner, attribute)
    calls = []
    monkeypatch.setattr(owner, attribute, lambda *args, **kwargs: calls.append(args) or load(*args, **kwargs))
    first, second = get_reward(name, **tiny), get_reward(name, **tiny)
    assert calls == []  # nothing is loaded before the first call
    first(CAPTIONS[:2], images[:2])
    first(CAPTIONS[:2], images[:2])
    second(CAPTIONS[:2], images[:2])  # same checkpoint, device and dtype: shares the first reward's model
    assert len(calls) == 1
    assert second.model is first.model


def test_clip_score_and_aesthetic_share_the_clip_model(tiny_kwargs, images, fresh_model_cache):
    clip_score = get_reward("clip_score", **tiny_kwargs("clip_score"))
    aesthetic = get_reward("aesthetic", **tiny_kwargs("aesthetic"))
    clip_score(CAPTIONS[:1], images[:1])
    aesthetic(CAPTIONS[:1], images[:1])
    assert aesthetic.model is clip_score.model


def test_clip_diversity_features_and_clip_score_share_the_clip_model(tiny_clip_dir, images, fresh_model_cache):
    features = ImageFeatureModel(tiny_clip_dir, device="cpu")  # loaded as AutoModel, as `evaluate --feature_model`
    clip_score = get_reward("clip_score", model_id=tiny_clip_dir)
    clip_score(CAPTIONS[:1], images[:1])
    assert clip_score.model is features.model


@pytest.mark.parametrize("name", MODEL_REWARDS)
@pytest.mark.parametrize(
    ("device", "dtype", "expected"),
    [(None, None, torch.float32), ("cpu", "bfloat16", torch.bfloat16), ("cpu", torch.float64, torch.float64)],
)
def test_model_is_frozen_on_the_requested_device_and_dtype(name, device, dtype, expected, tiny_kwargs, images):
    reward = get_reward(name, device=device, dtype=dtype, **tiny_kwargs(name))  # None: the training device, the CPU
    scores = reward(CAPTIONS[:2], images[:2])
    parameters = list(reward.model.parameters())
    assert reward.device == torch.device("cpu") and reward.dtype == expected
    assert all(p.device == torch.device("cpu") and p.dtype == expected and not p.requires_grad for p in parameters)
    assert not reward.model.training
    assert all(type(score) is float for score in scores)


@pytest.mark.parametrize("name", CAPTION_REWARDS)
def test_scores_the_caption_it_is_given(name, tiny_kwargs, images):
    """The caption in `prompts` reaches the text encoder untouched; other columns (a chat-templated prompt) do not."""
    reward = get_reward(name, **tiny_kwargs(name))
    expected = reward(CAPTIONS[:2], images[:2])
    text_input = "tokenizer" if name == "hpsv2" else "processor"
    spy = Spy(getattr(reward, text_input))
    setattr(reward, text_input, spy)
    templated = [f"<|User|>: {caption}\n\n<|Assistant|>:" for caption in CAPTIONS[:2]]
    kwargs = {"chat_prompt": templated, "trainer_state": None, "log_metric": print, "completion_ids": [[1], [2]]}
    assert reward(CAPTIONS[:2], images[:2], **kwargs) == expected
    (args, call_kwargs) = spy.calls[0]
    assert call_kwargs.get("text", args[0] if args else None) == CAPTIONS[:2]


def _tiny_clip_features(tiny_clip_dir, caption, image):
    """Projected image and caption embeddings computed directly with transformers."""
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip_dir)
    pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"]
    input_ids = processor(text=[caption], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=pixel_values).pooler_output[0]
        text_features = model.get_text_features(input_ids=input_ids).pooler_output[0]
    return model, image_features, text_features


def test_clip_score_is_100_times_the_cosine(tiny_clip_dir, images):
    _, image_features, text_features = _tiny_clip_features(tiny_clip_dir, "a red cat", images[2])
    expected = 100 * F.cosine_similarity(image_features, text_features, dim=0).item()
    assert CLIPScoreReward(model_id=tiny_clip_dir)(["a red cat"], [images[2]]) == [pytest.approx(expected, abs=1e-4)]


def test_pickscore_is_the_logit_scale_times_the_cosine(tiny_clip_dir, images):
    model, image_features, text_features = _tiny_clip_features(tiny_clip_dir, "a red cat", images[2])
    expected = model.logit_scale.exp().item() * F.cosine_similarity(image_features, text_features, dim=0).item()
    reward = get_reward("pickscore", model_id=tiny_clip_dir, processor_id=tiny_clip_dir)
    assert reward(["a red cat"], [images[2]]) == [pytest.approx(expected, abs=1e-4)]


def test_aesthetic_is_the_linear_head_on_the_normalised_embedding(tiny_clip_dir, aesthetic_head_dir, images):
    _, image_features, _ = _tiny_clip_features(tiny_clip_dir, "", images[2])
    state_dict = torch.load(f"{aesthetic_head_dir}/aesthetic-model.pth")
    x = image_features / image_features.norm()
    for index in (0, 2, 4, 6, 7):  # five linear layers, no activation in between
        x = state_dict[f"layers.{index}.weight"] @ x + state_dict[f"layers.{index}.bias"]
    reward = AestheticReward(model_id=tiny_clip_dir, head_id=aesthetic_head_dir)
    assert reward(["ignored"], [images[2]]) == [pytest.approx(x.item(), abs=1e-5)]


def test_hpsv2_is_the_cosine_of_open_clip_features(tiny_hps, images):
    open_clip = sys.modules["open_clip"]
    checkpoint = f"{tiny_hps['model_id']}/{tiny_hps['filename']}"
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_hps["architecture"], pretrained=checkpoint)
    tokens = open_clip.get_tokenizer(tiny_hps["architecture"])(["a red cat"])
    with torch.no_grad():
        image_features, text_features, _ = model.eval()(preprocess(images[2])[None], tokens)
    expected = (image_features @ text_features.T).item()  # HPS: the features come out normalised
    assert get_reward("hpsv2", **tiny_hps)(["a red cat"], [images[2]]) == [pytest.approx(expected, abs=1e-5)]


def test_colour_match_scores_the_named_colour():
    reward = get_reward("colour_match")
    assert reward(["a red cat", "sky"], [Image.new("RGB", (8, 8), (255, 0, 0))] * 2) == [1.0, None]


def test_jpeg_compressibility_is_minus_the_kilobytes(images):
    buffer = io.BytesIO()
    images[2].save(buffer, format="JPEG", quality=95)
    assert get_reward("jpeg_compressibility")(["a"], [images[2]]) == [-buffer.tell() / 1000]
    assert get_reward("jpeg_incompressibility")(["a"], [images[2]]) == [buffer.tell() / 1000]
    flat, noise = jpeg_compressibility(["a", "a"], [images[0], images[2]])
    assert flat > noise


def test_registry_holds_every_builtin_reward():
    weight_free = {"colour_match", "jpeg_compressibility", "jpeg_incompressibility"}
    assert set(REWARDS) == {*MODEL_REWARDS, "ocr", *weight_free}


@pytest.mark.parametrize(
    ("name", "function"),
    [
        ("colour_match", colour_match),
        ("jpeg_compressibility", jpeg_compressibility),
        ("jpeg_incompressibility", jpeg_incompressibility),
    ],
)
def test_weight_free_rewards_are_their_functions(name, function):
    assert get_reward(name) is function  # TRL names the metric after the function: rewards/colour_match/mean


def test_unknown_reward_lists_the_valid_names():
    with pytest.raises(ValueError, match="'pickscor'") as error:
        get_reward("pickscor")
    assert all(name in str(error.value) for name in REWARDS)
    assert "package.module:attribute" in str(error.value)


def test_reward_by_import_path():
    assert get_reward("trl_t2i.rewards.colour:colour_match") is colour_match
    reward = get_reward("trl_t2i.rewards.clip:CLIPScoreReward", model_id="some/clip", batch_size=3)
    assert isinstance(reward, CLIPScoreReward)
    assert (reward.model_id, reward.batch_size) == ("some/clip", 3)


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("trl_t2i.no_such_module:reward", "trl_t2i.no_such_module"),
        ("trl_t2i.rewards.colour:no_such_reward", "no_such_reward"),
    ],
)
def test_import_path_names_what_is_missing(name, missing):
    with pytest.raises(ImportError, match=missing):
        get_reward(name)


@pytest.mark.parametrize("name", ["colour_match", "trl_t2i.rewards.colour:colour_match"])
def test_reward_functions_refuse_arguments(name):
    with pytest.raises(ValueError, match="takes no arguments"):
        get_reward(name, quality=90)


def test_hpsv2_without_open_clip_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` fail
    with pytest.raises(ImportError, match=r'pip install "trl_t2i\[hps\]"'):
        get_reward("hpsv2")


WEIGHT_SETTINGS = {"clip_score": "model_id", "pickscore": "model_id", "aesthetic": "head_id", "hpsv2": "model_id"}


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_missing_weights_offline_name_the_reward_the_setting_and_the_hub_id(name, tiny_kwargs, images, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub reads the variable at import
    missing, setting = "trl-t2i-tests/does-not-exist", WEIGHT_SETTINGS[name]
    with pytest.raises(pretrained.WeightsNotFoundError, match=missing) as error:
        get_reward(name, **tiny_kwargs(name) | {setting: missing})(CAPTIONS[:1], images[:1])
    message = str(error.value)
    assert message.startswith(f"The {name} reward could not load its `{setting}`")
    assert f"reward_kwargs: {{{name}: {{{setting}: /path/to/dir}}}}" in message  # what to pass instead
    filename = {"aesthetic": " aesthetic-model.pth", "hpsv2": " HPS_v2.1_compressed.pt"}.get(name, "")
    assert f"`hf download {missing}{filename}`" in message  # or what to download, file included
    assert "HF_HUB_OFFLINE" in message


@pytest.mark.parametrize(
    ("name", "setting"), [("pickscore", "processor_id"), ("aesthetic", "model_id"), ("hpsv2", "model_id")]
)
def test_a_local_path_without_weights_names_the_setting_and_the_path(name, setting, tiny_kwargs, images, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for path, problem in ((tmp_path / "no-such-dir", "no such local directory"), (empty, "holds no loadable weights")):
        with pytest.raises(pretrained.WeightsNotFoundError) as error:
            get_reward(name, **tiny_kwargs(name) | {setting: str(path)})(CAPTIONS[:1], images[:1])
        message = str(error.value)
        assert f"The {name} reward could not load its `{setting}`" in message and str(path) in message
        assert problem in message and f"Pass `{setting}` a local directory" in message


def test_reward_kwargs_point_each_reward_at_its_weights(tiny_clip_dir, aesthetic_head_dir, images):
    kwargs = {"clip_score": {"model_id": tiny_clip_dir}, "aesthetic": {"model_id": tiny_clip_dir}}
    kwargs["aesthetic"]["head_id"] = aesthetic_head_dir
    clip_score, aesthetic, colour = get_rewards(["clip_score", "aesthetic", "colour_match"], json.dumps(kwargs))
    assert (clip_score.model_id, aesthetic.head_id, colour) == (tiny_clip_dir, aesthetic_head_dir, colour_match)
    assert clip_score(CAPTIONS[:1], images[:1]) == CLIPScoreReward(model_id=tiny_clip_dir)(CAPTIONS[:1], images[:1])


@pytest.mark.parametrize(
    ("reward_kwargs", "message"),
    [
        ({"pickscore": {"model_id": "x"}}, r"reward_kwargs names \['pickscore'\], which are not among the rewards"),
        ("{pickscore: x}", "must be a JSON object"),
        ({"clip_score": "x"}, "must map reward names to their keyword arguments"),
    ],
)
def test_bad_reward_kwargs_are_clear_errors(reward_kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_rewards(["clip_score"], reward_kwargs)


def test_mismatched_prompts_and_images_raise(tiny_kwargs, images):
    with pytest.raises(ValueError, match="2 prompts but 1 images"):
        get_reward("clip_score", **tiny_kwargs("clip_score"))(CAPTIONS[:2], images[:1])


def test_reward_kwargs_flag_and_recipe_key_reach_the_rewards(tiny_clip_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"reward_funcs: [clip_score]\nreward_kwargs:\n  clip_score:\n    model_id: {tiny_clip_dir}\n")
    flag = ["--reward_funcs", "clip_score", "--reward_kwargs", json.dumps({"clip_score": {"model_id": tiny_clip_dir}})]
    for argv in (["--config", str(recipe)], flag):
        argv = [*argv, "--output_dir", str(tmp_path), "--use_cpu", "true", "--bf16", "false"]
        script_args, _, _ = grpo.make_parser().parse_args_and_config(argv)
        (reward,) = get_rewards(script_args.reward_funcs, script_args.reward_kwargs)
        assert reward.model_id == tiny_clip_dir


def test_evaluate_scores_with_the_weights_reward_kwargs_names(tiny_clip_dir, tmp_path):
    argv = ["--reward_funcs", "clip_score", "--reward_kwargs", json.dumps({"clip_score": {"model_id": tiny_clip_dir}})]
    argv += ["--num_prompts", "2", "--num_images_per_prompt", "2", "--grid_prompts", "0", "--device", "cpu"]
    (args,) = evaluate.make_parser().parse_args_and_config([*argv, "--output_dir", str(tmp_path)])
    (row,) = evaluate.main(args)  # the base model: scored by the tiny CLIP, with no network
    assert np.isfinite(row["clip_score_mean"])
