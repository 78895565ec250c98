"""The output directory of a training run: checked before the model loads, and held by one run at a time."""

import contextlib
import fcntl
import os
import shutil
import socket
import tempfile
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


LOCK_FILE = ".trl_t2i.lock"
"""Locked (`flock`) by the run writing into the directory, and naming it; the kernel unlocks it when the run ends."""

EARLIER_RUN_FILES = ("run_settings.json", "trainer_state.json", "adapter_model.safetensors", "model.safetensors")
"""Files at the top of an output directory that only a finished (or saved) run leaves there."""


def check_output_dir(output_dir: str | Path) -> None:
    """Raise if the run could not write `output_dir`: it, or a parent, is a file, or the nearest existing folder on
    its path is not writable (read-only file system, permissions). Tried by creating a file, as saving will."""
    path = Path(output_dir).absolute()
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise NotADirectoryError(
            f"output_dir {str(path)!r} cannot be created: {str(existing)!r} is a file. Choose another output_dir."
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise PermissionError(
            f"output_dir {str(path)!r} is not writable: creating a file in {str(existing)!r} failed "
            f"({error.strerror or error}). Choose another output_dir."
        ) from error


@contextlib.contextmanager
def claimed(output_dir: str | Path, *, new_run: bool, overwrite: bool = False):
    """For the block, `output_dir` is this run's: locked (`locked`), and for a new run free of an earlier run's
    outputs (`check_new_run`)."""
    with locked(output_dir):
        if new_run:
            check_new_run(output_dir, overwrite)
        yield


@contextlib.contextmanager
def locked(output_dir: str | Path):
    """Hold `output_dir`'s lock for the block (creating the folder): a second run into it fails at once, naming this
    one. The lock is released when the block ends, and by the kernel if the process dies."""
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / LOCK_FILE, "a+") as lock:  # "a+": the holder's name stays readable until we hold the lock
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "a process that did not record its name"
            raise RuntimeError(
                f"output_dir {str(path)!r} is in use by another run ({holder}). Wait for it to end, or choose "
                "another output_dir."
            ) from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        lock.flush()
        yield


def earlier_run_outputs(output_dir: str | Path) -> list[Path]:
    """The checkpoints, image grids (`samples/`) and saved files of an earlier run in `output_dir`."""
    path = Path(output_dir)
    if not path.is_dir():
        return []
    folders = sorted(folder for folder in path.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if folder.is_dir())
    if (path / "samples").is_dir():
        folders.append(path / "samples")
    return folders + [path / name for name in EARLIER_RUN_FILES if (path / name).is_file()]


def check_new_run(output_dir: str | Path, overwrite: bool) -> None:
    """A new run must not mix with an earlier run's outputs: refuse them, or with `overwrite` delete the earlier
    checkpoints (which resuming would take for this run's) and image grids, and let this run overwrite the rest."""
    earlier = earlier_run_outputs(output_dir)
    if earlier and not overwrite:
        names = ", ".join(path.name for path in earlier)
        raise FileExistsError(
            f"output_dir {str(output_dir)!r} holds an earlier run's outputs ({names}). Pass "
            "`--resume_from_checkpoint true` to continue that run from its latest checkpoint, "
            "`--overwrite_output_dir true` to start over (its checkpoints and image grids are deleted), or choose "
            "another output_dir."
        )
    for path in earlier:
        if path.is_dir():
            shutil.rmtree(path)
