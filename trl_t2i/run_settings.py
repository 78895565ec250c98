"""What a training run was: its resolved settings, written by the trainer at every save as `run_settings.json` next to
the weights (the output directory and each `checkpoint-*` folder), and read by `trl-t2i evaluate`, `trl-t2i frontier`
and the model card. Plain JSON, so reading a run never unpickles `training_args.bin`."""

import inspect
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .sampling import SamplingConfig


RUN_SETTINGS_FILE = "run_settings.json"


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
