"""Model cards and Hub uploads of training outputs (the adapter, not the base weights)."""

import shlex
import sys
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi


SAMPLE_GRID = "sample_grid.png"
"""Name of the latest logged image grid, copied to the top of the output directory for the card and the Hub."""

PAPER = "https://arxiv.org/abs/2606.21498"


def upload_files(output_dir: str | Path) -> list[Path]:
    """What a push uploads: the files at the top of `output_dir` (adapter or model weights, processor files, card,
    sample grid, training arguments), never its subfolders (checkpoints, logs, all logged grids)."""
    return sorted(path for path in Path(output_dir).iterdir() if path.is_file() and not path.name.startswith("."))


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
    if not any(path.suffix == ".safetensors" for path in files):
        raise FileNotFoundError(f"No weights (*.safetensors) at the top of {str(output_dir)!r}: nothing to push.")
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
    base_model: str,
    args,
    reward_names: list[str],
    is_adapter: bool,
    metrics: dict[str, float],
    dataset_name: str | None = None,
    hub_model_id: str | None = None,
    has_sample_grid: bool = False,
) -> str:
    """The README.md of a training output: metadata, settings, final metrics, command line and a usage snippet."""
    command = " ".join(shlex.quote(arg) for arg in ["python", *sys.argv])
    repo = hub_model_id or f"path/to/{Path(args.output_dir).name}"
    tags = ["trl", "trl-t2i", "grpo", "text-to-image", args.divergence] + (["lora"] if is_adapter else [])
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

    beta = (
        f"{args.beta}" if args.beta_schedule == "constant" else f"{args.beta} → {args.beta_end} ({args.beta_schedule})"
    )
    settings = {
        "divergence": f"`{args.divergence}`" + (f" (α = {args.divergence_alpha})" if args.divergence_alpha else ""),
        "estimator": f"`{args.divergence_estimator}`"
        + (", ×π/π_old" if args.divergence_estimator == "sampled" and args.use_bias_correction_kl else ""),
        "β": beta,
        "CFG scale / log-probs": f"{args.cfg_scale} / `{args.cfg_logprobs}`",
        "temperature / top-k / top-p": f"{args.temperature} / {args.top_k} / {args.top_p}",
        "rewards (weights)": ", ".join(
            f"`{name}`" + (f" ({weight})" if args.reward_weights else "")
            for name, weight in zip(reward_names, args.reward_weights or [None] * len(reward_names), strict=True)
        ),
        "dataset": f"`{dataset_name}`" if dataset_name else "—",
        "generations per prompt": args.num_generations,
        "learning rate": args.learning_rate,
        "loss type": f"`{args.loss_type}`",
        "max steps": args.max_steps,
    }
    lines = [
        *metadata,
        "",
        f"# {repo.split('/')[-1]}",
        "",
        f"{'A LoRA adapter for' if is_adapter else 'A fine-tune of'} {_model_link(base_model)}, post-trained with GRPO and a `{args.divergence}` divergence penalty using trl_t2i "
        f"(method: [arXiv 2606.21498]({PAPER})).",
        "",
    ]
    if has_sample_grid:
        lines += [f"![Samples from the end of training]({SAMPLE_GRID})", ""]
    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in settings.items()]
    if metrics:
        lines += ["", "Final logged metrics:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" for key, value in sorted(metrics.items())]
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
        _usage(base_model, repo, is_adapter),
        "```",
        "",
    ]
    return "\n".join(lines)


def _model_link(model_id: str) -> str:
    """A Hub link for Hub ids; local paths and the locally built tiny models have no page to link to."""
    if model_id.startswith("trl-t2i/tiny-") or Path(model_id).exists() or model_id.count("/") != 1:
        return f"`{model_id}`"
    return f"[`{model_id}`](https://huggingface.co/{model_id})"


def _usage(base_model: str, repo: str, is_adapter: bool) -> str:
    load = (
        f'model = PeftModel.from_pretrained(load_model("{base_model}", dtype=torch.bfloat16), "{repo}")'
        if is_adapter
        else f'model = load_model("{repo}", dtype=torch.bfloat16)'
    )
    return "\n".join(
        [
            "import torch",
            *(["from peft import PeftModel"] if is_adapter else []),
            "from trl_t2i import get_adapter, load_model, load_processor, sample_image_tokens",
            "from trl_t2i.images import to_pil",
            "",
            f'{load}.to("cuda").eval()',
            f'adapter = get_adapter(model, load_processor("{base_model}"))',
            'input_ids, attention_mask = adapter.prepare_prompts(["a photo of a red fox in the snow"] * 4)',
            "tokens = sample_image_tokens(adapter, model, input_ids.cuda(), attention_mask.cuda(), cfg_scale=5.0)",
            'to_pil(adapter.decode(model, tokens.image_tokens))[0].save("fox.png")',
        ]
    )
