"""
Diversity metrics for the k images a model generates for one prompt: the diversity axis of the reward–diversity
frontier.

All metrics are pure functions of one prompt group and come in three families:

- **policy side**, from the sampler's outputs: `token_entropy` (full log-probs), `codebook_usage` and
  `token_hamming_diversity` (the image tokens);
- **feature side**, from any image features `(k, D)`: `pairwise_cosine_distance` and `vendi_score`;
- **feature extractors**: `ImageFeatureModel` (CLIP or DINOv2 through transformers; needs the weights) and the
  weight-free `pixel_features` (a colour histogram plus a low-resolution layout, for tests, the CPU demo and runs
  without hub access).

`diversity_summary` gathers them into the per-prompt row the evaluation script writes.

Example:
    >>> images = [Image.new("RGB", (32, 32), colour) for colour in ["red", "red", "blue"]]
    >>> diversity_summary(pixel_features(images))
    {'pairwise_distance': 0.666..., 'vendi': 1.889...}
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

from .images import to_pil
from .pretrained import WeightsNotFoundError, default_device, default_dtype, hub_errors, load_pretrained
from .sampling import position_entropy


CLIP_MODEL_ID = "openai/clip-vit-large-patch14"
"""Default model of `ImageFeatureModel`: CLIP embeddings measure semantic diversity (what is drawn)."""

DINO_MODEL_ID = "facebook/dinov2-base"
"""DINOv2 CLS embeddings measure layout and instance diversity (how it is drawn); pass it as `model_id`."""

MIN_CONTRAST = 0.05
"""RMS contrast (pixel values in [0, 1], ≈13/255) below which `pixel_features` scales its layout part down instead of
normalising it to unit length, so that sensor-like noise on a flat image does not count as a layout."""


def token_entropy(logp_table: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """
    Mean per-position entropy (nats) of the distribution the image tokens were sampled from.

    Args:
        logp_table (`torch.Tensor`):
            Log-probabilities (or logits) over the whole codebook, shape `(..., N, V)`; see `position_entropy`.
        mask (`torch.Tensor` or `None`, *optional*):
            `(..., N)`, true (or 1) for the positions to average over. Rows with no position selected give 0.

    Returns:
        `torch.Tensor`: the entropy averaged over the N positions, shape `(...)`, in [0, log V].

    Example:
        >>> token_entropy(torch.zeros(2, 3, 4))  # uniform over 4 codes
        tensor([1.3863, 1.3863])
    """
    entropy = position_entropy(logp_table)
    if mask is None:
        return entropy.mean(-1)
    if mask.shape != entropy.shape:
        raise ValueError(
            f"mask must have shape {tuple(entropy.shape)} (logp_table without V), got {tuple(mask.shape)}."
        )
    mask = mask.to(entropy.dtype)
    return (entropy * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def codebook_usage(image_tokens: torch.Tensor, codebook_size: int) -> float:
    """
    Fraction of the codebook that a set of images uses, in (0, 1].

    Args:
        image_tokens (`torch.LongTensor`):
            The VQ codes of the images, any shape, typically `(k, N)` for the k images of one prompt.
        codebook_size (`int`):
            Number of codes V (16,384 for Janus-Pro and LlamaGen).

    Example:
        >>> codebook_usage(torch.tensor([[0, 1, 1], [1, 2, 0]]), codebook_size=8)
        0.375
    """
    if codebook_size <= 0:
        raise ValueError(f"codebook_size must be positive, got {codebook_size}.")
    if image_tokens.numel() == 0:
        raise ValueError("codebook_usage needs at least one image token.")
    low, high = image_tokens.min().item(), image_tokens.max().item()
    if low < 0 or high >= codebook_size:
        raise ValueError(f"image tokens must lie in [0, {codebook_size}), got values in [{low}, {high}].")
    return torch.unique(image_tokens).numel() / codebook_size


def token_hamming_diversity(image_tokens: torch.Tensor) -> float:
    """
    Mean over image pairs of the fraction of positions at which their tokens differ, in [0, 1].

    0 when all images are token-identical; 1 when no two images share a code at any position.

    Args:
        image_tokens (`torch.LongTensor`):
            `(k, N)`, the N image tokens of each of k ≥ 2 images.

    Example:
        >>> token_hamming_diversity(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 4]]))
        0.25
    """
    if image_tokens.ndim != 2:
        raise ValueError(f"image_tokens must have shape (k, N), got {tuple(image_tokens.shape)}.")
    differ = (image_tokens[:, None, :] != image_tokens[None, :, :]).double().mean(-1)
    return _mean_over_pairs(differ)


def pairwise_cosine_distance(features: torch.Tensor) -> float:
    """
    `1 − mean_{i<j} cos(f_i, f_j)` over the k ≥ 2 feature vectors of one prompt group.

    0 when all features point the same way (identical images), 1 when they are pairwise orthogonal; up to 2 for
    features that can be negatively correlated (non-negative features, such as histograms, stay in [0, 1]).

    Args:
        features (`torch.Tensor`):
            `(k, D)`, one feature vector per image (any scale: rows are L2-normalised here).

    Example:
        >>> pairwise_cosine_distance(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        1.0
    """
    unit = _unit_rows(features)
    return 1.0 - _mean_over_pairs(unit @ unit.T)


def vendi_score(features: torch.Tensor, q: float = 1.0) -> float:
    """
    Vendi score (Friedman & Dieng, 2023) of k samples under the cosine-similarity kernel: the effective number of
    distinct samples, in [1, k].

    With rows L2-normalised, K = X̂ X̂ᵀ / k has non-negative eigenvalues λ summing to 1, and the score of order q is the
    exponential of their Rényi entropy: `exp(−Σ λ log λ)` for q = 1, `exp(log(Σ λ^q) / (1 − q))` otherwise, and
    `1 / max λ` for q = inf. Identical features give 1; k orthogonal features give k. Larger q weighs the dominant
    modes more (q = 0 counts them all: the rank of K).

    Args:
        features (`torch.Tensor`):
            `(k, D)`, one feature vector per sample, k ≥ 1 (any scale: rows are L2-normalised here).
        q (`float`, *optional*, defaults to `1.0`):
            The order, q ≥ 0 (`math.inf` allowed).

    Example:
        >>> round(vendi_score(torch.eye(3)), 6)
        3.0
    """
    if not q >= 0:
        raise ValueError(f"The Vendi order q must be >= 0 (math.inf allowed), got {q}.")
    unit = _unit_rows(features)
    k, dim = unit.shape
    # X̂ᵀX̂ has the same non-zero eigenvalues as X̂X̂ᵀ: diagonalise the smaller of the two.
    gram = unit @ unit.T if k <= dim else unit.T @ unit
    eigenvalues = torch.linalg.eigvalsh(gram / k)
    # Round-off leaves eigenvalues of order size·eps (some negative) where the true ones are 0; they are dropped with
    # the same relative tolerance `torch.linalg.matrix_rank` uses, which only matters for q < 1.
    tolerance = len(gram) * torch.finfo(torch.float64).eps * eigenvalues.max()
    eigenvalues = eigenvalues[eigenvalues > tolerance]
    if q == 1:
        score = torch.exp(-(eigenvalues * eigenvalues.log()).sum())
    elif q == math.inf:
        score = 1.0 / eigenvalues.max()
    else:
        score = torch.exp(eigenvalues.pow(q).sum().log() / (1.0 - q))
    return score.item()


def pixel_features(images: list[Image.Image] | torch.Tensor, size: int = 16, bins: int = 4) -> torch.Tensor:
    """
    Weight-free image features for diversity among the images of one prompt: a colour histogram and a low-resolution
    layout, each with unit weight.

    Within one prompt's group, images differ in two ways that a diversity metric should see and that need no learned
    model: *which colours* are drawn (a red or a blue car is diversity) and *where things are* (the layout). Hence two
    parts, concatenated and L2-normalised:

    - **colour**: a joint RGB histogram with `bins` levels per channel over every pixel, L2-normalised. Pixels vote for
      the neighbouring levels with linear (triangular) weights, so the histogram moves continuously with the pixel
      values: ±2/255 of noise cannot flip a pixel to another bin. Never zero, so a flat image has a well-defined
      feature, and histograms are non-negative: disjoint palettes are orthogonal (cosine distance 1).
    - **layout**: the image area-averaged to `size × size`, minus its mean colour (so that colour is counted once, by
      the histogram), flattened. It is scaled to unit length, except that images with an RMS contrast below
      `MIN_CONTRAST` are scaled by contrast / `MIN_CONTRAST` instead: faint noise on a flat image stays a faint
      layout, not a random direction of full weight.

    Every part is a continuous function of the pixels, so nearly identical images give nearly identical features, and
    identical images give identical features (cosine distance 0). The features are not semantic: two photos of
    different dogs with the same palette and pose look alike here. Use `ImageFeatureModel` (CLIP/DINOv2) when the
    weights are available.

    Args:
        images (`list[PIL.Image.Image]` or `torch.Tensor`):
            k PIL images (any mode and size, converted to RGB), or `uint8` images of shape `(k, H, W, 3)`.
        size (`int`, *optional*, defaults to `16`):
            Side of the layout thumbnail (smaller images are upsampled).
        bins (`int`, *optional*, defaults to `4`):
            Histogram levels per channel (`bins³` colour bins). Flat colours 2/(bins − 1) or more apart in some
            channel share no bin (cosine distance 1); closer colours overlap in proportion to their closeness.

    Returns:
        `torch.Tensor`: float32 features of shape `(k, bins³ + 3·size²)` with unit-norm rows.

    Example:
        >>> images = [Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")]
        >>> pairwise_cosine_distance(pixel_features(images))
        1.0
    """
    if size < 1 or bins < 2:
        raise ValueError(f"pixel_features needs size >= 1 and bins >= 2, got size={size} and bins={bins}.")
    features = [torch.cat([_colour_histogram(image, bins), _layout(image, size)]) for image in _float_images(images)]
    if not features:
        raise ValueError("pixel_features needs at least one image.")
    return F.normalize(torch.stack(features), dim=-1)


class ImageFeatureModel:
    """
    Image embeddings from a pretrained vision model, for `pairwise_cosine_distance` and `vendi_score`: call it on the
    images of one prompt.

    Models with `get_image_features` (CLIP and its relatives) give their projected image embedding; others (DINOv2)
    give the `pooler_output` of their forward, which for DINOv2 is the layer-normed CLS token. The model loads through
    `trl_t2i.pretrained.load_pretrained` when this is built, in the rewards' default dtype, so a reward on the same
    checkpoint and device (`clip_score` and `aesthetic` on CLIP ViT-L/14) uses the very same copy; it stays loaded
    while this object lives.

    Args:
        model_id (`str`, *optional*, defaults to `CLIP_MODEL_ID`):
            Hub id or local directory of a transformers model and its image processor, e.g. `DINO_MODEL_ID`.
        device (`str`, `torch.device` or `None`, *optional*):
            Where the model runs; defaults to CUDA when available, else CPU.
        dtype (`torch.dtype` or `None`, *optional*):
            Model dtype; defaults to bfloat16 on CUDA and float32 elsewhere, as the rewards do.
        batch_size (`int`, *optional*, defaults to `32`):
            Images per forward pass.

    Example:
        >>> features = ImageFeatureModel(DINO_MODEL_ID)
        >>> vendi_score(features(images))
    """

    def __init__(
        self,
        model_id: str = CLIP_MODEL_ID,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 32,
    ):
        self.device = torch.device(device or default_device())
        self.batch_size = batch_size
        try:
            self.model = load_pretrained(AutoModel, model_id, self.device, dtype or default_dtype(self.device))
            with hub_errors(model_id):
                self.processor = AutoImageProcessor.from_pretrained(model_id)
        except WeightsNotFoundError as err:
            how = "`--feature_model /path/to/dir` for `trl-t2i evaluate` and `frontier`"
            raise err.for_setting("The diversity feature model", "feature_model", how) from err

    def __call__(self, images: list[Image.Image] | torch.Tensor) -> torch.Tensor:
        """
        Args:
            images (`list[PIL.Image.Image]` or `torch.Tensor`):
                k PIL images, or `uint8` images of shape `(k, H, W, 3)`.

        Returns:
            `torch.Tensor`: float32 features of shape `(k, D)` on the CPU, not normalised (the metrics normalise).
        """
        if isinstance(images, torch.Tensor):
            images = to_pil(_check_uint8_images(images))
        features = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                inputs = self.processor(images=images[start : start + self.batch_size], return_tensors="pt")
                pixel_values = inputs["pixel_values"].to(device=self.device, dtype=self.model.dtype)
                if hasattr(self.model, "get_image_features"):
                    output = self.model.get_image_features(pixel_values=pixel_values)
                else:
                    output = self.model(pixel_values=pixel_values)
                features.append(output.pooler_output.float().cpu())
        if not features:
            raise ValueError("ImageFeatureModel needs at least one image.")
        return torch.cat(features)


def diversity_summary(
    features: torch.Tensor,
    image_tokens: torch.Tensor | None = None,
    codebook_size: int | None = None,
    logp_table: torch.Tensor | None = None,
) -> dict[str, float]:
    """
    Every diversity metric of one prompt group: the row the evaluation script writes per prompt.

    Args:
        features (`torch.Tensor`):
            `(k, D)` image features of the k ≥ 2 images (`ImageFeatureModel` or `pixel_features`).
        image_tokens (`torch.LongTensor` or `None`, *optional*):
            `(k, N)` image tokens of the same images; adds `token_hamming`, and `codebook_usage` with `codebook_size`.
        codebook_size (`int` or `None`, *optional*):
            Number of codes V, for `codebook_usage`.
        logp_table (`torch.Tensor` or `None`, *optional*):
            `(k, N, V)` full log-probs the tokens were sampled from; adds `token_entropy` (mean over the k images).

    Returns:
        `dict[str, float]`: `pairwise_distance` and `vendi` always, then `codebook_usage`, `token_hamming` and
        `token_entropy` when their inputs are given.
    """
    k = len(features)
    summary = {"pairwise_distance": pairwise_cosine_distance(features), "vendi": vendi_score(features)}
    if image_tokens is not None:
        _check_group_size(image_tokens, k, "image_tokens")
        if codebook_size is not None:
            summary["codebook_usage"] = codebook_usage(image_tokens, codebook_size)
        summary["token_hamming"] = token_hamming_diversity(image_tokens)
    if logp_table is not None:
        _check_group_size(logp_table, k, "logp_table")
        summary["token_entropy"] = token_entropy(logp_table).mean().item()
    return summary


def _unit_rows(features: torch.Tensor) -> torch.Tensor:
    """Rows of `(k, D)` features scaled to unit L2 norm, in float64 (the kernel eigenvalues need the precision)."""
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"features must have shape (k, D) with k >= 1, got {tuple(features.shape)}.")
    features = features.double()
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values.")
    norms = features.norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        rows = (norms.squeeze(-1) == 0).nonzero().flatten().tolist()
        raise ValueError(f"Cosine similarity is undefined for all-zero feature rows: rows {rows}.")
    return features / norms


def _mean_over_pairs(matrix: torch.Tensor) -> float:
    """Mean of the strictly upper triangle of a `(k, k)` pairwise matrix, k ≥ 2."""
    k = len(matrix)
    if k < 2:
        raise ValueError(f"A pairwise metric needs at least 2 samples per group, got {k}.")
    rows, columns = torch.triu_indices(k, k, offset=1)
    return matrix[rows, columns].mean().item()


def _check_group_size(tensor: torch.Tensor, k: int, name: str) -> None:
    if len(tensor) != k:
        raise ValueError(f"{name} has {len(tensor)} rows but features has {k}: both must describe the same images.")


def _check_uint8_images(images: torch.Tensor) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"Image tensors must be uint8 of shape (k, H, W, 3), got {images.dtype} of shape {tuple(images.shape)}."
        )
    return images


def _float_images(images: list[Image.Image] | torch.Tensor) -> list[torch.Tensor]:
    """PIL images or a uint8 `(k, H, W, 3)` tensor to a list of float32 `(H, W, 3)` tensors in [0, 1]."""
    if isinstance(images, torch.Tensor):
        arrays = list(_check_uint8_images(images).cpu())
    else:
        arrays = [torch.from_numpy(np.array(image.convert("RGB"))) for image in images]
    return [array.float() / 255.0 for array in arrays]


def _colour_histogram(image: torch.Tensor, bins: int) -> torch.Tensor:
    """Unit-norm joint RGB histogram `(bins³,)` of a float `(H, W, 3)` image, with linear votes to the nearest
    levels."""
    levels = torch.linspace(0.0, 1.0, bins)
    # Triangular kernels of half-width 1/(bins − 1) centred on the levels sum to 1 at every value in [0, 1].
    votes = (1.0 - (image.reshape(-1, 3, 1) - levels).abs() * (bins - 1)).clamp(min=0.0)
    histogram = torch.einsum("pa,pb,pc->abc", votes[:, 0], votes[:, 1], votes[:, 2]).flatten()
    return histogram / histogram.norm()


def _layout(image: torch.Tensor, size: int) -> torch.Tensor:
    """Mean-removed `size × size` area-averaged thumbnail `(3·size²,)`, unit norm unless its contrast is faint."""
    thumbnail = F.adaptive_avg_pool2d(image.permute(2, 0, 1), size)
    layout = (thumbnail - thumbnail.mean(dim=(1, 2), keepdim=True)).flatten() / math.sqrt(thumbnail.numel())
    # The norm is now the RMS contrast; dividing by max(contrast, MIN_CONTRAST) keeps the map continuous at flat
    # images.
    return layout / max(layout.norm().item(), MIN_CONTRAST)
