"""Stopping a run cleanly on SIGTERM (cluster preemption) or SIGINT (Ctrl-C): a checkpoint, and how to resume."""

import contextlib
import ctypes
import os
import shlex
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from .hub import launch_command, started_by_launcher


SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(SystemExit):
    """Raised once the checkpoint is saved and the resume command printed: the process exits with 128 + the signal's
    number (143 for SIGTERM, 130 for Ctrl-C), the status a shell gives a process that a signal ended, so that
    `trl-t2i grpo ... && trl-t2i evaluate ...` or a scheduler never takes the unfinished run for a finished one."""

    def __init__(self, signum: signal.Signals, checkpoint: Path):
        super().__init__(128 + signum)
        self.signal, self.checkpoint = signum, checkpoint


class PreemptionCallback(TrainerCallback):
    """Ends training at the next step boundary after SIGTERM or SIGINT, saving a checkpoint to resume from.

    The signal handlers are installed for the duration of `catching_signals()` and restored after it. A second Ctrl-C
    stops at once (`KeyboardInterrupt`). Every process stops at the same step: the signal is reduced over the
    processes at each step end (a launcher may deliver it to each at a slightly different time, or to one only). At
    the end of training, the main process prints the command that resumes from the checkpoint (`resume_command`);
    `exit()` then ends the process with the signal's status (`Preempted`).

    ```python
    preemption = PreemptionCallback()
    trainer.add_callback(preemption)
    with preemption.catching_signals():
        trainer.train()
    if preemption.stopped_at is not None:
        preemption.exit()
    ```
    """

    def __init__(self):
        self.received: signal.Signals | None = None
        """The first signal received."""
        self.stopped_at: int | None = None
        """The step whose checkpoint was saved when training stopped for a signal."""
        self.checkpoint: Path | None = None
        """That checkpoint."""

    @contextlib.contextmanager
    def catching_signals(self):
        previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}
        stop_with_launcher()  # set again: a run may call `train` without `main` (Python users, the frontier sweep)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            # The run is over: its final save goes on even if the launcher is stopped meanwhile.
            stop_with_launcher(signal_number=0)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received is not None:  # Ctrl-C once stopping: stop at once
            raise KeyboardInterrupt
        if self.received is not None:  # SIGTERM again, or the launcher's end after a Ctrl-C: already stopping
            return
        self.received = signal.Signals(signum)
        # os.write, not print: a handler may run while `sys.stderr` is in the middle of a write (progress bars)
        again = " (Ctrl-C again: stop at once, without it)" if signum == signal.SIGINT else ""
        message = (
            f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping{again}.\n"
        )
        os.write(2, message.encode())

    def on_step_end(self, args, state, control, **kwargs):
        received = _on_any_process(self.received, args.device)
        if received is not None and state.global_step < state.max_steps:
            control.should_save = control.should_training_stop = True
            self.received, self.stopped_at = received, state.global_step
            self.checkpoint = Path(args.output_dir) / f"checkpoint-{self.stopped_at}"

    def on_train_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None and state.is_world_process_zero:
            print(f"\nStopped after step {self.stopped_at}, saved to {self.checkpoint}. Resume with:\n")
            print(f"  {resume_command(self.checkpoint)}")

    def exit(self):
        """End the process with 128 + the signal's number, after training stopped for it (`Preempted`)."""
        raise Preempted(self.received, self.checkpoint)


def _on_any_process(received: signal.Signals | None, device: torch.device) -> signal.Signals | None:
    """The signal any process received (the largest number), so that every process stops and exits alike."""
    if not (dist.is_available() and dist.is_initialized()):
        return received
    signum = torch.tensor([int(received or 0)], device=device)
    dist.all_reduce(signum, op=dist.ReduceOp.MAX)
    return signal.Signals(signum.item()) if signum.item() else None


PR_SET_PDEATHSIG = 1
"""`prctl` option (`<linux/prctl.h>`): the signal the kernel sends a process when its parent ends."""


def stop_with_launcher(signal_number: int = signal.SIGTERM) -> None:
    """Under a launcher (`accelerate launch`, `torchrun`), have the kernel send this process `signal_number` when the
    launcher ends (0: no longer). Linux only; elsewhere, and without a launcher, nothing changes.

    A single-process `accelerate launch` forwards no signal: SIGTERM (from `timeout`, a container stop, a scheduler)
    ends the launcher at once and would leave the run going on, orphaned, to its end. With this, the run gets
    SIGTERM when its launcher ends, however it ended: while training, it saves a checkpoint at the end of the step
    and stops (`PreemptionCallback`); while loading, it stops at once. A multi-process launcher (torch's elastic
    agent) forwards SIGTERM and SIGINT to its workers itself, and kills them 30 s later.
    """
    if sys.platform == "linux" and started_by_launcher():
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal_number, 0, 0, 0)


RESUME_REPLACES = ("--resume_from_checkpoint", "--overwrite_output_dir")
"""Options of the launch command that the resume command drops: its own, and one that would delete checkpoints."""


def resume_command(checkpoint: str | Path, argv: list[str] | None = None) -> str:
    """The command that started this run (`hub.launch_command`, or `argv`), resuming from `checkpoint`."""
    argv = shlex.split(launch_command()) if argv is None else argv
    kept, skip_value = [], False
    for index, arg in enumerate(argv):
        if skip_value:
            skip_value = False
        elif arg.split("=", 1)[0] in RESUME_REPLACES:
            # the option's value too, unless it is `--option=value` or a bare boolean flag
            skip_value = "=" not in arg and index + 1 < len(argv) and not argv[index + 1].startswith("--")
        else:
            kept.append(arg)
    return shlex.join([*kept, "--resume_from_checkpoint", str(Path(checkpoint).absolute())])
