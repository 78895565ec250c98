"""Seconds per stage of a training step (`time/<stage>`), without synchronising the GPU during the step."""

import contextlib
import time

import torch


class StageTimes:
    """Times the stages of a step (sampling, rewards, the loss, ...).

    On CUDA a stage is bracketed by two CUDA events in the current stream and read only at `flush` (when the trainer
    logs, once per `logging_steps`): the GPU's own clock, so the stage's kernels count, not just their launch, and
    nothing waits for the GPU in between. A stage's time then runs from when the stream reaches its start (after the
    work queued before it) to when it reaches its end, so consecutive stages add up to the step. Elsewhere, the wall
    time of the block.

    Args:
        device: the device the stages run on.
    """

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.pending: list[tuple[str, str, torch.cuda.Event, torch.cuda.Event]] = []
        self.finished: list[tuple[str, str, float]] = []

    @contextlib.contextmanager
    def time(self, stage: str, mode: str):
        """Time the block as `stage` of a `mode` ("train" or "eval") step."""
        if not self.cuda:
            start = time.perf_counter()
            yield
            self.finished.append((mode, stage, time.perf_counter() - start))
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.pending.append((mode, stage, start, end))

    def flush(self) -> list[tuple[str, str, float]]:
        """`(mode, stage, seconds)` of every stage timed since the last flush (waits for the last CUDA event)."""
        for mode, stage, start, end in self.pending:
            end.synchronize()
            self.finished.append((mode, stage, start.elapsed_time(end) / 1000))
        times, self.pending, self.finished = self.finished, [], []
        return times
