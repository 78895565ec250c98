import math
import weakref

import pytest
import torch
from PIL import Image
from transformers import BitImageProcessorPil, CLIPConfig, CLIPImageProcessorPil, CLIPModel, Dinov2Config, Dinov2Model

from trl_t2i import pretrained
from trl_t2i.metrics import (
    ImageFeatureModel,
    codebook_usage,
    diversity_summary,
    pairwise_cosine_distance,
    pixel_features,
    token_entropy,
    token_hamming_diversity,
    vendi_score,
)


def _two_vectors(cosine: float) -> torch.Tensor:
    """Two unit vectors in the plane with the given cosine."""
    return torch.tensor([[1.0, 0.0], [cosine, math.sqrt(1.0 - cosine**2)]], dtype=torch.float64)


def _halves(left: tuple, right: tuple, size: int = 32, vertical: bool = True) -> torch.Tensor:
    """A uint8 `(size, size, 3)` image split into two flat halves, left/right or (vertical=False) top/bottom."""
    image = torch.empty(size, size, 3, dtype=torch.uint8)
    first, second = (
        (image[:, : size // 2], image[:, size // 2 :]) if vertical else (image[: size // 2], image[size // 2 :])
    )
    first[:], second[:] = torch.tensor(left, dtype=torch.uint8), torch.tensor(right, dtype=torch.uint8)
    return image


def _add_noise(image: torch.Tensor, amplitude: int = 2) -> torch.Tensor:
    noise = torch.randint(-amplitude, amplitude + 1, image.shape, generator=torch.Generator().manual_seed(1))
    return (image.int() + noise).clamp(0, 255).to(torch.uint8)


def _pixel_distance(first: torch.Tensor, second: torch.Tensor) -> float:
    return pairwise_cosine_distance(pixel_features(torch.stack([first, second])))


# Feature-side metrics


@pytest.mark.parametrize("k", [2, 5])
def test_identical_features_have_zero_distance_and_vendi_one(k):
    features = torch.tensor([[0.3, -1.2, 2.0, 0.5]]).repeat(k, 1)
    assert pairwise_cosine_distance(features) == pytest.approx(0.0, abs=1e-12)
    assert vendi_score(features) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("q", [0.0, 0.5, 1.0, 2.0, math.inf])
def test_orthogonal_features_have_distance_one_and_vendi_n(q):
    features = 3.0 * torch.eye(4, 6)
    assert pairwise_cosine_distance(features) == pytest.approx(1.0)
    assert vendi_score(features, q=q) == pytest.approx(4.0)


# With cos = 0.5 the kernel [[1, c], [c, 1]] / 2 has eigenvalues (1 ± c)/2 = 0.75 and 0.25.
@pytest.mark.parametrize(
    "q, expected",
    [
        (1.0, math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))),  # 1.7548
        (2.0, 1.0 / (0.75**2 + 0.25**2)),  # 2 / (1 + c²) = 1.6
        (math.inf, 1.0 / 0.75),
        (0.5, (math.sqrt(0.75) + math.sqrt(0.25)) ** 2),
        (0.0, 2.0),  # the rank of the kernel
    ],
)
def test_vendi_of_two_vectors_by_hand(q, expected):
    features = _two_vectors(0.5)
    assert vendi_score(features, q=q) == pytest.approx(expected, rel=1e-9)
    assert pairwise_cosine_distance(features) == pytest.approx(0.5)


def test_vendi_is_invariant_to_scaling_and_permutation():
    features = torch.randn(6, 10, dtype=torch.float64)
    expected = vendi_score(features)
    scaled = features * torch.tensor([0.01, 1.0, 5.0, 100.0, 2.0, 0.3], dtype=torch.float64)[:, None]
    assert vendi_score(scaled) == pytest.approx(expected, rel=1e-9)
    assert vendi_score(features[torch.randperm(6)]) == pytest.approx(expected, rel=1e-9)


def test_vendi_of_order_one_is_the_limit_of_the_general_order():
    features = torch.randn(5, 8)
    expected = vendi_score(features, q=1.0)
    assert vendi_score(features, q=1.0 - 1e-6) == pytest.approx(expected, rel=1e-5)
    assert vendi_score(features, q=1.0 + 1e-6) == pytest.approx(expected, rel=1e-5)


def test_vendi_lies_in_one_to_n_and_decreases_with_the_order():
    features = torch.randn(8, 3)  # more samples than dimensions: the D×D Gram matrix is diagonalised
    scores = [vendi_score(features, q=q) for q in [0.0, 0.5, 1.0, 2.0, math.inf]]
    assert scores[0] == pytest.approx(3.0)  # rank 3
    assert all(a >= b - 1e-12 for a, b in zip(scores, scores[1:], strict=False))
    assert 1.0 <= scores[-1] and scores[0] <= 8.0


def test_vendi_is_unaffected_by_round_off_in_a_rank_one_kernel():
    # 16 copies of one vector give round-off eigenvalues of order ±1e-17; q = 0 would count each as a mode.
    features = torch.randn(1, 32).repeat(16, 1)
    assert vendi_score(features, q=0.0) == pytest.approx(1.0)


def test_feature_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="at least 2 samples"):
        pairwise_cosine_distance(torch.randn(1, 4))
    with pytest.raises(ValueError, match="all-zero feature rows: rows \\[1\\]"):
        vendi_score(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="q must be >= 0"):
        vendi_score(torch.randn(3, 4), q=-1.0)
    with pytest.raises(ValueError, match="shape \\(k, D\\)"):
        vendi_score(torch.randn(4))
    with pytest.raises(ValueError, match="NaN"):
        pairwise_cosine_distance(torch.tensor([[1.0, math.nan], [1.0, 0.0]]))


# Policy-side metrics


def test_token_entropy_of_uniform_is_log_v_and_of_one_hot_is_zero():
    uniform = torch.full((2, 3, 7), -math.log(7))
    torch.testing.assert_close(token_entropy(uniform), torch.full((2,), math.log(7)))
    one_hot = torch.full((2, 3, 7), -math.inf)
    one_hot[..., 4] = 0.0
    torch.testing.assert_close(token_entropy(one_hot), torch.zeros(2))


def test_token_entropy_ignores_removed_codes_and_renormalises():
    # Top-k kept the codes with probability 0.2, 0.2, 0.1 of five; renormalised: 0.4, 0.4, 0.2.
    logprobs = torch.tensor([0.2, 0.2, 0.1, 0.3, 0.2]).log()
    logprobs[[3, 4]] = -math.inf
    expected = -(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2))  # 1.0549
    entropy = token_entropy(logprobs[None, None])
    assert torch.isfinite(entropy).all()
    assert entropy.item() == pytest.approx(expected, rel=1e-6)


def test_token_entropy_mask_selects_positions():
    logprobs = torch.stack([torch.full((4,), -math.log(4)), torch.tensor([0.0, -math.inf, -math.inf, -math.inf])])
    logprobs = logprobs[None]  # one sequence: a uniform position (log 4), then a certain one (0)
    assert token_entropy(logprobs).item() == pytest.approx(math.log(4) / 2)
    assert token_entropy(logprobs, torch.tensor([[True, False]])).item() == pytest.approx(math.log(4))
    assert token_entropy(logprobs, torch.tensor([[0, 1]])).item() == pytest.approx(0.0)
    assert token_entropy(logprobs, torch.tensor([[0, 0]])).item() == 0.0
    with pytest.raises(ValueError, match="mask must have shape \\(1, 2\\)"):
        token_entropy(logprobs, torch.ones(2))


def test_token_entropy_of_half_precision_is_computed_in_float32():
    logits = torch.randn(3, 5, 11)
    entropy = token_entropy(logits.bfloat16())
    assert entropy.dtype == torch.float32
    torch.testing.assert_close(entropy, token_entropy(logits), atol=2e-2, rtol=0)


def test_codebook_usage_counts_distinct_codes():
    tokens = torch.tensor([[0, 1, 1, 5], [1, 2, 0, 5]])
    assert codebook_usage(tokens, codebook_size=8) == 4 / 8
    assert codebook_usage(torch.zeros(3, 4, dtype=torch.long), codebook_size=16) == 1 / 16
    with pytest.raises(ValueError, match="\\[0, 4\\), got values in \\[0, 5\\]"):
        codebook_usage(tokens, codebook_size=4)


def test_token_hamming_diversity_by_hand():
    tokens = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 4], [5, 6, 7, 8]])
    # Pairs differ at 1/4, 4/4 and 4/4 of the positions.
    assert token_hamming_diversity(tokens) == pytest.approx((0.25 + 1.0 + 1.0) / 3)
    assert token_hamming_diversity(tokens[[0, 0, 0]]) == 0.0
    with pytest.raises(ValueError, match="at least 2 samples"):
        token_hamming_diversity(tokens[:1])


# Weight-free pixel features


def test_pixel_features_of_identical_images_are_identical():
    image = _halves((200, 30, 30), (20, 40, 220))
    features = pixel_features(image[None].repeat(3, 1, 1, 1))
    assert pairwise_cosine_distance(features) == pytest.approx(0.0, abs=1e-6)
    assert vendi_score(features) == pytest.approx(1.0, abs=1e-6)


def test_pixel_features_see_layout_and_colour_but_not_noise():
    image = _halves((200, 30, 30), (20, 40, 220))
    noisy = _add_noise(image)
    mirrored = _halves((20, 40, 220), (200, 30, 30))  # same palette, other layout
    other = _halves((30, 200, 30), (230, 230, 20), vertical=False)  # other palette and layout
    near = _pixel_distance(image, noisy)
    assert near < 0.01
    assert _pixel_distance(image, mirrored) > 0.3
    assert _pixel_distance(image, other) > 0.9


def test_pixel_features_of_flat_images_compare_colours_and_ignore_faint_noise():
    red, blue = torch.tensor([255, 0, 0], dtype=torch.uint8), torch.tensor([0, 0, 255], dtype=torch.uint8)
    assert _pixel_distance(red.expand(16, 16, 3), blue.expand(16, 16, 3)) == pytest.approx(1.0)
    grey = torch.full((16, 16, 3), 128, dtype=torch.uint8)
    assert _pixel_distance(grey, _add_noise(grey)) < 0.01


def test_pixel_features_accept_pil_images_of_any_size():
    image = _halves((200, 30, 30), (20, 40, 220), size=16)
    pil = Image.fromarray(image.numpy())
    features = pixel_features([pil, pil.resize((64, 64), Image.NEAREST), pil.convert("RGBA")], size=8, bins=3)
    assert features.shape == (3, 3**3 + 3 * 8**2)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(features[0], pixel_features(image[None], size=8, bins=3)[0])
    assert pairwise_cosine_distance(features) == pytest.approx(0.0, abs=1e-6)


def test_pixel_features_reject_bad_input():
    with pytest.raises(ValueError, match="uint8 of shape \\(k, H, W, 3\\)"):
        pixel_features(torch.rand(2, 8, 8, 3))
    with pytest.raises(ValueError, match="bins >= 2"):
        pixel_features([Image.new("RGB", (8, 8))], bins=1)


# Model features (tiny random models saved locally; the real weights are never downloaded in tests)


@pytest.fixture(scope="module")
def tiny_feature_models(tmp_path_factory):
    """Local directories of a tiny CLIP (projection dim 16) and a tiny DINOv2 (hidden size 24) with processors."""
    torch.manual_seed(0)
    clip_dir, dino_dir = tmp_path_factory.mktemp("tiny_clip"), tmp_path_factory.mktemp("tiny_dinov2")
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    clip = CLIPModel(
        CLIPConfig(
            text_config={**vision, "vocab_size": 99},
            vision_config={**vision, "image_size": 32, "patch_size": 8},
            projection_dim=16,
        )
    )
    clip.save_pretrained(clip_dir)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip_dir)
    Dinov2Model(
        Dinov2Config(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(dino_dir)
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(dino_dir)
    return {"clip": (str(clip_dir), 16), "dinov2": (str(dino_dir), 24)}


@pytest.fixture
def images():
    return torch.stack(
        [
            _halves((200, 30, 30), (20, 40, 220)),
            _halves((30, 200, 30), (230, 230, 20), vertical=False),
            torch.full((32, 32, 3), 90, dtype=torch.uint8),
        ]
    )


@pytest.fixture(autouse=True)
def _fresh_model_cache(monkeypatch):
    monkeypatch.setattr(pretrained, "_SHARED_MODELS", weakref.WeakValueDictionary())


@pytest.mark.parametrize("family", ["clip", "dinov2"])
def test_image_features_shape_determinism_and_batching(tiny_feature_models, images, family):
    model_id, dim = tiny_feature_models[family]
    features = ImageFeatureModel(model_id, device="cpu")(images)
    assert features.shape == (3, dim) and features.dtype == torch.float32
    torch.testing.assert_close(ImageFeatureModel(model_id, device="cpu", batch_size=2)(images), features)
    pil_images = [Image.fromarray(image.numpy()) for image in images]
    torch.testing.assert_close(ImageFeatureModel(model_id, device="cpu")(pil_images), features)
    # Documented as not normalised: the cosine metrics normalise.
    assert not torch.allclose(features.norm(dim=-1), torch.ones(3))


def test_clip_features_are_the_projected_image_embeddings(tiny_feature_models, images):
    model_id, _ = tiny_feature_models["clip"]
    model, processor = CLIPModel.from_pretrained(model_id).eval(), CLIPImageProcessorPil.from_pretrained(model_id)
    pixel_values = processor(images=list(images.numpy()), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        vision = model.vision_model(pixel_values=pixel_values)
        expected = model.visual_projection(vision.pooler_output)
    torch.testing.assert_close(ImageFeatureModel(model_id, device="cpu")(images), expected)


def test_dinov2_features_are_the_normed_cls_token(tiny_feature_models, images):
    model_id, _ = tiny_feature_models["dinov2"]
    model, processor = Dinov2Model.from_pretrained(model_id).eval(), BitImageProcessorPil.from_pretrained(model_id)
    pixel_values = processor(images=list(images.numpy()), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).last_hidden_state[:, 0]
    torch.testing.assert_close(ImageFeatureModel(model_id, device="cpu")(images), expected)


def test_feature_models_of_one_checkpoint_share_one_frozen_copy(tiny_feature_models, images, monkeypatch):
    calls = []
    load = CLIPModel.from_pretrained  # what AutoModel resolves to for a CLIP checkpoint
    monkeypatch.setattr(CLIPModel, "from_pretrained", lambda *args, **kw: calls.append(args) or load(*args, **kw))
    model_id, _ = tiny_feature_models["clip"]
    first, second = ImageFeatureModel(model_id, device="cpu"), ImageFeatureModel(model_id, device="cpu")
    first(images), second(images)
    assert len(calls) == 1 and second.model is first.model
    assert not first.model.training and not any(param.requires_grad for param in first.model.parameters())


def test_missing_feature_model_names_the_model(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(OSError, match=f"feature model could not load its `feature_model` '{missing}'") as error:
        ImageFeatureModel(missing, device="cpu")
    assert "there is no such local directory" in str(error.value)
    assert "Pass `feature_model` a local directory holding the weights (`--feature_model /path/to/dir`" in str(
        error.value
    )


# The per-prompt summary


def test_diversity_summary_matches_the_individual_metrics():
    features = torch.randn(4, 6)
    tokens = torch.tensor([[0, 1, 2], [0, 1, 3], [4, 5, 6], [0, 1, 2]])
    logp_table = torch.randn(4, 3, 8).log_softmax(-1)
    summary = diversity_summary(features, image_tokens=tokens, codebook_size=8, logp_table=logp_table)
    assert summary == {
        "pairwise_distance": pairwise_cosine_distance(features),
        "vendi": vendi_score(features),
        "codebook_usage": 7 / 8,
        "token_hamming": token_hamming_diversity(tokens),
        "token_entropy": pytest.approx(token_entropy(logp_table).mean().item()),
    }
    assert set(diversity_summary(features)) == {"pairwise_distance", "vendi"}
    assert set(diversity_summary(features, image_tokens=tokens)) == {"pairwise_distance", "vendi", "token_hamming"}


def test_diversity_summary_rejects_inputs_of_another_group():
    with pytest.raises(ValueError, match="image_tokens has 3 rows but features has 4"):
        diversity_summary(torch.randn(4, 6), image_tokens=torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="logp_table has 2 rows but features has 4"):
        diversity_summary(torch.randn(4, 6), logp_table=torch.zeros(2, 5, 8))
