"""HPSv2.1 (Human Preference Score v2.1) on an open_clip ViT-H/14. open_clip is an optional extra."""

import torch
from PIL import Image

from ..pretrained import hub_file, load_shared
from .base import ModelReward


def _import_open_clip():
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(
            'The hpsv2 reward needs open_clip: `pip install "trl_t2i[hps]"` (or `pip install open_clip_torch`).'
        ) from err
    return open_clip


class HPSv2Reward(ModelReward):
    """HPSv2.1: an open_clip ViT-H/14 fine-tuned on human preferences (HPDv2), `cos(image, caption)`.

    The cosine between the model's normalised image and caption embeddings, as `hpsv2.score` returns it: good images
    typically score 0.25–0.35 (papers report it ×100). Needs the `hps` extra (`pip install "trl_t2i[hps]"`).

    Args:
        model_id (`str`, *optional*, defaults to `"xswu/HPSv2"`):
            Hub id or local directory holding the checkpoint.
        filename (`str`, *optional*, defaults to `"HPS_v2.1_compressed.pt"`):
            The checkpoint in `model_id` (a dict whose `state_dict` is the open_clip model's);
            `"HPS_v2_compressed.pt"` gives HPSv2.0.
        architecture (`str`, *optional*, defaults to `"ViT-H-14"`):
            The open_clip architecture the checkpoint fits: a built-in name, or one registered with
            `open_clip.add_model_config` (not `hf-hub:`/`local-dir:`, which bring weights of their own).
        device, dtype, batch_size:
            See [`~rewards.base.ModelReward`].

    Example:
        >>> reward = HPSv2Reward()
        >>> reward(["a red cat"], [Image.open("cat.png")])  # value for illustration
        [0.29]
    """

    __name__ = "hpsv2"

    def __init__(
        self,
        model_id: str = "xswu/HPSv2",
        filename: str = "HPS_v2.1_compressed.pt",
        architecture: str = "ViT-H-14",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 32,
    ):
        _import_open_clip()  # fail when the reward is created, not in the middle of the first training step
        super().__init__(device, dtype, batch_size)
        self.model_id = model_id
        self.filename = filename
        self.architecture = architecture

    def load(self) -> None:
        open_clip = _import_open_clip()
        from open_clip.transform import PreprocessCfg, image_transform_v2

        key = ("open_clip", self.architecture, self.model_id, self.filename, self.device, self.dtype)
        self.model = load_shared(key, self._load_model)
        self.preprocess = image_transform_v2(PreprocessCfg(**self.model.visual.preprocess_cfg), is_train=False)
        self.tokenizer = open_clip.get_tokenizer(self.architecture)

    def _load_model(self) -> torch.nn.Module:
        # open_clip loads the checkpoint strictly (every key must match the architecture)
        checkpoint = hub_file(self.model_id, self.filename)
        model = _import_open_clip().create_model(self.architecture, pretrained=checkpoint)
        return model.to(self.device, self.dtype).eval().requires_grad_(False)

    def score(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        pixel_values = torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)
        image_embeds = self.model.encode_image(pixel_values, normalize=True)
        text_embeds = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True)
        return (image_embeds.float() * text_embeds.float()).sum(-1)
