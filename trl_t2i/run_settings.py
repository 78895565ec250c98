"""What a training run was: its resolved settings, written by the trainer at every save as `run_settings.json` next to
the weights (the output directory and each `checkpoint-*` folder), and read by `trl-t2i evaluate`, `trl-t2i frontier`,
the model card and a run that resumes from a checkpoint (`check_resume`). Plain JSON, so reading a run never unpickles
`training_args.bin`."""

import inspect
import json
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from transformers import TrainerState
from transformers.trainer import TRAINER_STATE_NAME

from .sampling import SamplingConfig


RUN_SETTINGS_FILE = "run_settings.json"

REFUSED_AT_RESUME = ("base_model", "model_type", "lora")
"""Settings a run cannot resume under other values of: the checkpoint's weights and optimizer state are those of its
model and adapter (another family's modules do not match them), and another LoRA rank, scale or target would read its
adapter as another function. Any other change is named and recorded."""


@dataclass
class RunSettings:
    """The settings a run trained with, defaults filled in: enough to label, compare and describe it.

    Attributes:
        trl_t2i_version: version of trl_t2i that trained the run.
        base_model: Hub id or local path of the model the run started from.
        divergence: registry name of the penalty's f-divergence.
        divergence_params: the parameters of the divergence as it was built, defaults included (`{"alpha": 0.5}` for
            `alpha`, `{}` for the divergences without parameters).
        sampling: the distribution images were sampled from (guidance, temperature, top-k, top-p).
        reward_names: names of the reward functions, as TRL logs them (`rewards/<name>/mean`).
        reward_weights: their weights (1.0 each unless set).
        divergence_estimator, use_bias_correction_kl, beta, beta_schedule, beta_end, cfg_logprobs, loss_type,
        num_generations, learning_rate, max_steps, seed, per_device_train_batch_size, divergence_target,
        token_selection, dynamic_advantage, divergence_in, sampler_correction, sampler_correction_mode: as in
        `T2IGRPOConfig` (the last six default to their `T2IGRPOConfig` defaults when a file written before they were
        recorded is read).
        model_type: the model family (`config.model_type`); `None` in files written before it was recorded.
        lora: the LoRA adapter's `r`, `lora_alpha`, `target_modules`, `use_rslora` and `use_dora`; `None` for full
            fine-tuning (and in files written before it was recorded).
        resumes: the resumes under other settings: `{"step": N, "changes": {name: [before, after]}}` each, in order.
    """

    trl_t2i_version: str
    base_model: str
    divergence: str
    divergence_params: dict[str, float]
    divergence_estimator: str
    use_bias_correction_kl: bool
    beta: float
    beta_schedule: str
    beta_end: float | None
    sampling: SamplingConfig
    cfg_logprobs: str
    reward_names: list[str]
    reward_weights: list[float]
    loss_type: str
    num_generations: int
    learning_rate: float
    max_steps: int
    seed: int
    per_device_train_batch_size: int
    divergence_target: float | None = None
    token_selection: str = "all"
    dynamic_advantage: bool = False
    divergence_in: str = "loss"
    sampler_correction: bool = False
    sampler_correction_mode: str = "token_truncate"
    model_type: str | None = None
    lora: dict | None = None
    resumes: list[dict] = field(default_factory=list)

    @classmethod
    def from_trainer(cls, trainer) -> "RunSettings":
        """The settings of a `T2IGRPOTrainer`, read from what it built (its divergence, its reward weights)."""
        from . import __version__  # the package imports the trainer, which imports this module, before the version

        args, divergence = trainer.args, trainer.divergence
        built = {
            "trl_t2i_version": __version__,
            "base_model": trainer._base_model_id,
            "divergence_params": {
                name: getattr(divergence, name) for name in inspect.signature(type(divergence)).parameters
            },
            "reward_names": list(trainer.reward_func_names),
            "reward_weights": trainer.reward_weights.tolist(),
            "model_type": trainer.family.model_type,
            "lora": _lora(trainer.model),
            "resumes": trainer.resumes,
        }
        # Every other field is the `T2IGRPOConfig` field (or property, `sampling`) of the same name.
        return cls(
            **built, **{field.name: getattr(args, field.name) for field in fields(cls) if field.name not in built}
        )

    def save(self, directory: str | Path) -> Path:
        """Write `directory/run_settings.json`; returns its path."""
        path = Path(directory) / RUN_SETTINGS_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "RunSettings":
        """Read `directory/run_settings.json`, with an error naming the file when it is missing or malformed."""
        path = Path(directory) / RUN_SETTINGS_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"No {path}: T2IGRPOTrainer writes it into the output directory and every checkpoint folder when it "
                "saves a run. Point at one of those."
            )
        try:
            data = json.loads(path.read_text())
            return cls(**{**data, "sampling": SamplingConfig(**data["sampling"])})
        except (ValueError, TypeError, KeyError) as error:
            expected = ", ".join(field.name for field in fields(cls))
            raise ValueError(
                f"{path} is not a valid run settings file ({type(error).__name__}: {error}). It was edited or written "
                f"by another version of trl_t2i; this version reads the fields {expected}."
            ) from error

    def changes_to(self, other: "RunSettings") -> dict[str, list]:
        """`{name: [ours, other's]}` for every setting `other` has another value of (not the resume history); a
        setting made of several (`sampling`, `lora`) by its parts, as `sampling.cfg_scale`."""
        ours, theirs = asdict(self), asdict(other)
        return dict(
            change for name in ours if name != "resumes" for change in _changes(name, ours[name], theirs[name])
        )


def check_resume(checkpoint: str | Path, current: RunSettings) -> list[dict]:
    """Compare the settings a checkpoint was trained with to those of the run resuming from it: refuse the changes of
    `REFUSED_AT_RESUME`, warn naming every other, and return the run's resume history with this resume's changes.

    Settings missing from an older `run_settings.json` (or the whole file) cannot be compared and are not.
    """
    saved = _saved(checkpoint)
    if saved is None:
        warnings.warn(f"{checkpoint} has no {RUN_SETTINGS_FILE}: its settings cannot be compared.", stacklevel=2)
        return []
    changes = {
        name: change
        for name, change in saved.changes_to(current).items()
        if change[0] is not None or name not in ("model_type", "lora")  # not recorded when it was written
    }
    refused = {name: change for name, change in changes.items() if name.split(".")[0] in REFUSED_AT_RESUME}
    if refused:
        raise ValueError(_refusal(checkpoint, refused))
    if not changes:
        return saved.resumes
    step = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME)).global_step
    listed = "; ".join(f"{name}: {before!r} → {after!r}" for name, (before, after) in changes.items())
    warnings.warn(
        f"Resuming from {checkpoint} (step {step}) with other settings than it was trained with: {listed}. The run "
        f"goes on with the new ones; its {RUN_SETTINGS_FILE} and model card record the change.",
        stacklevel=2,
    )
    return [*saved.resumes, {"step": step, "changes": changes}]


def check_resume_model(checkpoint: str | Path, base_model: str, model_type: str) -> None:
    """Refuse to resume a checkpoint of another model or family, from what is known before any model loads."""
    saved = _saved(checkpoint)
    if saved is None:
        return
    changes = {"base_model": [saved.base_model, base_model], "model_type": [saved.model_type, model_type]}
    refused = {name: (before, after) for name, (before, after) in changes.items() if before not in (None, after)}
    if refused:
        raise ValueError(_refusal(checkpoint, refused))


def _changes(name: str, before, after) -> list[tuple[str, list]]:
    """`(name, [before, after])` if a setting changed; a dict-valued one (`sampling`, `lora`) by its keys."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [
            change for key in before | after for change in _changes(f"{name}.{key}", before.get(key), after.get(key))
        ]
    return [] if before == after else [(name, [before, after])]


def _saved(checkpoint: str | Path) -> RunSettings | None:
    return RunSettings.load(checkpoint) if (Path(checkpoint) / RUN_SETTINGS_FILE).is_file() else None


def _refusal(checkpoint: str | Path, refused: dict) -> str:
    listed = "; ".join(f"{name} {before!r}, not {after!r}" for name, (before, after) in refused.items())
    return (
        f"Cannot resume from {checkpoint}: it was trained with {listed}. Its weights and optimizer state belong to "
        "that model and adapter: resume with the settings it was trained with, or start a new run in another "
        "output_dir."
    )


def _lora(model) -> dict | None:
    """The settings of the LoRA adapter being trained, `None` without one."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return None
    targets = config.target_modules
    return {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
    }
