"""Rewards served over HTTP: `trl-t2i serve_reward` started as a real process on 127.0.0.1, the tiny model trained
against it, and the faults a remote reward meets (server down at the start, killed mid-run, slow, wrong replies)."""

import asyncio
import base64
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import make_trainer
from PIL import Image
from transformers import TrainerCallback

from trl_t2i.rewards import RemoteReward, RemoteRewardError, colour_match, get_reward


pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
from starlette.applications import Starlette  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from trl_t2i.rewards.server import make_app  # noqa: E402


ROOT = Path(__file__).parents[1]
CAPTIONS = ["a red cat", "a blue car", "sky", "a green bird", "a photo of a yellow hat"]
FAST_RETRIES = {"retries": 1, "backoff": 0.01}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def images(count: int = len(CAPTIONS)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(count)]


class ServerProcess:
    """`trl-t2i serve_reward colour_match` in its own process on a free port of 127.0.0.1. A test may kill it;
    `url()` starts a new one when it is not running, so that test order does not matter."""

    def __init__(self, log_dir: Path):
        self.log_dir, self.process = log_dir, None

    def url(self) -> str:
        if self.process is None or self.process.poll() is not None:
            self._start()
        return f"{self.base}/score"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def _start(self) -> None:
        port = free_port()
        log_path = self.log_dir / f"server-{port}.log"
        pythonpath = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        command = [sys.executable, "-m", "trl_t2i.cli", "serve_reward", "colour_match", "--port", str(port)]
        self.process = subprocess.Popen(
            command,
            env={**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"},
            stdout=log_path.open("w"),
            stderr=subprocess.STDOUT,
        )
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"The reward server exited ({self.process.returncode}):\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=1) as response:
                    assert json.loads(response.read()) == {"reward": "colour_match", "status": "ok"}
                    return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"The reward server did not answer within 90 s:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One reward-server process for the module (see `ServerProcess`)."""
    server = ServerProcess(tmp_path_factory.mktemp("server"))
    yield server
    if server.process is not None:
        server.kill()


@contextmanager
def serving(app):
    """`app` on uvicorn in a thread of this process, on a free port of 127.0.0.1; yields its `/score` URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/score"
    finally:
        server.should_exit = True
        thread.join()


def replying(*replies):
    """A server whose n-th request gets `replies[n]` (the last one repeats): `(status, json, delay_s)`; it records
    the bodies it receives in `.requests`."""
    requests = []

    async def score(request):
        requests.append(json.loads(await request.body()))
        status, body, delay = replies[min(len(requests), len(replies)) - 1]
        await asyncio.sleep(delay)
        return JSONResponse(body, status_code=status)

    app = Starlette(routes=[Route("/score", score, methods=["POST"])])
    app.requests = requests
    return app


@pytest.mark.slow
def test_remote_scores_are_the_served_rewards(server):
    url = server.url()
    expected = colour_match(CAPTIONS, images())
    assert None in expected  # "sky" names no colour
    reward = get_reward(url, batch_size=2)  # three requests
    assert reward(CAPTIONS, images()) == expected  # PNG: the server scores the very pixels
    assert reward.__name__ == f"remote_127_0_0_1_{url.split(':')[-1].split('/')[0]}_score"


@pytest.mark.slow
def test_training_against_a_reward_server_logs_the_in_process_rewards(server, tmp_path):
    url = server.url()

    def logged_rewards(reward, output_dir):
        trainer = make_trainer(output_dir, reward=reward)
        trainer.train()
        return [log[f"rewards/{trainer.reward_func_names[0]}/mean"] for log in trainer.state.log_history[:-1]]

    remote = logged_rewards(get_reward(url, name="colour_remote"), tmp_path / "remote")
    assert len(remote) == 2 and all(0 < value < 1 for value in remote)
    assert remote == pytest.approx(logged_rewards(colour_match, tmp_path / "local"), abs=1e-6)


def test_a_server_down_at_the_start_is_an_error_naming_the_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/score"
    for on_error in ("raise", "none"):  # until the server has answered, failures raise whatever on_error says
        with pytest.raises(RemoteRewardError, match=f"at {url} .*connection refused.*2 attempts"):
            RemoteReward(url, on_error=on_error, **FAST_RETRIES)(CAPTIONS, images())
    trainer = make_trainer(tmp_path, reward=RemoteReward(url, **FAST_RETRIES))
    with pytest.raises(RemoteRewardError, match=f"at {url} .*connection refused"):
        trainer.train()
    assert trainer.state.global_step == 0


class KillAfterFirstStep(TrainerCallback):
    def __init__(self, server: ServerProcess):
        self.server = server

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.server.kill()


@pytest.mark.slow
def test_a_server_killed_mid_run_scores_none_with_on_error_none(server, tmp_path, caplog):
    url = server.url()
    reward = RemoteReward(url, name="colour_remote", on_error="none", **FAST_RETRIES)
    trainer = make_trainer(tmp_path, reward=reward, max_steps=3)
    trainer.add_callback(KillAfterFirstStep(server))
    with caplog.at_level(logging.WARNING, logger="trl_t2i.rewards.remote"):
        trainer.train()
    means = [log["rewards/colour_remote/mean"] for log in trainer.state.log_history[:-1]]
    assert 0 < means[0] < 1 and means[1:] == [None, None]  # the run went on without the reward
    assert f"at {url} could not score a batch of 8 images: connection refused" in caplog.text
    with pytest.raises(RemoteRewardError, match="connection refused"):
        RemoteReward(url, **FAST_RETRIES)(CAPTIONS, images())


def test_a_slow_server_is_retried_then_times_out():
    rewards = [0.5] * 3
    with serving(replying((200, {"rewards": rewards}, 1.0), (200, {"rewards": rewards}, 0.0))) as url:
        assert RemoteReward(url, timeout=0.3, **FAST_RETRIES)(CAPTIONS[:3], images(3)) == rewards  # 2nd attempt
    with serving(replying((200, {"rewards": rewards}, 1.0))) as url:
        with pytest.raises(RemoteRewardError, match=r"no answer within 0.3 s \(2 attempts\)"):
            RemoteReward(url, timeout=0.3, **FAST_RETRIES)(CAPTIONS[:3], images(3))


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ({"rewards": [0.5]}, "the reply has 1 rewards for 3 images"),
        ({"rewards": ["a", 0.5, None]}, "reward 0 of the reply is 'a', not a finite number or null"),
        ({"scores": [1, 2, 3]}, 'the reply is not {"rewards": \\[...\\]}'),
    ],
)
def test_a_malformed_reply_is_an_error_naming_the_url_and_the_reply(reply, message):
    app = replying((200, reply, 0.0))
    with serving(app) as url:
        with pytest.raises(RemoteRewardError, match=f"at {url} could not score a batch of 3 images: {message}"):
            RemoteReward(url, **FAST_RETRIES)(CAPTIONS[:3], images(3))
    assert len(app.requests) == 1  # a wrong reply is not sent again


def test_http_500_is_retried_then_named():
    app = replying((500, {"error": "CUDA out of memory"}, 0.0))
    with serving(app) as url:
        with pytest.raises(RemoteRewardError, match=r"HTTP 500: .*CUDA out of memory.* \(3 attempts\)"):
            RemoteReward(url, retries=2, backoff=0.01)(CAPTIONS[:3], images(3))
    assert len(app.requests) == 3


def test_on_error_none_scores_a_failed_batch_none_once_the_server_has_answered(caplog):
    with serving(replying((200, {"rewards": [0.1, 0.2]}, 0.0), (200, {"rewards": [0.1]}, 0.0))) as url:
        reward = RemoteReward(url, on_error="none", **FAST_RETRIES)
        assert reward(CAPTIONS[:2], images(2)) == [0.1, 0.2]
        with caplog.at_level(logging.WARNING, logger="trl_t2i.rewards.remote"):
            assert reward(CAPTIONS[:2], images(2)) == [None, None]
    assert "the reply has 1 rewards for 2 images" in caplog.text and "score None (on_error='none')" in caplog.text


@pytest.mark.parametrize("image_format", ["png", "jpeg"])
def test_requests_carry_the_captions_the_dataset_columns_and_the_images(image_format):
    app = replying((200, {"rewards": [1.0, None]}, 0.0))
    sent = images(2)
    columns = {"tag": ["colors", "counting"], "include": [[{"class": "cat"}], [{"class": "dog", "count": 2}]]}
    trl_kwargs = {"trainer_state": object(), "log_metric": print, "completion_ids": [[1, 2], [3, 4]]}
    with serving(app) as url:
        reward = RemoteReward(url, image_format=image_format)
        assert reward(CAPTIONS[:2], sent, **columns, **trl_kwargs) == [1.0, None]
    (request,) = app.requests
    assert request["prompts"] == CAPTIONS[:2] and request["columns"] == columns  # TRL's own arguments stay here
    received = [Image.open(io.BytesIO(base64.b64decode(data))) for data in request["images"]]
    assert [image.format for image in received] == [image_format.upper()] * 2
    if image_format == "png":
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(sent, received, strict=True))


def test_the_server_answers_reward_failures_and_bad_requests_with_their_reason():
    def failing(prompts, completions, **kwargs):
        raise ValueError("no detector for this class")

    def short(prompts, completions, **kwargs):
        return [0.5]

    with serving(make_app(failing)) as url:
        with pytest.raises(RemoteRewardError, match="HTTP 500: .*ValueError: no detector for this class"):
            RemoteReward(url, **FAST_RETRIES)(CAPTIONS[:2], images(2))
    with serving(make_app(short)) as url:
        with pytest.raises(RemoteRewardError, match="HTTP 500: .*the reward 'short' returned 1 values for 2 images"):
            RemoteReward(url, **FAST_RETRIES)(CAPTIONS[:2], images(2))
        for body, reason in [
            (b"not json", "the body must be JSON"),
            (json.dumps({"prompts": ["a"], "images": ["not base64!"]}).encode(), "image 0 is not a base64"),
            (json.dumps({"prompts": ["a", "b"], "images": []}).encode(), "lists of the same length"),
        ]:
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=5)
            assert error.value.code == 400 and reason in error.value.read().decode()


def test_the_server_passes_the_columns_to_the_reward():
    received = {}

    def by_tag(prompts, completions, tag, **kwargs):
        received.update(kwargs, tag=tag)
        return [float(value == "colors") for value in tag]

    with serving(make_app(by_tag)) as url:
        assert RemoteReward(url)(CAPTIONS[:2], images(2), tag=["colors", "position"]) == [1.0, 0.0]
    assert received == {"tag": ["colors", "position"]}


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        ("remote:ftp://host/score", {}, "needs an http\\(s\\) URL"),
        ("http://host:1/score", {"on_error": "ignore"}, "Unknown on_error 'ignore'.*'raise', 'none'"),
        ("http://host:1/score", {"image_format": "webp"}, "Unknown image_format 'webp'"),
        ("http://host:1/score", {"timeout": 0}, "timeout > 0"),
    ],
)
def test_bad_remote_settings_are_clear_errors(spec, kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_reward(spec, **kwargs)


def test_remote_prefix_and_reward_kwargs_name_the_reward():
    reward = get_reward("remote:http://gpu-node-3:8000/score", name="geneval", timeout=300)
    assert (reward.url, reward.__name__, reward.timeout) == ("http://gpu-node-3:8000/score", "geneval", 300)
