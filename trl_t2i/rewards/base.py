"""What every model-backed reward shares: lazy loading on the training device and batched no-grad scoring. Models
load through `trl_t2i.pretrained`: one copy of each per process, clear errors when weights are missing."""

import torch
from accelerate import PartialState
from PIL import Image

from ..pretrained import WeightsNotFoundError, default_dtype


class ModelReward:
    """Base class of the rewards backed by a model, callable with TRL's reward signature.

    Subclasses set `__name__` (TRL names the metrics `rewards/{__name__}/mean`) and `weight_settings` (the arguments
    that say where weights come from, each a Hub id or a local directory), implement `load()` (which sets the model
    attributes, using `self.device` and `self.dtype`) and `score(prompts, images)` (one batch, returns a 1-D tensor).
    Nothing is loaded before the first call, so rewards can be built before the accelerator is set up and cost
    nothing when unused. Weights that cannot be loaded raise a `WeightsNotFoundError` naming the reward, the setting,
    its value and how to pass a local directory instead.

    Args:
        device (`str` or `torch.device`, *optional*):
            Where the model runs. Defaults to the training device, `accelerate.PartialState().device`.
        dtype (`str` or `torch.dtype`, *optional*):
            Model dtype. Defaults to `torch.bfloat16` on CUDA and `torch.float32` elsewhere.
        batch_size (`int`, *optional*, defaults to `32`):
            Images scored per forward pass; lower it if the reward model runs out of memory next to the policy.
    """

    __name__ = "model_reward"
    weight_settings: tuple[str, ...] = ("model_id",)

    def __init__(
        self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None, batch_size: int = 32
    ):
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
        self.device = None if device is None else torch.device(device)
        if isinstance(dtype, str):  # recipes give dtypes by name
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"`dtype` must be a torch dtype or its name, e.g. 'bfloat16', got {dtype!r}.")
            dtype = getattr(torch, dtype)
        self.dtype = dtype
        self.batch_size = batch_size
        self._loaded = False

    def load(self) -> None:
        raise NotImplementedError

    def score(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, prompts: list[str], completions: list[Image.Image], **kwargs) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{self.__name__} got {len(prompts)} prompts but {len(completions)} images.")
        if not self._loaded:
            if self.device is None:
                self.device = PartialState().device
            if self.dtype is None:
                self.dtype = default_dtype(self.device)
            try:
                self.load()
            except WeightsNotFoundError as err:
                raise self._weights_error(err) from err
            self._loaded = True
        images = [image.convert("RGB") for image in completions]
        scores = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            with torch.no_grad():
                scores += self.score(prompts[start:stop], images[start:stop]).float().tolist()
        return scores

    def _weights_error(self, error: WeightsNotFoundError) -> WeightsNotFoundError:
        """`error`, naming this reward and the setting that pointed at the missing weights."""
        setting = next((name for name in self.weight_settings if getattr(self, name) == error.source), "model_id")
        how = (
            f"`get_reward({self.__name__!r}, {setting}='/path/to/dir')`, or in a recipe "
            f"`reward_kwargs: {{{self.__name__}: {{{setting}: /path/to/dir}}}}`"
        )
        return error.for_setting(f"The {self.__name__} reward", setting, how)
