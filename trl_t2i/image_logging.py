"""Captioned grids of the images sampled during training, written to `output_dir/samples/` and sent to the trackers."""

from collections import deque
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import TrainerCallback

from .images import make_grid, save_whole


class ImageGridCallback(TrainerCallback):
    """Keeps the most recent rollout images with their prompts and rewards, and turns them into a grid at the first
    optimizer step, every `every` steps and at the last step (so the model card's "end of training" grid is the last).

    The trainer feeds it with `add` on the main process, right after the rewards are computed.

    Args:
        every (`int`): optimizer steps between grids (`0` disables grids).
        count (`int`): images per grid (the most recent ones).
        columns (`int`): images per grid row.
        output_dir (`str`): grids go to `output_dir/samples/step_XXXXXX.png`.
        report_to (`list[str]`): trackers that receive the grid (`tensorboard`, `wandb`, `trackio`).
        callback_handler: the trainer's, to find TensorBoard's writer.
    """

    def __init__(self, every: int, count: int, columns: int, output_dir: str, report_to: list[str], callback_handler):
        self.every = every
        self.columns = columns
        self.directory = Path(output_dir) / "samples"
        self.report_to = report_to or []
        self.callback_handler = callback_handler
        self.recent: deque[tuple[Image.Image, str]] = deque(maxlen=count)
        self.last_logged_step: int | None = None

    def add(self, images: list[Image.Image], prompts: list[str], rewards: dict[str, list[float]]) -> None:
        """Remember images with captions: the prompt, then one `name=value` line per reward."""
        for index, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
            lines = [f"{name}={values[index]:.3f}" for name, values in rewards.items()]
            self.recent.append((image, "\n".join([prompt, *lines])))

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and (state.global_step == 1 or state.global_step % self.every == 0):
            self.log_grid(state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.every and self.last_logged_step != state.global_step:
            self.log_grid(state)

    def log_grid(self, state) -> None:
        if not state.is_world_process_zero or not self.recent:
            return
        images, captions = zip(*self.recent, strict=True)
        grid = make_grid(list(images), list(captions), columns=self.columns)
        self.directory.mkdir(parents=True, exist_ok=True)
        save_whole(grid, self.directory / f"step_{state.global_step:06d}.png")
        self.send_to_trackers("samples", grid, state.global_step)
        self.last_logged_step = state.global_step

    def send_to_trackers(self, tag: str, image: Image.Image, step: int) -> None:
        if "tensorboard" in self.report_to:
            for callback in self.callback_handler.callbacks:
                writer = getattr(callback, "tb_writer", None)
                if writer is not None:
                    writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
        if "wandb" in self.report_to:
            import wandb

            if wandb.run is not None:
                wandb.log({tag: wandb.Image(image)}, commit=False)
        if "trackio" in self.report_to:
            import trackio

            trackio.log({tag: trackio.Image(image)})
