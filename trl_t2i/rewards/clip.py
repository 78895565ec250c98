"""Rewards on top of a transformers `CLIPModel`: CLIPScore, PickScore and the LAION aesthetic predictor."""

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoProcessor, CLIPModel

from ..pretrained import hub_errors, hub_file, load_pretrained, load_shared
from .base import ModelReward


def load_processor(processor_id: str):
    with hub_errors(processor_id):
        return AutoProcessor.from_pretrained(processor_id)


class CLIPScoreReward(ModelReward):
    """CLIPScore: how well an image matches its caption according to CLIP, `100 · cos(image, caption)`.

    The cosine between CLIP's projected image and caption embeddings, times 100. For any real image–caption pair the
    cosine is positive and this equals torchmetrics' `CLIPScore` (`max(100 · cos, 0)`); it is not clipped at 0 so that
    the reward never goes flat. Matching pairs typically score 20–35 with ViT-L/14.

    Args:
        model_id (`str`, *optional*, defaults to `"openai/clip-vit-large-patch14"`):
            Hub id or local directory of a `CLIPModel`.
        processor_id (`str`, *optional*):
            Hub id or local directory of its `CLIPProcessor`. Defaults to `model_id`.
        device, dtype, batch_size:
            See [`~rewards.base.ModelReward`].

    Example:
        >>> reward = CLIPScoreReward()  # nothing is loaded yet
        >>> reward(["a red cat"], [Image.open("cat.png")])  # loads the model, then scores (value for illustration)
        [31.2]
    """

    __name__ = "clip_score"
    weight_settings = ("model_id", "processor_id")

    def __init__(
        self,
        model_id: str = "openai/clip-vit-large-patch14",
        processor_id: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 32,
    ):
        super().__init__(device, dtype, batch_size)
        self.model_id = model_id
        self.processor_id = processor_id or model_id

    def load(self) -> None:
        self.processor = load_processor(self.processor_id)
        self.model = load_pretrained(CLIPModel, self.model_id, self.device, self.dtype)

    def embed(self, prompts: list[str], images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised fp32 image and caption embeddings, one row per (prompt, image) pair."""
        inputs = self.processor(
            text=prompts,
            images=images,
            padding=True,
            truncation=True,  # CLIP reads at most 77 tokens; long captions are cut, as in every CLIPScore
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(self.device)
        # transformers 5 returns an output object whose `pooler_output` is the projected embedding
        image_embeds = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.dtype)).pooler_output
        text_embeds = self.model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output
        return F.normalize(image_embeds.float(), dim=-1), F.normalize(text_embeds.float(), dim=-1)

    def score(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        image_embeds, text_embeds = self.embed(prompts, images)
        return 100 * (image_embeds * text_embeds).sum(-1)


class PickScoreReward(CLIPScoreReward):
    """PickScore v1: a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences, `logit_scale.exp() · cos`.

    The score of the PickScore paper: the cosine between image and caption embeddings times the model's learned
    temperature (`exp(logit_scale)` = 100 for PickScore v1), so good images typically score 18–24. No further
    rescaling (Flow-GRPO divides by 26; GRPO's group normalisation makes the scale irrelevant).

    Args:
        model_id (`str`, *optional*, defaults to `"yuvalkirstain/PickScore_v1"`):
            Hub id or local directory of the PickScore `CLIPModel` (3.9 GB).
        processor_id (`str`, *optional*, defaults to `"laion/CLIP-ViT-H-14-laion2B-s32B-b79K"`):
            Its processor; the PickScore repo has none, it was trained with LAION's.
        device, dtype, batch_size:
            See [`~rewards.base.ModelReward`].

    Example:
        >>> reward = PickScoreReward()
        >>> reward(["a red cat"], [Image.open("cat.png")])  # value for illustration
        [21.7]
    """

    __name__ = "pickscore"

    def __init__(
        self,
        model_id: str = "yuvalkirstain/PickScore_v1",
        processor_id: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 32,
    ):
        super().__init__(model_id, processor_id, device, dtype, batch_size)

    def score(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        image_embeds, text_embeds = self.embed(prompts, images)
        return self.model.logit_scale.exp().float() * (image_embeds * text_embeds).sum(-1)


class AestheticMLP(nn.Module):
    """The LAION aesthetic predictor v2 head: five linear layers on a normalised CLIP image embedding.

    There are no activations between the layers (the original is trained that way); the dropouts do nothing at
    inference but keep the checkpoint's layer indices (`layers.0`, `layers.2`, `layers.4`, `layers.6`, `layers.7`).
    """

    def __init__(self, in_features: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)


class AestheticReward(ModelReward):
    """LAION aesthetic predictor v2: the predicted 1–10 rating of how good an image looks; the caption is ignored.

    An MLP ([`AestheticMLP`]) on the L2-normalised CLIP ViT-L/14 image embedding. The head is
    `sac+logos+ava1-l14-linearMSE.pth` from LAION's improved-aesthetic-predictor, as copied to the hub for TRL's DDPO
    example. Generated images typically score 4.5–6.5. The 3.7 MB head always runs in fp32.

    Args:
        model_id (`str`, *optional*, defaults to `"openai/clip-vit-large-patch14"`):
            Hub id or local directory of the `CLIPModel` the head was trained on.
        head_id (`str`, *optional*, defaults to `"trl-lib/ddpo-aesthetic-predictor"`):
            Hub id or local directory holding the head's state dict.
        head_filename (`str`, *optional*, defaults to `"aesthetic-model.pth"`):
            The state dict's file name in `head_id`.
        processor_id (`str`, *optional*):
            Hub id or local directory of the CLIP processor. Defaults to `model_id`.
        device, dtype, batch_size:
            See [`~rewards.base.ModelReward`].

    Example:
        >>> reward = AestheticReward()
        >>> reward(["a red cat"], [Image.open("cat.png")])  # value for illustration
        [5.8]
    """

    __name__ = "aesthetic"
    weight_settings = ("model_id", "head_id", "processor_id")

    def __init__(
        self,
        model_id: str = "openai/clip-vit-large-patch14",
        head_id: str = "trl-lib/ddpo-aesthetic-predictor",
        head_filename: str = "aesthetic-model.pth",
        processor_id: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 32,
    ):
        super().__init__(device, dtype, batch_size)
        self.model_id = model_id
        self.head_id = head_id
        self.head_filename = head_filename
        self.processor_id = processor_id or model_id

    def load(self) -> None:
        self.processor = load_processor(self.processor_id)
        self.model = load_pretrained(CLIPModel, self.model_id, self.device, self.dtype)
        self.head = load_shared(("AestheticMLP", self.head_id, self.head_filename, self.device), self._load_head)

    def _load_head(self) -> AestheticMLP:
        state_dict = torch.load(hub_file(self.head_id, self.head_filename), map_location="cpu", weights_only=True)
        head = AestheticMLP(self.model.config.projection_dim)
        head.load_state_dict(state_dict)
        return head.to(self.device).eval().requires_grad_(False)

    def score(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        embeds = self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype)).pooler_output
        return self.head(F.normalize(embeds.float(), dim=-1))
