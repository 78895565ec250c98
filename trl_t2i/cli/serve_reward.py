"""Serve a reward over HTTP, for training runs elsewhere to call as `reward_funcs: [http://<host>:<port>/score]`.

    trl-t2i serve_reward pickscore --port 8000                        # this machine only (127.0.0.1)
    CUDA_VISIBLE_DEVICES=1 trl-t2i serve_reward hpsv2 --host 0.0.0.0 --port 8001 \\
        --reward_kwargs '{"hpsv2": {"model_id": "/models/HPSv2"}}'
    trl-t2i serve_reward my_pkg.geneval:GenEvalReward --port 8002     # any reward of the registry or import path

The reward is built as `get_reward` builds it (a model reward on this process's default device), loads its weights
by scoring one blank image before the server starts listening (a failure there is only logged: some rewards need
dataset columns), then scores one batch at a time. The protocol is in `trl_t2i.rewards.remote`; the server is
`trl_t2i.rewards.server` (Starlette on uvicorn, the `serve` extra).
"""

import sys
from dataclasses import dataclass, field

from PIL import Image

from ..rewards import get_rewards
from .parsing import RecipeParser


@dataclass
class ServeRewardArguments:
    """Arguments of `trl-t2i serve_reward`; the reward may also be given first, without `--reward`."""

    reward: str = field(
        metadata={"help": "The reward to serve: a registry name (`trl_t2i.rewards.REWARDS`) or an import path."}
    )
    reward_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": 'Its keyword arguments, by its name: \'{"pickscore": {"model_id": "/models/PickScore"}}\'.'},
    )
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "Address to listen on: 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)."},
    )
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    warmup: bool = field(
        default=True, metadata={"help": "Score one blank image before listening, so that model weights load first."}
    )


class ServeRewardParser(RecipeParser):
    """`trl-t2i serve_reward <reward> ...`: a first argument that is not a flag is the reward."""

    def parse_args_and_config(self, args=None, *more, **kwargs):
        args = list(sys.argv[1:] if args is None else args)
        if args and not args[0].startswith("-"):
            args = ["--reward", *args]
        return super().parse_args_and_config(args, *more, **kwargs)


def make_parser() -> ServeRewardParser:
    return ServeRewardParser(ServeRewardArguments, usage="%(prog)s <reward> [--port N] [--option value ...]")


def main(args: ServeRewardArguments) -> None:
    from ..rewards.server import serve  # the `serve` extra: imported only to serve

    (reward,) = get_rewards([args.reward], args.reward_kwargs)
    if args.warmup:
        try:
            reward(["a photo"], [Image.new("RGB", (64, 64), "grey")])
        except Exception as err:  # a reward may need dataset columns a blank request lacks: it loads on a real one
            print(f"Warm-up call of {args.reward} failed ({type(err).__name__}: {err}); serving anyway.")
    print(f"Serving the reward {args.reward} at http://{args.host}:{args.port}/score")
    serve(reward, args.host, args.port)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
