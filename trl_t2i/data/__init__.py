"""Prompt datasets: the built-in prompt sets shipped here, local files, or Hugging Face Hub datasets."""

import warnings
from functools import partial
from pathlib import Path

import pandas as pd
from datasets import Dataset, load_dataset


DATA_DIR = Path(__file__).parent
PROMPT_SETS = {path.stem: path for path in sorted(DATA_DIR.glob("*.txt"))}
"""Built-in prompt sets (one caption per line), by name: see the `.txt` files next to this module."""

# pandas rather than `load_dataset` for local files: `load_dataset` cannot build an empty dataset (an empty `.jsonl`
# raises a bare StopIteration, a header-only `.csv` "Instruction 'train' corresponds to no data!"). Values are read
# as written: a caption "1984" stays a string.
_FILE_READERS = {
    ".json": partial(pd.read_json, dtype=False),
    ".jsonl": partial(pd.read_json, lines=True, dtype=False),
    ".csv": partial(pd.read_csv, dtype=str),
    ".parquet": pd.read_parquet,
}


def load_prompt_dataset(
    name_or_path: str, split: str = "train", prompt_column: str = "prompt", config: str | None = None
) -> Dataset:
    """Load captions as a `Dataset` with a `prompt` column (the trainer's contract).

    `name_or_path` is a built-in prompt set name (`PROMPT_SETS`), a local `.txt` (one caption per line), `.json`,
    `.jsonl`, `.csv` or `.parquet` file, or a Hub dataset id. `prompt_column` is renamed to `prompt`. Empty captions
    (blank lines, empty or missing values) are skipped; a dataset without any caption is an error.
    """
    path = Path(name_or_path)
    if name_or_path in PROMPT_SETS or path.suffix == ".txt":
        text_file = PROMPT_SETS.get(name_or_path, path)
        if not text_file.is_file():
            raise FileNotFoundError(f"Prompt file {str(text_file)!r} does not exist.")
        captions = [line.strip() for line in text_file.read_text().splitlines() if line.strip()]
        dataset = Dataset.from_dict({"prompt": captions})
    elif path.suffix in _FILE_READERS:
        if not path.is_file():
            raise FileNotFoundError(f"Prompt file {name_or_path!r} does not exist.")
        dataset = Dataset.from_pandas(_read_table(path), preserve_index=False)
    elif path.is_file():
        raise ValueError(
            f"Prompt file {name_or_path!r} is a {path.suffix or 'suffix-less'} file: use .txt (one caption per line), "
            f"{', '.join(_FILE_READERS)} (a `{prompt_column}` column)."
        )
    else:
        dataset = _hub_dataset(name_or_path, config, split)
    source = f"Prompt file {name_or_path!r}" if path.suffix else f"Prompt dataset {name_or_path!r} (split {split!r})"
    if len(dataset) == 0:
        raise ValueError(f"{source} has no prompts.")
    if prompt_column != "prompt" and prompt_column in dataset.column_names:
        dataset = dataset.rename_column(prompt_column, "prompt")
    elif prompt_column not in dataset.column_names:
        raise ValueError(
            f"Prompt column {prompt_column!r} not found in {name_or_path!r}; its columns are {dataset.column_names}. "
            f"Pass `--prompt_column` with one of them. Built-in prompt sets: {', '.join(PROMPT_SETS)}."
        )
    return _without_empty_captions(dataset, source, prompt_column)


def _hub_dataset(name: str, config: str | None, split: str) -> Dataset:
    """`load_dataset` for a name that is neither a built-in prompt set nor a local file: a typo of either would
    otherwise read as a Hub dataset that cannot be reached."""
    try:
        return load_dataset(name, config, split=split)
    except OSError as error:  # not found, offline, no network (`datasets` raises subclasses of these)
        raise FileNotFoundError(
            f"{name!r} is not a built-in prompt set ({', '.join(PROMPT_SETS)}), nor a local file, and the Hub dataset "
            f"{name!r} could not be loaded ({type(error).__name__}: {error})."
        ) from error


def _read_table(path: Path) -> pd.DataFrame:
    try:
        return _FILE_READERS[path.suffix](path)
    except pd.errors.EmptyDataError:  # a CSV without even a header
        return pd.DataFrame()


def _without_empty_captions(dataset: Dataset, source: str, prompt_column: str) -> Dataset:
    """Drop missing and blank captions (the model would be asked for an image of nothing), with a warning."""
    # `select`, not `filter`: no progress bar on every run
    kept = dataset.select(
        [i for i, prompt in enumerate(dataset["prompt"]) if not (prompt is None or str(prompt).strip() == "")]
    )
    skipped = len(dataset) - len(kept)
    if not len(kept):
        raise ValueError(f"{source} has no prompts: all {skipped} captions in column {prompt_column!r} are empty.")
    if skipped:
        warnings.warn(f"{source}: skipped {skipped} of {len(dataset)} captions, which are empty.", stacklevel=3)
    return kept
