"""Frozen pretrained models that rewards and diversity metrics score with: one copy of each per process, and clear
errors when the weights are missing."""

import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from transformers import AutoConfig, PreTrainedModel


# Weak values: a model stays loaded while something uses it, so the rewards and diversity features on the same
# checkpoint, device and dtype (`clip_score`, `aesthetic` and CLIP features all sit on CLIP ViT-L/14) share one copy,
# and nothing lingers once they are gone.
_SHARED_MODELS: "weakref.WeakValueDictionary[tuple, torch.nn.Module]" = weakref.WeakValueDictionary()


def load_shared(key: tuple, load: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Return the model cached under `key` (source, device, dtype, ...), calling `load()` only if there is none yet."""
    model = _SHARED_MODELS.get(key)
    if model is None:
        model = load()
        _SHARED_MODELS[key] = model
    return model


def load_pretrained(
    model_class: type[PreTrainedModel], model_id: str, device: str | torch.device, dtype: torch.dtype
) -> PreTrainedModel:
    """A frozen `model_class.from_pretrained(model_id)` in eval mode, loaded once per (class, model, device, dtype).

    An auto class (`AutoModel`) is first resolved to the class it would load (`CLIPModel` for a CLIP checkpoint), so
    that a feature model asked for as `AutoModel` shares the copy a reward loaded as `CLIPModel`.

    Example:
        >>> load_pretrained(AutoModel, "openai/clip-vit-large-patch14", "cuda", torch.bfloat16) is load_pretrained(
        ...     CLIPModel, "openai/clip-vit-large-patch14", "cuda:0", torch.bfloat16
        ... )
        True
    """
    device = _canonical_device(device)
    if hasattr(model_class, "_model_mapping"):  # an auto class: the config type picks the concrete class
        with hub_errors(model_id):
            config = AutoConfig.from_pretrained(model_id)
        if type(config) not in model_class._model_mapping:
            raise ValueError(f"{model_class.__name__} cannot load {model_id!r}, a {config.model_type!r} model.")
        model_class = model_class._model_mapping[type(config)]

    def load():
        with hub_errors(model_id):
            model = model_class.from_pretrained(model_id, dtype=dtype)
        return model.to(device).eval().requires_grad_(False)

    return load_shared((model_class, model_id, device, dtype), load)


def default_device() -> str:
    """The device models run on unless told otherwise: `cuda` when there is one, else `cpu`. Asked when a device is
    chosen, never at import (CUDA is not initialised for a `--help`)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: torch.device) -> torch.dtype:
    """The dtype pretrained scorers run in unless told otherwise: bfloat16 on CUDA, float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _canonical_device(device: str | torch.device) -> torch.device:
    """`cuda` and `cuda:<current device>` are one place: give them one cache key."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class WeightsNotFoundError(OSError):
    """Weights that cannot be loaded from where a setting points: a local path that holds none, or a Hub id that is
    neither cached nor downloadable. `for_setting` names whose weights they are and the setting to change.

    Attributes:
        source: the local path or Hub id that was tried.
        filename: the file of `source` that was looked for, if one was.
        cause: what went wrong, in a few words (the original exception's type).
    """

    def __init__(self, source: str, filename: str | None = None, cause: str = "", owner: str = "", how: str = ""):
        self.source, self.filename, self.cause = source, filename, cause
        what = f"file '{filename}' of '{source}'" if filename else f"'{source}'"
        fix = f"Pass {how or 'a local directory holding the weights'}"
        if os.path.isdir(source):
            problem = f"the local directory holds no loadable weights ({cause})"
        elif source.startswith(("/", ".", "~")) or source.count("/") > 1:  # a path: Hub ids are `namespace/name`
            problem = "there is no such local directory"
        else:
            problem = f"it is not a local directory, nor on the Hugging Face Hub or in its local cache ({cause})"
            command = f"hf download {source}" + (f" {filename}" if filename else "")
            fix += (
                f", or cache them on a machine with Hub access (`{command}`) and share that cache (HF_HOME): with no "
                "network or HF_HUB_OFFLINE=1 nothing is downloaded"
            )
        self.message = f"{owner or 'Could not load'} {what}: {problem}. {fix}."
        super().__init__(self.message)

    def __str__(self) -> str:  # OSError would format its constructor's arguments as errno, strerror and filename
        return self.message

    def for_setting(self, owner: str, setting: str, how: str) -> "WeightsNotFoundError":
        """The same error, saying whose weights they are and how to point `setting` at a local directory.

        Example:
            >>> error.for_setting("The pickscore reward", "model_id", "reward_kwargs: {pickscore: {model_id: DIR}}")
            WeightsNotFoundError("The pickscore reward could not load its `model_id` 'yuvalkirstain/PickScore_v1': it
            is not a local directory, nor on the Hugging Face Hub or in its local cache (...). Pass `model_id` a local
            directory holding the weights (reward_kwargs: {pickscore: {model_id: DIR}}), or cache them ...")
        """
        return WeightsNotFoundError(
            self.source,
            self.filename,
            self.cause,
            owner=f"{owner} could not load its `{setting}`",
            how=f"`{setting}` a local directory holding the weights ({how})",
        )


@contextmanager
def hub_errors(repo_id: str, filename: str | None = None) -> Iterator[None]:
    """Turn the hub's "not found / offline" errors into a `WeightsNotFoundError` that says what to do, chaining the
    original."""
    try:
        yield
    except WeightsNotFoundError:
        raise
    except (OSError, EntryNotFoundError, HFValidationError, ValueError) as err:
        if type(err) is ValueError and not os.path.isdir(repo_id):
            raise  # from a local directory (AutoProcessor: "Unrecognized processing class") it means no weights
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise WeightsNotFoundError(repo_id, filename, f"{type(err).__name__}: {first_line:.200}") from err


def hub_file(repo_id: str, filename: str) -> str:
    """Local path of `filename` in `repo_id`: a local directory, or a hub repo downloaded into the cache."""
    if os.path.isdir(repo_id):
        path = os.path.join(repo_id, filename)
        if not os.path.isfile(path):
            raise WeightsNotFoundError(repo_id, filename, f"no file '{filename}' in it")
        return path
    with hub_errors(repo_id, filename):
        return hf_hub_download(repo_id, filename)
