"""What every model-backed reward shares: lazy loading on the training device, batched no-grad scoring, clear errors
when weights are missing, and one copy of each model per process."""

import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from accelerate import PartialState
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from PIL import Image


# Weak values: a model stays loaded while some reward uses it, so two rewards on the same checkpoint, device and dtype
# (`clip_score` and `aesthetic` both sit on CLIP ViT-L/14) share one copy, and nothing lingers once they are gone.
_SHARED_MODELS: "weakref.WeakValueDictionary[tuple, torch.nn.Module]" = weakref.WeakValueDictionary()


def load_shared(key: tuple, load: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Return the model cached under `key` (source, device, dtype, ...), calling `load()` only if there is none yet."""
    model = _SHARED_MODELS.get(key)
    if model is None:
        model = load()
        _SHARED_MODELS[key] = model
    return model


@contextmanager
def hub_errors(repo_id: str, filename: str | None = None) -> Iterator[None]:
    """Turn the hub's "not found / offline" errors into one that says what to download, chaining the original."""
    try:
        yield
    except (OSError, EntryNotFoundError, HFValidationError) as err:
        what = f"file '{filename}' of '{repo_id}'" if filename else f"'{repo_id}'"
        command = f"hf download {repo_id}" + (f" {filename}" if filename else "")
        raise OSError(
            f"Could not load the {what} from the Hugging Face Hub or the local cache ({type(err).__name__}). Reward "
            f"weights are downloaded on first use: with no network or HF_HUB_OFFLINE=1, cache them first on a machine "
            f"with hub access (`{command}`) and share that cache (HF_HOME), or pass a local directory instead of the "
            "hub id."
        ) from err


def hub_file(repo_id: str, filename: str) -> str:
    """Local path of `filename` in `repo_id`: a local directory, or a hub repo downloaded into the cache."""
    if os.path.isdir(repo_id):
        path = os.path.join(repo_id, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No file '{filename}' in the local directory '{repo_id}'.")
        return path
    with hub_errors(repo_id, filename):
        return hf_hub_download(repo_id, filename)


class ModelReward:
    """Base class of the rewards backed by a model, callable with TRL's reward signature.

    Subclasses set `__name__` (TRL names the metrics `rewards/{__name__}/mean`), implement `load()` (which sets the
    model attributes, using `self.device` and `self.dtype`) and `score(prompts, images)` (one batch, returns a 1-D
    tensor). Nothing is loaded before the first call, so rewards can be built before the accelerator is set up and
    cost nothing when unused.

    Args:
        device (`str` or `torch.device`, *optional*):
            Where the model runs. Defaults to the training device, `accelerate.PartialState().device`.
        dtype (`str` or `torch.dtype`, *optional*):
            Model dtype. Defaults to `torch.bfloat16` on CUDA and `torch.float32` elsewhere.
        batch_size (`int`, *optional*, defaults to `32`):
            Images scored per forward pass; lower it if the reward model runs out of memory next to the policy.
    """

    __name__ = "model_reward"

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
                self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self.load()
            self._loaded = True
        images = [image.convert("RGB") for image in completions]
        scores = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            with torch.no_grad():
                scores += self.score(prompts[start:stop], images[start:stop]).float().tolist()
        return scores
