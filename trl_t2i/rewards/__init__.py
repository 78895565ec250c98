"""Reward functions with TRL's signature `f(prompts, completions, **kwargs) -> list[float | None]`.

`completions` are PIL images; `prompts` are the raw captions (not chat-templated). Unknown keyword arguments (other
dataset columns, TRL's `trainer_state`, `log_metric`, ...) are accepted and ignored. Pick rewards by name with
[`get_reward`]; rewards backed by a model load it on their first call.
"""

import importlib
import json
from collections.abc import Callable

from .base import ModelReward
from .clip import AestheticMLP, AestheticReward, CLIPScoreReward, PickScoreReward
from .colour import COLOUR_RGB, colour_match
from .compressibility import jpeg_compressibility, jpeg_incompressibility
from .hps import HPSv2Reward
from .ocr import OCRReward
from .remote import RemoteReward, RemoteRewardError


def _takes_no_arguments(reward: Callable) -> Callable[..., Callable]:
    """Factory of a weight-free reward function: returns it, and refuses arguments it could not use."""

    def factory(**kwargs) -> Callable:
        if kwargs:
            raise ValueError(f"The {reward.__name__} reward takes no arguments, got {sorted(kwargs)}.")
        return reward

    return factory


REWARDS: dict[str, Callable[..., Callable]] = {
    "clip_score": CLIPScoreReward,
    "pickscore": PickScoreReward,
    "hpsv2": HPSv2Reward,
    "aesthetic": AestheticReward,
    "ocr": OCRReward,
    "colour_match": _takes_no_arguments(colour_match),
    "jpeg_compressibility": _takes_no_arguments(jpeg_compressibility),
    "jpeg_incompressibility": _takes_no_arguments(jpeg_incompressibility),
}


def get_reward(name: str, /, **kwargs) -> Callable:
    """Build a reward from its registry name, the import path `package.module:attribute` of your own, or the URL of a
    reward server.

    Args:
        name (`str`):
            A key of [`REWARDS`] (`clip_score`, `pickscore`, `hpsv2`, `aesthetic`, `ocr`, `colour_match`,
            `jpeg_compressibility`, `jpeg_incompressibility`), or `package.module:attribute`, or a reward server's
            URL, `http(s)://host:port/path` or `remote:` followed by it (a [`RemoteReward`]). An imported class is
            instantiated with `kwargs`; an imported function (or other callable) is returned as is.
        **kwargs:
            Arguments of the reward's class, e.g. `device="cuda:1"` or `batch_size=8` (`name`, `timeout`, ... for a
            server).

    Returns:
        A callable with TRL's reward signature.

    Example:
        >>> get_reward("pickscore", batch_size=8)  # nothing is loaded before the first call
        <trl_t2i.rewards.clip.PickScoreReward object at 0x...>
        >>> get_reward("trl_t2i.rewards.colour:colour_match")
        <function colour_match at 0x...>
        >>> get_reward("http://gpu-node-3:8000/score", name="geneval", on_error="none")  # `trl-t2i serve_reward`
        <trl_t2i.rewards.remote.RemoteReward object at 0x...>
    """
    if name in REWARDS:
        return REWARDS[name](**kwargs)
    if name.startswith(("http://", "https://", "remote:")):
        return RemoteReward(name.removeprefix("remote:"), **kwargs)
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise ValueError(
            f"Unknown reward {name!r}. Use one of {', '.join(REWARDS)}, the import path of your own reward as "
            "'package.module:attribute', or a reward server's URL 'http://host:port/score'."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"Cannot import module {module_name!r} of the reward {name!r}: {err}") from err
    if not hasattr(module, attribute):
        raise ImportError(f"Module {module_name!r} has no attribute {attribute!r} (from the reward {name!r}).")
    reward = getattr(module, attribute)
    if isinstance(reward, type):
        return reward(**kwargs)
    if not callable(reward):
        raise ValueError(f"The reward {name!r} is a {type(reward).__name__}, not a function or a class.")
    if kwargs:
        raise ValueError(
            f"The reward {name!r} is a function, so it takes no arguments; got {sorted(kwargs)}. Make it a class to "
            "configure it."
        )
    return reward


def get_rewards(names: list[str], reward_kwargs: dict[str, dict] | str | None = None) -> list[Callable]:
    """Build several rewards with [`get_reward`], each with its own keyword arguments (the `reward_kwargs` of a
    recipe).

    Args:
        names (`list[str]`):
            Reward names, import paths or reward-server URLs, as `get_reward` takes them.
        reward_kwargs (`dict` or `str`, *optional*):
            Keyword arguments by reward name, e.g. `{"pickscore": {"model_id": "/models/PickScore_v1"}}`, or the same
            as a JSON string (a command-line flag). Every key must be one of `names`.

    Example:
        >>> get_rewards(["pickscore", "colour_match"], '{"pickscore": {"model_id": "/models/PickScore_v1"}}')
        [<trl_t2i.rewards.clip.PickScoreReward object at 0x...>, <function colour_match at 0x...>]
    """
    if isinstance(reward_kwargs, str):
        try:
            reward_kwargs = json.loads(reward_kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(
                "reward_kwargs must be a JSON object such as "
                f'\'{{"pickscore": {{"model_id": "/models/PickScore"}}}}\', '
                f"got {reward_kwargs!r} ({err})."
            ) from err
    reward_kwargs = reward_kwargs or {}
    if not isinstance(reward_kwargs, dict) or not all(isinstance(value, dict) for value in reward_kwargs.values()):
        raise ValueError(
            f"reward_kwargs must map reward names to their keyword arguments, e.g. "
            f"{{'pickscore': {{'model_id': '/models/PickScore'}}}}, got {reward_kwargs!r}."
        )
    unknown = sorted(set(reward_kwargs) - set(names))
    if unknown:
        raise ValueError(f"reward_kwargs names {unknown}, which are not among the rewards {list(names)}.")
    return [get_reward(name, **reward_kwargs.get(name, {})) for name in names]


__all__ = [
    "COLOUR_RGB",
    "REWARDS",
    "AestheticMLP",
    "AestheticReward",
    "CLIPScoreReward",
    "HPSv2Reward",
    "ModelReward",
    "OCRReward",
    "PickScoreReward",
    "RemoteReward",
    "RemoteRewardError",
    "get_reward",
    "get_rewards",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "colour_match",
]
