"""Rewards served by another process or machine over HTTP: a heavy reward (a GenEval detector, a VLM judge, HPSv2.1
on another GPU) runs in its own environment, `trl-t2i serve_reward` (or any server speaking the same JSON), and
training calls it with [`RemoteReward`].

The protocol, one request per batch of images:

    POST <url>   {"prompts": [str, ...], "images": [base64 PNG or JPEG, ...], "columns": {name: [value, ...], ...}}
    200          {"rewards": [float or null, ...]}      one per image, in order; null: the reward does not apply

`columns` holds the other dataset columns of the batch (one value per image, e.g. GenEval's `tag` and `include`).
"""

import base64
import http.client
import io
import json
import logging
import math
import re
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from PIL import Image


logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "none")
IMAGE_FORMATS = ("png", "jpeg")
JPEG_QUALITY = 95
SKIPPED_COLUMNS = ("completion_ids",)
"""Keyword arguments TRL passes that are not dataset columns worth sending (the image tokens)."""


class RemoteRewardError(RuntimeError):
    """A reward server that could not score a batch: the message names the URL and what came back."""


class _Retryable(Exception):
    """A failure that may pass (refused or dropped connection, time-out, HTTP 5xx/429): the batch is sent again."""


class RemoteReward:
    """A reward computed by a server: sends each batch of images (PNG or JPEG) with its captions and the other
    dataset columns, and gets one float or `None` per image (see this module's docstring for the protocol).

    A batch that fails (connection refused or dropped, no answer within `timeout`, HTTP 5xx or 429) is sent again up
    to `retries` times, waiting `backoff`, then 2×, 4×, ... that long in between. A reply that is not one number or
    null per image (wrong length, non-numbers, HTTP 4xx) is not retried. Then `on_error` decides: `"raise"` stops
    with a `RemoteRewardError` naming the URL and what came back; `"none"` logs that error and scores the batch's
    images `None`, so that training goes on without this reward while its server is away. Until the server has
    answered once, failures always raise: a server that is down at the start is a set-up error, not a transient one.

    Args:
        url (`str`):
            Where to POST, e.g. `"http://gpu-node-3:8000/score"` (`trl-t2i serve_reward` serves `/score`).
        name (`str`, *optional*):
            The reward's name in the logs (`rewards/<name>/mean`). Default: `remote_<host>_<port>_<path>`.
        batch_size (`int`, *optional*, defaults to `64`):
            Images per request.
        timeout (`float`, *optional*, defaults to `120.0`):
            Seconds to wait for the answer to one request.
        retries (`int`, *optional*, defaults to `3`):
            How many times a failed request is sent again.
        backoff (`float`, *optional*, defaults to `1.0`):
            Seconds before the first retry; doubled before each next one.
        on_error (`str`, *optional*, defaults to `"raise"`):
            What a batch that failed every attempt does: `"raise"` or `"none"` (its images score `None`).
        image_format (`str`, *optional*, defaults to `"png"`):
            `"png"` (lossless: the server scores the very pixels) or `"jpeg"` (quality 95, several times smaller).

    Example:
        >>> reward = RemoteReward("http://127.0.0.1:8000/score", name="pickscore")  # `trl-t2i serve_reward pickscore`
        >>> reward(["a red cat"], [Image.open("cat.png")])  # value for illustration
        [21.7]
    """

    def __init__(
        self,
        url: str,
        name: str | None = None,
        batch_size: int = 64,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        on_error: str = "raise",
        image_format: str = "png",
    ):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"A remote reward needs an http(s) URL such as 'http://host:8000/score', got {url!r}.")
        for setting, value, choices in (
            ("on_error", on_error, ON_ERROR),
            ("image_format", image_format, IMAGE_FORMATS),
        ):
            if value not in choices:
                raise ValueError(f"Unknown {setting} {value!r} for the remote reward {url}. Valid choices: {choices}.")
        if batch_size < 1 or timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(
                "A remote reward needs batch_size >= 1, timeout > 0, retries >= 0 and backoff >= 0, got "
                f"batch_size={batch_size}, timeout={timeout}, retries={retries}, backoff={backoff}."
            )
        self.url, self.batch_size, self.timeout = url, batch_size, timeout
        self.retries, self.backoff, self.on_error, self.image_format = retries, backoff, on_error, image_format
        self.__name__ = name or re.sub(
            r"[\W_]+", "_", f"remote {parts.hostname} {parts.port or ''} {parts.path}"
        ).strip("_")
        self.answered = False  # whether the server has scored a batch yet

    def __call__(self, prompts: list[str], completions: list[Image.Image], **kwargs) -> list[float | None]:
        if len(prompts) != len(completions):
            raise ValueError(f"{self.__name__} got {len(prompts)} prompts but {len(completions)} images.")
        columns = {
            name: values
            for name, values in kwargs.items()
            if name not in SKIPPED_COLUMNS and isinstance(values, list) and len(values) == len(prompts)
        }
        rewards = []
        for start in range(0, len(prompts), self.batch_size):
            batch = slice(start, start + self.batch_size)
            rewards += self._score_batch(
                prompts[batch], completions[batch], {name: values[batch] for name, values in columns.items()}
            )
        return rewards

    def _score_batch(self, prompts: list[str], images: list[Image.Image], columns: dict) -> list[float | None]:
        body = json.dumps(
            {"prompts": prompts, "images": [self._encode(image) for image in images], "columns": columns},
            default=_json_value,
        ).encode()
        attempts = 0
        while True:
            attempts += 1
            try:
                rewards = _parse_rewards(self._post(body), len(images))
                self.answered = True
                return rewards
            except _Retryable as err:
                if attempts <= self.retries:
                    time.sleep(self.backoff * 2 ** (attempts - 1))
                    continue
                problem = f"{err} ({attempts} attempts)"
            except RemoteRewardError as err:
                problem = str(err)
            error = RemoteRewardError(
                f"The remote reward {self.__name__!r} at {self.url} could not score a batch of {len(images)} images: "
                f"{problem}."
            )
            if self.on_error == "raise" or not self.answered:
                raise error
            logger.warning(f"{error} Its images score None (on_error='none').")
            return [None] * len(images)

    def _post(self, body: bytes) -> str:
        request = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read().decode()
        except urllib.error.HTTPError as err:
            detail = f"HTTP {err.code}: {err.read().decode(errors='replace').strip()[:300]}"
            if err.code >= 500 or err.code == 429:
                raise _Retryable(detail) from err
            raise RemoteRewardError(detail) from err
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, ConnectionRefusedError):
                raise _Retryable("connection refused (is the server running?)") from err
            if isinstance(reason, TimeoutError):
                raise _Retryable(f"no answer within {self.timeout} s") from err
            raise _Retryable(f"cannot reach the server ({reason})") from err
        except TimeoutError as err:  # raised while reading the answer
            raise _Retryable(f"no answer within {self.timeout} s") from err
        except (ConnectionError, http.client.HTTPException) as err:  # the server went away mid-request
            raise _Retryable(f"connection lost ({type(err).__name__}: {err})") from err

    def _encode(self, image: Image.Image) -> str:
        buffer = io.BytesIO()
        if self.image_format == "png":
            image.save(buffer, format="PNG")
        else:
            image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return base64.b64encode(buffer.getvalue()).decode("ascii")


def _parse_rewards(text: str, expected: int) -> list[float | None]:
    """The rewards of a reply: one number or null per image (NaN counts as null), else a `RemoteRewardError`."""
    try:
        rewards = json.loads(text)["rewards"]
    except (ValueError, KeyError, TypeError):
        raise RemoteRewardError(f'the reply is not {{"rewards": [...]}} but {text.strip()[:200]!r}') from None
    if not isinstance(rewards, list) or len(rewards) != expected:
        count = len(rewards) if isinstance(rewards, list) else "no list of"
        raise RemoteRewardError(f"the reply has {count} rewards for {expected} images: {text.strip()[:200]!r}")
    parsed = []
    for index, value in enumerate(rewards):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not (number and not math.isinf(value)):
            raise RemoteRewardError(f"reward {index} of the reply is {value!r}, not a finite number or null")
        parsed.append(None if value is None or math.isnan(value) else float(value))
    return parsed


def _json_value(value):
    """Dataset values JSON has no type for: numpy scalars and arrays become numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(
        f"A dataset column holds a {type(value).__name__}, which cannot be sent to a remote reward as JSON."
    )
