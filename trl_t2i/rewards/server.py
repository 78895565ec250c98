"""The server side of [`~rewards.remote.RemoteReward`]: any reward with TRL's signature behind HTTP (Starlette on
uvicorn, the `serve` extra), so that a heavy reward runs in its own process, environment or machine.

    POST /score    {"prompts": [...], "images": [base64 PNG/JPEG, ...], "columns": {...}}  ->  {"rewards": [...]}
    GET  /health   {"reward": <name>, "status": "ok"}

One batch is scored at a time (reward models are not thread-safe); a malformed request gets HTTP 400, a reward that
fails or returns the wrong number of values HTTP 500, each with `{"error": ...}` saying why.
"""

import base64
import binascii
import io
import json
import logging
import math
import threading
from collections.abc import Callable

from PIL import Image, UnidentifiedImageError


try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
except ImportError as err:
    raise ImportError(
        'Serving a reward needs Starlette and uvicorn: `pip install "trl_t2i[serve]"` (or '
        "`pip install starlette uvicorn`)."
    ) from err


logger = logging.getLogger(__name__)


class BadRequest(ValueError):
    """A request that is not the protocol's JSON: answered with HTTP 400."""


def make_app(reward: Callable, name: str | None = None) -> Starlette:
    """A Starlette app that scores batches with `reward` at `POST /score` (see this module's docstring).

    Example:
        >>> app = make_app(get_reward("pickscore"))
        >>> uvicorn.run(app, host="0.0.0.0", port=8000)
    """
    name = name or getattr(reward, "__name__", type(reward).__name__)
    lock = threading.Lock()

    def score_batch(prompts: list[str], images: list[Image.Image], columns: dict) -> list[float | None]:
        with lock:
            rewards = list(reward(prompts, images, **columns))
        if len(rewards) != len(images):
            raise ValueError(f"the reward {name!r} returned {len(rewards)} values for {len(images)} images")
        return [None if value is None or math.isnan(value) else float(value) for value in rewards]

    async def score(request: Request) -> JSONResponse:
        try:
            prompts, images, columns = _read_batch(await request.body())
        except BadRequest as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        try:
            rewards = await run_in_threadpool(score_batch, prompts, images, columns)
        except Exception as err:  # the client's error message shows this, the server log the traceback
            logger.exception(f"The reward {name!r} failed on a batch of {len(images)} images.")
            return JSONResponse({"error": f"{type(err).__name__}: {err}"}, status_code=500)
        return JSONResponse({"rewards": rewards})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"reward": name, "status": "ok"})

    return Starlette(routes=[Route("/score", score, methods=["POST"]), Route("/health", health, methods=["GET"])])


def serve(reward: Callable, host: str = "127.0.0.1", port: int = 8000, name: str | None = None) -> None:
    """Serve `reward` until interrupted (uvicorn, one process)."""
    uvicorn.run(make_app(reward, name), host=host, port=port, log_level="info")


def _read_batch(body: bytes) -> tuple[list[str], list[Image.Image], dict]:
    """The prompts, decoded images and columns of a request body, or `BadRequest` saying what is wrong."""
    try:
        request = json.loads(body)
        prompts, encoded, columns = request["prompts"], request["images"], request.get("columns", {})
    except (ValueError, KeyError, TypeError):
        raise BadRequest('the body must be JSON {"prompts": [...], "images": [...], "columns": {...}}') from None
    if not (isinstance(prompts, list) and isinstance(encoded, list) and len(prompts) == len(encoded)):
        raise BadRequest("`prompts` and `images` must be lists of the same length")
    if not isinstance(columns, dict) or any(
        not isinstance(values, list) or len(values) != len(prompts) for values in columns.values()
    ):
        raise BadRequest("`columns` must map names to lists with one value per image")
    images = []
    for index, data in enumerate(encoded):
        try:
            image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
            image.load()
        except (binascii.Error, TypeError, ValueError, UnidentifiedImageError, OSError):
            raise BadRequest(f"image {index} is not a base64-encoded PNG or JPEG") from None
        images.append(image)
    return prompts, images, columns
