"""Prompt datasets: the built-in prompt sets shipped here, local files, or Hugging Face Hub datasets."""

from pathlib import Path

from datasets import Dataset, load_dataset


DATA_DIR = Path(__file__).parent
PROMPT_SETS = {path.stem: path for path in sorted(DATA_DIR.glob("*.txt"))}
"""Built-in prompt sets (one caption per line), by name: see the `.txt` files next to this module."""

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_prompt_dataset(
    name_or_path: str, split: str = "train", prompt_column: str = "prompt", config: str | None = None
) -> Dataset:
    """Load captions as a `Dataset` with a `prompt` column (the trainer's contract).

    `name_or_path` is a built-in prompt set name (`PROMPT_SETS`), a local `.txt` (one caption per line), `.json`,
    `.jsonl`, `.csv` or `.parquet` file, or a Hub dataset id. `prompt_column` is renamed to `prompt`.
    """
    path = Path(name_or_path)
    if name_or_path in PROMPT_SETS or path.suffix == ".txt":
        text_file = PROMPT_SETS.get(name_or_path, path)
        if not text_file.is_file():
            raise FileNotFoundError(f"Prompt file {str(text_file)!r} does not exist.")
        captions = [line.strip() for line in text_file.read_text().splitlines() if line.strip()]
        dataset = Dataset.from_dict({"prompt": captions})
    elif path.suffix in _FILE_BUILDERS:
        if not path.is_file():
            raise FileNotFoundError(f"Prompt file {name_or_path!r} does not exist.")
        dataset = load_dataset(_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    else:
        dataset = load_dataset(name_or_path, config, split=split)
    if prompt_column != "prompt" and prompt_column in dataset.column_names:
        dataset = dataset.rename_column(prompt_column, "prompt")
    elif prompt_column not in dataset.column_names:
        raise ValueError(
            f"Prompt column {prompt_column!r} not found in {name_or_path!r}; its columns are {dataset.column_names}. "
            f"Pass `--prompt_column` with one of them. Built-in prompt sets: {', '.join(PROMPT_SETS)}."
        )
    return dataset
