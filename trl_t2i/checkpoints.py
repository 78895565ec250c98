"""Checkpoints: written atomically, found and checked before a run resumes from one."""

import contextlib
import errno
import json
import os
import shutil
import zipfile
from pathlib import Path

from safetensors import safe_open
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    get_last_checkpoint,
    rotate_checkpoints,
    sort_checkpoints,
)

from . import trl_boundary as boundary


STAGING_DIR = ".checkpoint-staging"
"""Folder of the output directory where a checkpoint is written before it is renamed to `checkpoint-N`."""

DISK_FULL_BYTES = 1 << 20
"""A save that fails with less free space than this on the disk failed because the disk is full."""


def latest_checkpoint(output_dir: str | Path) -> str | None:
    """The latest `checkpoint-N` in `output_dir`; `None` when there is none, or no such directory."""
    return get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None


def resolve_resume(resume_from_checkpoint: str | bool | None, output_dir: str | Path) -> str | None:
    """The checkpoint a run resumes from, checked (`check_checkpoint`): `true` is the latest `checkpoint-N` in
    `output_dir`, a path is that checkpoint; `None`, `false`: none."""
    if str(resume_from_checkpoint).lower() in ("none", "false"):
        return None
    if str(resume_from_checkpoint).lower() != "true":
        checkpoint = str(resume_from_checkpoint)
    elif (checkpoint := latest_checkpoint(output_dir)) is None:
        raise FileNotFoundError(
            f"`--resume_from_checkpoint true` resumes from the latest checkpoint-N in output_dir {str(output_dir)!r}, "
            "but there is none. Pass the path of a checkpoint, or leave `--resume_from_checkpoint` out to start a "
            "new run."
        )
    check_checkpoint(checkpoint)
    return checkpoint


def check_checkpoint(checkpoint: str | Path) -> None:
    """Raise, naming the file and the other checkpoints, when a run cannot resume from `checkpoint`: it does not
    exist, has no trainer state, or holds a truncated or corrupt file (a crash or a full disk while it was written).
    Only headers and indexes are read: safetensors headers, the zip directory of `torch.save` files, JSON files."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist. {_others(path)}")
    if not (path / TRAINER_STATE_NAME).is_file():
        raise ValueError(f"Checkpoint {str(path)!r} has no {TRAINER_STATE_NAME}: it is incomplete. {_others(path)}")
    for file in sorted(path.rglob("*")):
        if file.is_file() and (problem := damage(file)):
            raise ValueError(
                f"Checkpoint file {str(file)!r} is damaged ({problem}), probably cut short while it was written. "
                f"{_others(path)}"
            )


def damage(file: Path) -> str | None:
    """Why `file` cannot be read back, or `None`: safetensors, `torch.save` (a zip archive) and JSON files. Only
    headers and indexes are read."""
    try:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt"):  # checks the header against the file's size
                pass
        elif file.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(file):  # the zip directory is at the end: a truncated file has none
                pass
        elif file.suffix == ".json":
            json.loads(file.read_text())
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def _others(checkpoint: Path) -> str:
    """The checkpoints next to `checkpoint`, and the one before it to resume from instead."""
    present = sort_checkpoints(str(checkpoint.parent)) if checkpoint.parent.is_dir() else []
    if not present:
        return f"There is no other checkpoint in {str(checkpoint.parent)!r}."
    listing = f"Checkpoints in {str(checkpoint.parent)!r}: {', '.join(Path(folder).name for folder in present)}."
    earlier = present[: present.index(str(checkpoint))] if str(checkpoint) in present else []
    return f"{listing} Resume from the previous one: `--resume_from_checkpoint {earlier[-1]}`." if earlier else listing


@contextlib.contextmanager
def staged(trainer, trial=None):
    """Let `trainer._save_checkpoint(model, trial)` write its `run_dir/checkpoint-N` into a staging folder, renamed to
    `checkpoint-N` once every process has written its part: a crash or a full disk never leaves a `checkpoint-N` that
    resuming would take for a complete one.

    transformers' `_save_checkpoint` is redirected into the staging folder for the block, without pushing
    (`trl_boundary.checkpoint_saved_into`); pushing, rotating old checkpoints and the recorded best checkpoint then use
    the final name.
    """
    run_dir, name = boundary.run_dir(trainer, trial), f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    checkpoint = os.path.join(run_dir, name)
    staging_dir = os.path.join(run_dir, STAGING_DIR)
    staged_checkpoint = os.path.join(staging_dir, name)
    writer = trainer.args.should_save
    if writer:
        shutil.rmtree(staging_dir, ignore_errors=True)  # left by a crash
    trainer.accelerator.wait_for_everyone()
    try:
        with boundary.checkpoint_saved_into(trainer, staging_dir):
            yield
    except Exception as error:
        disk_full = _disk_full(error, run_dir)  # before removing the partial checkpoint frees space
        if writer:
            shutil.rmtree(staging_dir, ignore_errors=True)
        if disk_full:
            message = f"no space left on device while saving {name} to {run_dir}; {_previous(run_dir)}"
            raise OSError(errno.ENOSPC, message) from error
        raise
    trainer.accelerator.wait_for_everyone()
    if writer:
        shutil.rmtree(checkpoint, ignore_errors=True)  # saved before, by a run resumed from an earlier checkpoint
        os.replace(staged_checkpoint, checkpoint)
        os.rmdir(staging_dir)
    if trainer.state.best_model_checkpoint == staged_checkpoint:
        trainer.state.best_model_checkpoint = checkpoint
        if writer:
            trainer.state.save_to_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
    if trainer.args.push_to_hub:
        boundary.push_checkpoint(trainer, checkpoint)
    if writer:
        rotate_checkpoints(run_dir, trainer.args.save_total_limit, trainer.state.best_model_checkpoint, use_mtime=True)


def _disk_full(error: Exception, path: str) -> bool:
    # torch.save reports a full disk as a RuntimeError ("unexpected pos ..."), safetensors as its own error type:
    # the free space tells.
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC) or shutil.disk_usage(
        path
    ).free < DISK_FULL_BYTES


def _previous(run_dir: str) -> str:
    last = latest_checkpoint(run_dir)
    return f"the previous checkpoint {last} is intact" if last else "no earlier checkpoint was saved"
