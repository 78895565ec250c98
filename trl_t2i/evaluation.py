"""Evaluate a base text-to-image model and trained runs on reward and diversity, and draw the reward–diversity
frontier.

Every run (and the base model) samples `num_images_per_prompt` images for each prompt with the same noise: the
sampler's generator for prompt `i` is seeded from `(seed, i)`, and the sampling distribution (one `SamplingConfig`) is
the same for all, so runs differ only by their weights. Each image is scored with every reward; each prompt's group of
images gets every diversity metric of `trl_t2i.metrics.diversity_summary` (image features: the weight-free
`pixel_features`, or CLIP/DINOv2 through `ImageFeatureModel`). `evaluate_runs` writes to its `output_dir`:

- `per_image.csv`: run, prompt, image index and each reward;
- `per_prompt.csv`: run, prompt, mean and standard deviation of each reward, and every diversity metric;
- `summary.csv`, `summary.json`: one row per run (label, divergence, β, ...): the mean over prompts of every
  per-prompt column and its standard error over prompts (`<column>_sem`);
- `grid_<run>.png`: the images of the first `grid_prompts` prompts, one row per prompt;
- `frontier.png`: reward against diversity, one point per run with standard-error bars, labelled by divergence and β;
- with `save_images`, `images/<run>/`: every image as a PNG (`trl_t2i.benchmarks.write_plain`); with
  `geneval_metadata`, `geneval/<run>/`: the layout GenEval's scorer reads (`trl_t2i.benchmarks.write_geneval`).

A run (`read_run`) is a training output directory, one of its checkpoints, a PEFT adapter directory or a full model
directory; the `run_settings.json` that training writes gives its divergence and β. The base model is loaded once;
each adapter is attached to it, evaluated and detached again.
"""

import contextlib
import csv
import itertools
import json
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from tqdm.auto import tqdm

from .benchmarks import write_geneval, write_plain
from .checkpoints import damage, latest_checkpoint
from .data import check_prompts_fit
from .decoding import compile_setting, resolve_compile, sample_image_tokens
from .images import make_grid, to_pil
from .merged_adapters import merged_adapters, why_not_mergeable
from .metrics import ImageFeatureModel, diversity_summary, pixel_features, token_entropy
from .models import get_family, load_adapter, load_config, load_family, load_model
from .pretrained import default_device
from .run_settings import RUN_SETTINGS_FILE, RunSettings
from .sampling import SamplingConfig, image_logp_table


DIVERSITY_METRICS = ("pairwise_distance", "vendi", "token_entropy", "token_hamming", "codebook_usage")
"""Per-prompt diversity columns, in the order of `trl_t2i.metrics.diversity_summary`'s documentation."""

TRAINING_COLUMNS = ("divergence", "beta", "beta_schedule", "beta_end", "divergence_estimator")
"""How each run was trained, as summary columns (empty for the base model and runs without `run_settings.json`)."""

BASE = "base"
"""Label of the base model (reserved: a run cannot use it)."""


@dataclass
class EvaluationSettings:
    """How runs are evaluated, besides the sampling distribution. Each field is also a flag of `trl-t2i evaluate`."""

    num_images_per_prompt: int = field(
        default=8, metadata={"help": "Images sampled per prompt (k >= 2: diversity compares images of one prompt)."}
    )
    feature_model: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local path of the image model (CLIP, DINOv2) whose features measure diversity; "
            "default: the weight-free `pixel_features` (colour histogram and layout)."
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seed; prompt i is sampled with a generator seeded from (seed, i)."}
    )
    grid_prompts: int = field(default=4, metadata={"help": "Prompts shown in each run's image grid (0: no grids)."})
    save_images: bool = field(
        default=False,
        metadata={
            "help": "Also write every image as `images/<run>/<prompt>_<image>.png` with `prompts.jsonl`, for scorers "
            "that read a folder of images (FID tools, DPG-Bench, T2I-CompBench)."
        },
    )
    frontier_x: str | None = field(
        default=None,
        metadata={"help": "Per-prompt column on the frontier's x axis (default: the first reward's mean)."},
    )
    frontier_y: str = field(
        default="pairwise_distance",
        metadata={
            "help": f"Per-prompt column on the frontier's y axis; diversity metrics: {', '.join(DIVERSITY_METRICS)}."
        },
    )
    dtype: str = field(default="float32", metadata={"help": "Model dtype: float32, bfloat16 or float16."})
    device: str | None = field(default=None, metadata={"help": "Device (default: cuda when available, else cpu)."})
    compile: str = field(
        default="auto",
        metadata={
            "help": "Decode with a static KV cache and a torch.compile'd step, compiled once for every run: `auto` "
            "(on CUDA), `true` or `false`."
        },
    )

    def __post_init__(self):
        self.device = self.device or default_device()
        self.compile = compile_setting(self.compile)
        if self.num_images_per_prompt < 2:
            raise ValueError(
                "num_images_per_prompt must be >= 2 (diversity compares the images of one prompt), got "
                f"{self.num_images_per_prompt}."
            )
        if self.grid_prompts < 0:
            raise ValueError(f"grid_prompts must be >= 0 (0: no grids), got {self.grid_prompts}.")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"Unknown dtype {self.dtype!r}. Valid choices: float32, bfloat16, float16.")


WEIGHTS = {
    "peft": ("adapter_model.safetensors", "adapter_model.bin"),
    "full": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"),
}
"""The weight files of a PEFT adapter and of a full model directory; one of them must be there."""

TRAINING_OUTPUT_FILES = ("trainer_state.json", "training_args.bin")
"""Files that only a training run writes: a directory holding one is a training output."""


@dataclass
class Run:
    """One model to evaluate: the base (`path=None`), a PEFT adapter or a full model, and how it was trained."""

    label: str
    path: Path | None = None
    kind: str = "base"  # "base", "peft" or "full"
    settings: RunSettings | None = None  # None for the base model and directories without run_settings.json
    model_type: str | None = None  # the family it belongs to, where its files say (None: unknown)


@dataclass
class Samples:
    """One run's images for every prompt: PIL images, their tokens `(k, N)` and their token entropies `(k,)`."""

    images: list[list[Image.Image]]
    tokens: list[torch.Tensor]
    entropies: list[torch.Tensor]


def evaluate_runs(
    model_name_or_path: str,
    runs: list[Run],
    prompts: list[str],
    reward_funcs: list[Callable],
    output_dir: str | Path,
    sampling: SamplingConfig | None = None,
    settings: EvaluationSettings | None = None,
    geneval_metadata: list[str] | None = None,
) -> list[dict]:
    """Evaluate every run on the same prompts and noise, write the tables and figures, and return the summary rows.

    Args:
        model_name_or_path: Hub id or local path of the base model that the runs were trained from.
        runs: the models to compare (`Run(BASE)` for the base model itself, `read_run(...)` for trained ones).
        prompts: the captions to evaluate on.
        reward_funcs: rewards with TRL's signature (`trl_t2i.rewards.get_reward`); their `__name__` names the columns.
        output_dir: where the tables and figures are written.
        sampling: the distribution every run samples from (default: `SamplingConfig()`).
        settings: images per prompt, seed, feature model, frontier axes, dtype and device.
        geneval_metadata: GenEval's metadata line of each prompt (`trl_t2i.benchmarks.read_geneval_metadata`): each
            run's images are also written in GenEval's layout, under `geneval/<run>/`.
    """
    sampling, settings = sampling or SamplingConfig(), settings or EvaluationSettings()
    reward_names = [reward.__name__ for reward in reward_funcs]
    columns = metric_columns(reward_names)
    frontier_x, frontier_y = check_inputs(runs, prompts, reward_names, sampling, settings)
    if geneval_metadata is not None and len(geneval_metadata) != len(prompts):
        raise ValueError(f"{len(geneval_metadata)} GenEval metadata lines for {len(prompts)} prompts: one per prompt.")
    for run in runs:
        check_base_model(run, model_name_or_path)
    family = load_family(model_name_or_path)  # its config and processor: the prompts are checked before any weights
    check_prompts_fit(prompts, family, "The evaluation prompts")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    base_model = load_model(model_name_or_path, dtype=getattr(torch, settings.dtype)).to(settings.device).eval()
    family = get_family(base_model, family.processing_class)
    family.patch_forward(base_model)  # teacher-forced log-probs, for the policy's token entropy
    # Held for the whole evaluation: a feature model is loaded once (and shared with a reward on the same checkpoint).
    if settings.feature_model:
        extract_features = ImageFeatureModel(settings.feature_model, settings.device)
    else:
        extract_features = pixel_features

    per_image, per_prompt = [], []
    for run in runs:
        model = attach_run(base_model, family, run, settings, model_name_or_path)
        samples = generate(family, model, prompts, sampling, settings, run.label)
        image_rows, prompt_rows = score(
            run.label, prompts, samples, reward_funcs, extract_features, family.codebook_size
        )
        per_image += image_rows
        per_prompt += prompt_rows
        if settings.grid_prompts > 0:
            grid_path = output_dir / f"grid_{file_name(run.label)}.png"
            save_grid(samples.images[: settings.grid_prompts], image_rows, reward_names[0], grid_path)
        if settings.save_images:
            write_plain(output_dir / "images" / file_name(run.label), prompts, samples.images)
        if geneval_metadata is not None:
            write_geneval(output_dir / "geneval" / file_name(run.label), geneval_metadata, samples.images)
        if run.kind == "peft":
            model.unload()  # removes the LoRA layers: `base_model` is the base model again
        del model, samples

    summary = summarise(runs, per_prompt, columns)
    write_csv(output_dir / "per_image.csv", per_image)
    write_csv(output_dir / "per_prompt.csv", per_prompt)
    write_csv(output_dir / "summary.csv", summary)
    record = {
        "model_name_or_path": model_name_or_path,
        "rewards": reward_names,
        "sampling": asdict(sampling),
        **{setting.name: getattr(settings, setting.name) for setting in fields(EvaluationSettings)},
        "prompts": prompts,
    }
    (output_dir / "summary.json").write_text(json.dumps({"settings": record, "runs": nan_to_none(summary)}, indent=2))
    plot_frontier(summary, frontier_x, frontier_y, output_dir / "frontier.png")
    return summary


def read_run(spec: str) -> Run:
    """`path` or `label=path` to a `Run`, with how it was trained read from the run's `run_settings.json`.

    Checked before any model loads: the directory holds an adapter or a model whose files can be read back, and a
    training output its `run_settings.json` (a directory of weights saved otherwise is evaluated unlabelled).
    """
    label, path = None, spec
    if "=" in spec and not Path(spec).exists():
        label, path = spec.split("=", 1)
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"Run {spec!r}: {str(path)!r} is not a directory. Pass a training output directory, a PEFT adapter "
            "directory or a full model directory, optionally as `label=path` (download Hub adapters first: "
            "`hf download <repo_id> --local-dir <dir>`)."
        )
    kind = "peft" if (path / "adapter_config.json").is_file() else "full" if (path / "config.json").is_file() else None
    if kind is None:
        raise FileNotFoundError(f"Run {spec!r}: {_no_weights(path)}")
    _check_run_files(spec, path, kind)
    training_output = any((path / name).is_file() for name in TRAINING_OUTPUT_FILES)
    if training_output and not (path / RUN_SETTINGS_FILE).is_file():
        raise FileNotFoundError(
            f"Run {spec!r}: {path / RUN_SETTINGS_FILE} is missing, which T2IGRPOTrainer writes with every save of a "
            "run (its divergence, β and sampling label the run). Copy it from one of the run's checkpoints, or point "
            "at a checkpoint that has it."
        )
    # Weights saved outside `T2IGRPOTrainer` have no settings: they are evaluated all the same, unlabelled.
    settings = RunSettings.load(path) if (path / RUN_SETTINGS_FILE).is_file() else None
    return Run(label or path.name, path, kind, settings, _model_type(path, kind, settings))


def _no_weights(path: Path) -> str:
    """Why `path` holds no adapter or model: an unfinished training run (naming its latest checkpoint), or nothing."""
    latest = latest_checkpoint(path)
    if latest is not None:
        return (
            f"{str(path)!r} holds no final weights: its training did not finish. Evaluate its latest checkpoint "
            f"({latest}), or resume the training (`--resume_from_checkpoint true`) first."
        )
    return (
        f"{str(path)!r} holds neither a PEFT adapter (adapter_config.json) nor a model (config.json). Point at the "
        "`output_dir` of a finished training or at one of its `checkpoint-*` folders."
    )


def _check_run_files(spec: str, path: Path, kind: str) -> None:
    """The run's weights are there, and none of its files is cut short or corrupt (headers and indexes only)."""
    if not any((path / name).is_file() for name in WEIGHTS[kind]):
        raise FileNotFoundError(
            f"Run {spec!r}: {str(path)!r} has {'adapter_config.json' if kind == 'peft' else 'config.json'} but no "
            f"weights ({' or '.join(WEIGHTS[kind])}): it was not saved completely."
        )
    for file in sorted(path.iterdir()):  # run_settings.json: `RunSettings.load` says what is wrong with it
        if file.is_file() and file.name != RUN_SETTINGS_FILE and (problem := damage(file)):
            raise ValueError(
                f"Run {spec!r}: {file} is damaged ({problem}): it cannot be read back (cut short while it was "
                "written or copied?)."
            )


def _model_type(path: Path, kind: str, settings: RunSettings | None) -> str | None:
    """The family of a run's weights: a full model's config, else the run's settings, else the base model named by
    the adapter's config when that is a local directory; `None` when none says."""
    if kind == "full":
        return json.loads((path / "config.json").read_text()).get("model_type")
    if settings is not None and settings.model_type is not None:
        return settings.model_type
    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    base_config = Path(base) / "config.json" if base else None
    return json.loads(base_config.read_text()).get("model_type") if base_config and base_config.is_file() else None


def check_base_model(run: Run, model_name_or_path: str) -> None:
    """Refuse a run of another model family than the base model (its adapter would not fit), before any model
    loads (the base model's config is read); warn when it was trained from another base model of the family."""
    if run.kind == "base":
        return
    base_type = load_config(model_name_or_path).model_type
    trained_from = f" (`--model_name_or_path {run.settings.base_model}`)" if run.settings else ""
    if run.model_type is not None and run.model_type != base_type:
        raise ValueError(
            f"Run {run.label!r} ({run.path}) is {'an adapter' if run.kind == 'peft' else 'a model'} of the "
            f"{run.model_type!r} family, but the base model {model_name_or_path!r} is a {base_type!r} model: "
            f"evaluate it with the base model it was trained from{trained_from}."
        )
    if run.kind == "peft" and run.settings is not None and run.settings.base_model != model_name_or_path:
        warnings.warn(
            f"Run {run.label!r} was trained from {run.settings.base_model!r} and is evaluated on "
            f"{model_name_or_path!r}.",
            stacklevel=2,
        )


def metric_columns(reward_names: list[str]) -> list[str]:
    """Numeric columns of `per_prompt.csv`: the mean and std of every reward, then every diversity metric."""
    return [f"{name}_{stat}" for name in reward_names for stat in ("mean", "std")] + list(DIVERSITY_METRICS)


def check_inputs(
    runs: list[Run],
    prompts: list[str],
    reward_names: list[str],
    sampling: SamplingConfig,
    settings: EvaluationSettings,
) -> tuple[str, str]:
    """Catch bad inputs before any model is loaded; returns the frontier's x and y columns."""
    if not runs:
        raise ValueError("Nothing to evaluate: pass at least one run (or the base model).")
    if not prompts:
        raise ValueError("No prompts to evaluate on.")
    labels = [run.label for run in runs]
    if any(run.label == BASE and run.kind != "base" for run in runs):
        raise ValueError(f"The label {BASE!r} is reserved for the base model; relabel the run as `label=path`.")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"Runs share the labels {duplicates}: name them apart as `label=path`.")
    if len(set(reward_names)) < len(reward_names):
        raise ValueError(f"Two rewards share a name: {reward_names}. Each reward needs its own column.")
    for run in runs:
        if run.settings is not None and run.settings.sampling != sampling:
            warnings.warn(
                f"Run {run.label!r} was trained with {run.settings.sampling} and is evaluated with {sampling} (all "
                "runs are sampled alike).",
                stacklevel=3,
            )
    return frontier_axes(settings.frontier_x, settings.frontier_y, reward_names)


def frontier_axes(frontier_x: str | None, frontier_y: str, reward_names: list[str]) -> tuple[str, str]:
    """The frontier's x and y columns: `frontier_x` (a reward's name stands for its mean; default: the first reward's
    mean) and `frontier_y`, each checked to be a per-prompt column."""
    columns = metric_columns(reward_names)
    frontier_x = frontier_x or f"{reward_names[0]}_mean"
    if frontier_x in reward_names:
        frontier_x = f"{frontier_x}_mean"
    for name, value in (("frontier_x", frontier_x), ("frontier_y", frontier_y)):
        if value not in columns:
            raise ValueError(f"Unknown {name} column {value!r}. Valid choices: {', '.join(columns)}.")
    return frontier_x, frontier_y


def attach_run(
    base_model: torch.nn.Module, family, run: Run, settings: EvaluationSettings, model_name_or_path: str
) -> torch.nn.Module:
    """The model of `run`: the base, the base with the run's LoRA layers (undone by `unload()`), or a full model."""
    if run.kind == "base":
        return base_model
    if run.kind == "peft":
        what = f"Run {run.label!r} (the adapter {str(run.path)!r})"
        return load_adapter(base_model, str(run.path), model_name_or_path, what).eval()
    model = load_model(str(run.path), dtype=getattr(torch, settings.dtype)).to(settings.device).eval()
    family.patch_forward(model)  # a full fine-tune is of the base model's family
    return model


def prompt_generator(seed: int, prompt_index: int, device: str) -> torch.Generator:
    """The sampler's generator for one prompt: the same noise for every run, whatever else is evaluated."""
    state = np.random.SeedSequence([seed, prompt_index]).generate_state(1)[0]
    return torch.Generator(device).manual_seed(int(state))


@torch.no_grad()
def generate(
    family, model, prompts: list[str], sampling: SamplingConfig, settings: EvaluationSettings, label: str
) -> Samples:
    """Sample k images per prompt, with their tokens and the entropy of the distribution they were sampled from.

    That entropy is of the teacher-forced distribution (guidance, temperature, top-k and top-p included), averaged
    over image positions. It is reduced here, prompt by prompt: the full log-probs `(k, N, V)` take 300 MB per prompt
    for Janus-Pro (N = 576, V = 16,384).
    """
    samples = Samples([], [], [])
    k, device = settings.num_images_per_prompt, settings.device
    # An adapter run folds its LoRA into the shared base model's weights for the duration (restored exactly after).
    folded = merged_adapters(model) if why_not_mergeable(model) is None else contextlib.nullcontext()
    compile = resolve_compile(settings.compile, family, device)
    with folded:
        for index, prompt in enumerate(tqdm(prompts, desc=f"{label}: sampling", unit="prompt")):
            conditioning = family.encode_prompts([prompt] * k).to(device)
            generator = prompt_generator(settings.seed, index, device)
            sample = sample_image_tokens(family, model, conditioning, sampling, generator=generator, compile=compile)
            logp_table = image_logp_table(family, model, conditioning, sample.image_tokens, sampling)
            samples.images.append(to_pil(family.decode(model, sample.image_tokens)))
            samples.tokens.append(sample.image_tokens.cpu())
            samples.entropies.append(token_entropy(logp_table).float().cpu())
    return samples


def score(
    label: str,
    prompts: list[str],
    samples: Samples,
    reward_funcs: list[Callable],
    extract_features: Callable,
    codebook_size: int,
) -> tuple[list[dict], list[dict]]:
    """Rewards of every image and diversity of every prompt group: the rows of `per_image.csv` and `per_prompt.csv`."""
    image_rows, prompt_rows = [], []
    for index, prompt in enumerate(tqdm(prompts, desc=f"{label}: scoring", unit="prompt")):
        images = samples.images[index]
        rewards = {reward.__name__: reward([prompt] * len(images), completions=images) for reward in reward_funcs}
        for image_index in range(len(images)):
            row = {"run": label, "prompt_index": index, "prompt": prompt, "image_index": image_index}
            image_rows.append(row | {name: values[image_index] for name, values in rewards.items()})
        row = {"run": label, "prompt_index": index, "prompt": prompt}
        for name, values in rewards.items():
            scored = [value for value in values if value is not None]  # None: the reward does not apply
            row[f"{name}_mean"] = float(np.mean(scored)) if scored else math.nan
            row[f"{name}_std"] = float(np.std(scored, ddof=1)) if len(scored) > 1 else math.nan
        diversity = diversity_summary(extract_features(images), samples.tokens[index], codebook_size)
        # As diversity_summary computes it from the log-probs, which `generate` already reduced
        diversity["token_entropy"] = samples.entropies[index].mean().item()
        prompt_rows.append(row | {name: diversity[name] for name in DIVERSITY_METRICS})
    return image_rows, prompt_rows


def summarise(runs: list[Run], per_prompt: list[dict], columns: list[str]) -> list[dict]:
    """One row per run: how it was trained, then the mean over prompts of every column and its standard error."""
    summary = []
    for run in runs:
        rows = [row for row in per_prompt if row["run"] == run.label]
        entry = {
            "run": run.label,
            "path": str(run.path) if run.path else "",
            **{name: getattr(run.settings, name, None) for name in TRAINING_COLUMNS},
            "num_prompts": len(rows),
        }
        for column in columns:
            values = np.array([row[column] for row in rows], dtype=np.float64)
            values = values[np.isfinite(values)]  # prompts a reward does not apply to
            entry[column] = float(values.mean()) if len(values) else math.nan
            entry[f"{column}_sem"] = (
                float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
            )
        summary.append(entry)
    return summary


def point_label(row: dict) -> str:
    """How a run is named on the frontier: `base`, `β=0` (no penalty), `<divergence> β=<β>`, or its label."""
    if row["run"] == BASE and not row["path"]:
        return BASE
    if row["divergence"] is None or row["beta"] is None:
        return row["run"]
    if row["beta_schedule"] not in (None, "constant"):
        return f"{row['divergence']} β={row['beta']:g}→{row['beta_end']:g}"
    if row["beta"] == 0:
        return "β=0"  # without a penalty the divergence plays no part
    return f"{row['divergence']} β={row['beta']:g}"


def plot_frontier(summary: list[dict], x: str, y: str, path: Path) -> None:
    """Reward–diversity frontier: one point per run with standard-error bars, coloured by divergence.

    The points of one divergence (constant β) are joined in order of β, from the unregularised run (β = 0) to the base
    model (β → ∞), so that each divergence draws its own trade-off curve.
    """
    figure = Figure(figsize=(8, 6), layout="constrained")
    axes = figure.subplots()
    divergences = sorted({row["divergence"] for row in summary if row["divergence"] and row["beta"]})
    palette = {name: f"C{index % 10}" for index, name in enumerate(divergences)}
    for row in summary:
        label = point_label(row)
        colour = "black" if label == BASE else palette.get(row["divergence"], "grey") if row["beta"] else "grey"
        axes.errorbar(
            row[x],
            row[y],
            xerr=np.nan_to_num(row[f"{x}_sem"]),
            yerr=np.nan_to_num(row[f"{y}_sem"]),
            fmt="*" if label == BASE else "o",
            markersize=12 if label == BASE else 7,
            color=colour,
            capsize=3,
        )
        # Labels of different divergences are staggered vertically: runs that land together stay readable.
        offset = (6, 6 - 11 * divergences.index(row["divergence"]) if colour in palette.values() else 6)
        axes.annotate(label, (row[x], row[y]), textcoords="offset points", xytext=offset, fontsize=8, color=colour)
    for divergence, curve in frontier_curves(summary).items():
        colour = palette[divergence]
        axes.plot([r[x] for r in curve], [r[y] for r in curve], "--", color=colour, linewidth=1, label=divergence)
    if palette:
        axes.legend(title="divergence")
    axes.set_xlabel(f"{x} (mean over prompts ± s.e.)")
    axes.set_ylabel(f"{y} (mean over prompts ± s.e.)")
    axes.set_title("Reward–diversity frontier")
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=150)


def frontier_curves(summary: list[dict]) -> dict[str, list[dict]]:
    """Each divergence's trade-off curve (its runs at a constant β > 0): the rows from the unregularised run (β = 0) in
    order of β to the base model (β → ∞), those two where the summary has them."""
    unregularised = [row for row in summary if row["beta"] == 0 and row["beta_schedule"] in (None, "constant")]
    base = [row for row in summary if point_label(row) == BASE]
    curves = {}
    for divergence in sorted({row["divergence"] for row in summary if row["divergence"] and row["beta"]}):
        rows = sorted(
            (r for r in summary if r["divergence"] == divergence and r["beta"] and r["beta_schedule"] == "constant"),
            key=lambda r: r["beta"],
        )
        curves[divergence] = unregularised[:1] + rows + base[:1]
    return curves


def at_matched_rewards(summary: list[dict], x: str, y: str, count: int = 3) -> list[dict]:
    """`y` of every divergence at equal `x` (a reward), interpolated linearly along each divergence's frontier curve at
    `count` values of `x` spread evenly inside the range every curve spans (ends excluded), where the curve first
    reaches that value coming from the base model. One row per value: `x`, then per divergence `y` and its standard
    error (`<divergence>_sem`, the two runs' errors combined as if independent; the error of `x` is not in it). Empty
    without two curves that share a range.

    Comparing runs at the same β says little (each divergence has its own scale); at the same reward, the curve that
    keeps the higher diversity is the better trade-off.
    """
    curves = {name: curve[::-1] for name, curve in frontier_curves(summary).items() if len(curve) > 1}
    low = max((min(row[x] for row in curve) for curve in curves.values()), default=math.nan)
    high = min((max(row[x] for row in curve) for curve in curves.values()), default=math.nan)
    if len(curves) < 2 or not low < high:
        return []
    rows = []
    for level in np.linspace(low, high, count + 2)[1:-1]:
        row = {x: float(level)}
        for name, curve in curves.items():
            a, b = next(
                (a, b)
                for a, b in itertools.pairwise(curve)
                if a[x] != b[x] and min(a[x], b[x]) <= level <= max(a[x], b[x])
            )
            t = (level - a[x]) / (b[x] - a[x])
            row[name] = (1 - t) * a[y] + t * b[y]
            row[f"{name}_sem"] = math.hypot((1 - t) * a[f"{y}_sem"], t * b[f"{y}_sem"])
        rows.append(row)
    return rows


def print_matched(summary: list[dict], x: str, y: str) -> None:
    """`at_matched_rewards` as a terminal table."""
    rows = at_matched_rewards(summary, x, y)
    if not rows:
        return
    names = [name for name in rows[0] if name != x and not name.endswith("_sem")]
    print(f"\n{y} at matched {x} (interpolated along each divergence's curve, from the base model; ± s.e.):")
    print(f"{x:>24}" + "".join(f"{name:>20}" for name in names))
    for row in rows:
        print(f"{row[x]:>24.4f}" + "".join(f"{row[name]:>12.4f} ±{row[f'{name}_sem']:<6.4f}" for name in names))


def save_grid(images: list[list], image_rows: list[dict], reward_name: str, path: Path) -> None:
    """The images of the given prompts, one row per prompt, captioned with the prompt and the value of a reward."""
    cells = [image for prompt_images in images for image in prompt_images]
    captions = [
        row["prompt"] if row[reward_name] is None else f"{row['prompt']}\n{row[reward_name]:.3f}"
        for row in image_rows[: len(cells)]
    ]
    make_grid(cells, captions, columns=len(images[0])).save(path)


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def nan_to_none(rows: list[dict]) -> list[dict]:
    """JSON has no NaN: missing values become `null`."""
    return [
        {key: None if isinstance(value, float) and math.isnan(value) else value for key, value in row.items()}
        for row in rows
    ]


def file_name(label: str) -> str:
    return re.sub(r"[^\w.=+-]+", "_", label)


def print_table(summary: list[dict]) -> None:
    """The summary as a terminal table: each reward's mean and every diversity metric, ± standard error."""
    rewards = [column for column in summary[0] if column.endswith("_mean")]
    columns = rewards + list(DIVERSITY_METRICS)
    header = f"{'run':<24}{'divergence':<12}{'beta':>8}  " + "".join(f"{column[:19]:>21}" for column in columns)
    print("\n" + header + "\n" + "-" * len(header))
    for row in summary:
        beta = "" if row["beta"] is None else f"{row['beta']:g}"
        cells = "".join(f"{row[column]:>12.4f} ±{row[f'{column}_sem']:<7.4f}" for column in columns)
        print(f"{row['run'][:23]:<24}{row['divergence'] or '':<12}{beta:>8}  {cells}")
