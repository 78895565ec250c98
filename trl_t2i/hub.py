"""Model cards and Hub uploads of training outputs (the adapter, not the base weights)."""

import functools
import math
import os
import shlex
import sys
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi

from .run_settings import RunSettings
from .sampling import SamplingConfig


SAMPLE_GRID = "sample_grid.png"
"""Name of the latest logged image grid, copied to the top of the output directory for the card and the Hub."""

PAPER = "https://arxiv.org/abs/2606.21498"


def upload_files(output_dir: str | Path) -> list[Path]:
    """What a push uploads: the files at the top of `output_dir` (adapter or model weights, processor files, card,
    sample grid, training arguments), never its subfolders (checkpoints, logs, all logged grids). A folder that is
    missing or holds no weights is an error naming it."""
    if not Path(output_dir).is_dir():
        raise FileNotFoundError(
            f"No output directory {str(output_dir)!r}: give the `output_dir` of a finished training run (the folder "
            "holding adapter_model.safetensors or model.safetensors)."
        )
    files = sorted(path for path in Path(output_dir).iterdir() if path.is_file() and not path.name.startswith("."))
    if not any(path.suffix == ".safetensors" for path in files):
        raise FileNotFoundError(f"No weights (*.safetensors) at the top of {str(output_dir)!r}: nothing to push.")
    return files


def push_output(
    output_dir: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload trl_t2i training output",
) -> str:
    """Create `repo_id` if needed and upload `upload_files(output_dir)` in one commit; return the commit URL.

    On failure the local output is untouched: the error says how to retry (this function, or `trl-t2i push`).
    """
    files = upload_files(output_dir)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.create_commit(
            repo_id,
            operations=[CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)) for path in files],
            commit_message=commit_message,
            revision=revision,
        )
    except Exception as error:
        raise RuntimeError(
            f"Pushing {str(output_dir)!r} to the Hub repo {repo_id!r} failed: {error}. The local output is intact; "
            f"retry with `trl-t2i push --output_dir {shlex.quote(str(output_dir))} --hub_model_id {repo_id}` once the "
            "problem is fixed "
            "(e.g. `huggingface-cli login`)."
        ) from error
    return commit.commit_url


def model_card(
    *,
    settings: RunSettings,
    output_dir: str | Path,
    is_adapter: bool,
    metrics: dict[str, float],
    dataset_name: str | None = None,
    hub_model_id: str | None = None,
    has_sample_grid: bool = False,
) -> str:
    """The README.md of a training output: metadata, settings, final metrics, command line and a usage snippet."""
    command = launch_command()
    base_model = settings.base_model
    repo = hub_model_id or f"path/to/{Path(output_dir).name}"
    tags = ["trl", "trl-t2i", "grpo", "text-to-image", settings.divergence] + (["lora"] if is_adapter else [])
    metadata = [
        "---",
        f"base_model: {base_model}",
        f"library_name: {'peft' if is_adapter else 'transformers'}",
        "pipeline_tag: text-to-image",
        "tags:",
        *(f"- {tag}" for tag in tags),
    ]
    if dataset_name:
        metadata += ["datasets:", f"- {dataset_name}"]
    metadata.append("---")

    rows = _settings_rows(settings)
    rows["dataset"] = f"`{dataset_name}`" if dataset_name else "—"
    lines = [
        *metadata,
        "",
        f"# {repo.split('/')[-1]}",
        "",
        f"{'A LoRA adapter for' if is_adapter else 'A fine-tune of'} {_model_link(base_model)}, "
        f"post-trained with GRPO and a `{settings.divergence}` divergence penalty using trl_t2i "
        f"(method: [arXiv 2606.21498]({PAPER})).",
        "",
    ]
    if has_sample_grid:
        lines += [f"![Samples from the end of training]({SAMPLE_GRID})", ""]
    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows.items()]
    if metrics:
        lines += ["", "Final logged metrics:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_metric(value)} |" for key, value in sorted(metrics.items())]
    lines += [
        "",
        "Command:",
        "",
        "```bash",
        command,
        "```",
        "",
        "## Usage",
        "",
        "```python",
        _usage(base_model, repo, is_adapter, settings.sampling),
        "```",
        "",
    ]
    return "\n".join(lines)


def _settings_rows(settings: RunSettings) -> dict[str, str]:
    """The card's training-settings table, from the run's resolved settings."""
    parameters = ", ".join(f"{name} = {value}" for name, value in settings.divergence_params.items())
    beta = f"{settings.beta}"
    if settings.beta_schedule == "adaptive":
        beta += f" (adaptive, steering `{settings.divergence}` to {settings.divergence_target})"
    elif settings.beta_schedule != "constant":
        beta += f" → {settings.beta_end} ({settings.beta_schedule})"
    bias_correction = settings.divergence_estimator == "sampled" and settings.use_bias_correction_kl
    sampling = settings.sampling
    return {
        "divergence": f"`{settings.divergence}`" + (f" ({parameters})" if parameters else ""),
        "estimator": f"`{settings.divergence_estimator}`" + (", ×π/π_old" if bias_correction else ""),
        "penalty in": "the loss and the reward (sequence-level gradient)"
        if settings.divergence_in == "reward"
        else "the loss (per position)",
        "β": beta,
        "CFG scale / log-probs": f"{sampling.cfg_scale} / `{settings.cfg_logprobs}`",
        "temperature / top-k / top-p": f"{sampling.temperature} / {sampling.top_k} / {sampling.top_p}",
        "rewards (weights)": ", ".join(
            f"`{name}` ({weight:g})"
            for name, weight in zip(settings.reward_names, settings.reward_weights, strict=True)
        ),
        "generations per prompt": f"{settings.num_generations}",
        "learning rate": f"{settings.learning_rate}",
        "loss type": f"`{settings.loss_type}`",
        "tokens trained": f"`{settings.token_selection}`"
        + (", dynamic advantage" if settings.dynamic_advantage else "")
        + (
            f", weighted by π_old/π_sampler (`{settings.sampler_correction_mode}`)"
            if settings.sampler_correction
            else ""
        ),
        "max steps": f"{settings.max_steps}",
        **({"resumed with other settings": _resumes(settings.resumes)} if settings.resumes else {}),
    }


def _resumes(resumes: list[dict]) -> str:
    """ "at step 40: divergence `js` → `reverse_kl`, …" for each resume under other settings."""
    return "; ".join(
        f"at step {resume['step']}: "
        + ", ".join(f"{name} `{before}` → `{after}`" for name, (before, after) in resume["changes"].items())
        for resume in resumes
    )


# Launchers whose command line is the one to record: the run is their child process.
LAUNCHERS = [["accelerate", "launch"], ["accelerate-launch"], ["torchrun"]] + [
    ["python", "-m", module] for module in ("accelerate.commands.launch", "torch.distributed.run")
]


def launch_command(argv: list[str] | None = None, parent_argv: list[str] | None = None) -> str:
    """The command line that started this run, as the user typed it: the parent process's when it is a launcher
    (`accelerate launch ...`, `torchrun ...`), else this process's own (`python script.py ...`, `trl-t2i grpo ...`).

    `argv` defaults to `sys.orig_argv` (which keeps `-m module`), `parent_argv` to the parent's command line read
    from `/proc` (Linux; elsewhere none, and the run's own command is recorded).
    """
    argv = _as_typed(sys.orig_argv if argv is None else argv)
    parent_argv = _as_typed(_parent_argv() if parent_argv is None else parent_argv)
    return shlex.join(parent_argv if started_by_launcher(parent_argv) else argv)


def started_by_launcher(parent_argv: list[str] | None = None) -> bool:
    """Whether this process's parent is a launcher of `LAUNCHERS` (`parent_argv`: its command line, default from
    `/proc`; elsewhere than on Linux, False)."""
    parent_argv = _as_typed(_parent_argv() if parent_argv is None else parent_argv)
    return any(parent_argv[: len(launcher)] == launcher for launcher in LAUNCHERS)


@functools.cache  # read while the parent lives: a run whose launcher has ended (see `preemption`) still names it
def _parent_argv() -> list[str]:
    try:
        cmdline = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in cmdline.split(b"\0")[:-1]]  # each argument ends with a NUL


def _as_typed(argv: list[str]) -> list[str]:
    """`python` for the interpreter's path, and a console script (`/venv/bin/python /venv/bin/accelerate launch`,
    as the kernel runs it) by its name alone (`accelerate launch`), also when it was started by a relative path
    (`.venv/bin/accelerate launch`, as `make demo` does; resolved against the working directory, which a launcher
    passes on to the run)."""
    if not argv or not Path(argv[0]).name.startswith("python"):
        return list(argv)
    interpreter, *rest = argv
    if rest and Path(os.path.abspath(rest[0])).parent == Path(interpreter).parent:
        return [Path(rest[0]).name, *rest[1:]]
    return ["python", *rest]


def _metric(value) -> str:
    """A logged metric for the card: 4 significant digits; `None` (nothing finite was logged) or NaN as "—"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.4g}"


def _model_link(model_id: str) -> str:
    """A Hub link for Hub ids; local paths and the locally built tiny models (`tiny:janus`) have no page."""
    if Path(model_id).exists() or model_id.count("/") != 1:
        return f"`{model_id}`"
    return f"[`{model_id}`](https://huggingface.co/{model_id})"


def _usage(base_model: str, repo: str, is_adapter: bool, sampling: SamplingConfig) -> str:
    """A snippet that samples from the trained model on GPU, or on CPU where there is none, with the run's guidance
    and its other sampling settings that differ from the defaults."""
    defaults = SamplingConfig()
    changed = [
        f"{name}={getattr(sampling, name)!r}"
        for name in ("cfg_scale", "temperature", "top_k", "top_p")
        if name == "cfg_scale" or getattr(sampling, name) != getattr(defaults, name)
    ]
    load = (
        f'PeftModel.from_pretrained(load_model("{base_model}", dtype=dtype), "{repo}")'
        if is_adapter
        else f'load_model("{repo}", dtype=dtype)'
    )
    return "\n".join(
        [
            "import torch",
            *(["from peft import PeftModel"] if is_adapter else []),
            "from trl_t2i import SamplingConfig, get_family, load_model, load_processor, sample_image_tokens",
            "from trl_t2i.images import to_pil",
            "",
            'device = "cuda" if torch.cuda.is_available() else "cpu"',
            'dtype = torch.bfloat16 if device == "cuda" else torch.float32',
            f"model = {load}.to(device).eval()",
            f'family = get_family(model, load_processor("{base_model}"))',
            'conditioning = family.encode_prompts(["a photo of a red fox in the snow"] * 4).to(device)',
            f"sample = sample_image_tokens(family, model, conditioning, SamplingConfig({', '.join(changed)}))",
            'to_pil(family.decode(model, sample.image_tokens))[0].save("fox.png")',
        ]
    )
