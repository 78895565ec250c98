"""Prompt datasets: the built-in prompt sets shipped here, local files, or Hugging Face Hub datasets."""

import re
import warnings
import weakref
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from datasets import Dataset, load_dataset


if TYPE_CHECKING:
    from ..models.base import ModelFamily


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
    name_or_path: str,
    split: str = "train",
    prompt_column: str = "prompt",
    config: str | None = None,
    family: "ModelFamily | None" = None,
    max_prompt_length: int | None = None,
) -> Dataset:
    """Load captions as a `Dataset` with a `prompt` column (the trainer's contract).

    `name_or_path` is a built-in prompt set name (`PROMPT_SETS`), a local `.txt` (one caption per line), `.json`,
    `.jsonl`, `.csv` or `.parquet` file, or a Hub dataset id. `prompt_column` is renamed to `prompt`. Empty captions
    (blank lines, empty or missing values) are skipped; a dataset without any caption is an error. With the model's
    `family`, every caption must fit the model (`fit_prompts`): a longer one is an error naming its line (`.txt`,
    `.jsonl`) or row, or with `max_prompt_length` it is cut to fit.
    """
    path = Path(name_or_path)
    if name_or_path in PROMPT_SETS or path.suffix == ".txt":
        text_file = PROMPT_SETS.get(name_or_path, path)
        if not text_file.is_file():
            raise FileNotFoundError(f"Prompt file {str(text_file)!r} does not exist.")
        numbered = [(number, line.strip()) for number, line in enumerate(text_file.read_text().splitlines(), 1)]
        numbered = [(number, caption) for number, caption in numbered if caption]
        dataset = Dataset.from_dict({"prompt": [caption for _, caption in numbered]})
        places = [f"line {number}" for number, _ in numbered]
    elif path.suffix in _FILE_READERS:
        if not path.is_file():
            raise FileNotFoundError(f"Prompt file {name_or_path!r} does not exist.")
        dataset = Dataset.from_pandas(_read_table(path), preserve_index=False)
        places = _jsonl_lines(path) if path.suffix == ".jsonl" else [f"row {row}" for row in range(len(dataset))]
    elif path.is_file():
        raise ValueError(
            f"Prompt file {name_or_path!r} is a {path.suffix or 'suffix-less'} file: use .txt (one caption per line), "
            f"{', '.join(_FILE_READERS)} (a `{prompt_column}` column)."
        )
    else:
        dataset = _hub_dataset(name_or_path, config, split)
        places = [f"row {row}" for row in range(len(dataset))]
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
    kept = _non_empty_captions(dataset, source, prompt_column)
    dataset = dataset.select(kept) if len(kept) < len(dataset) else dataset
    if family is not None:
        dataset = fit_prompts(dataset, family, max_prompt_length, source, [places[row] for row in kept])
    return dataset


def fit_prompts(
    dataset: Dataset,
    family: "ModelFamily",
    max_prompt_length: int | None = None,
    source: str = "The prompt dataset",
    places: list[str] | None = None,
) -> Dataset:
    """Check every caption's prompt length (in `family.prompt_lengths`' tokens) against the most the model takes.

    Without `max_prompt_length`, a longer caption is an error naming its place (`places[i]`, default `row i`) and
    length. With it (at most the model's limit), longer captions are cut to their longest start whose prompt has
    `max_prompt_length` tokens (whole words, where the first word fits), with a warning: the rewards then score the
    caption the model saw. Returns the dataset, with the cut captions. A dataset returned here is not checked again
    for the same processing class and length.
    """
    limit, why = family.prompt_limit()
    checked = _FITTED.get(dataset)
    if checked is not None and checked[0] is family.processing_class and checked[1:] == (limit, max_prompt_length):
        return dataset
    if max_prompt_length is not None:
        _check_max_prompt_length(max_prompt_length, family, limit, why)
    captions, places = dataset["prompt"], places or [f"row {row}" for row in range(len(dataset))]
    lengths = family.prompt_lengths(captions)
    too_long = [row for row, length in enumerate(lengths) if length > (max_prompt_length or limit)]
    if too_long and max_prompt_length is None:
        first, others = too_long[0], [places[row] for row in too_long[1:]]
        more = f" ({len(others)} more: {', '.join(others[:5])}{', …' if len(others) > 5 else ''})" if others else ""
        raise ValueError(
            f"{source}, {places[first]}: the caption has {lengths[first]} prompt tokens, more than the {limit} the "
            f"model takes ({why}){more}. Shorten it, or pass `--max_prompt_length {limit}` (or less) to cut longer "
            "captions to that many tokens, with a warning."
        )
    if too_long:
        cut = {row: _cut(captions[row], family, max_prompt_length, f"{source}, {places[row]}") for row in too_long}
        first = too_long[0]
        warnings.warn(
            f"{source}: cut {len(cut)} caption(s) longer than max_prompt_length={max_prompt_length} tokens, e.g. "
            f"{places[first]} from {lengths[first]} tokens to {cut[first]!r}.",
            stacklevel=2,
        )
        fitted = [cut.get(row, caption) for row, caption in enumerate(captions)]
        dataset = (
            dataset.rename_column("prompt", "__uncut_prompt")
            .add_column("prompt", fitted)
            .remove_columns("__uncut_prompt")
        )
    _FITTED[dataset] = (family.processing_class, limit, max_prompt_length)
    return dataset


def check_prompts_fit(captions: list[str], family: "ModelFamily", source: str = "The prompts") -> None:
    """`fit_prompts` for a list of captions that are sampled as given (no cutting): a longer one is an error naming
    its place (`prompt i`, from 1)."""
    places = [f"prompt {number}" for number in range(1, len(captions) + 1)]
    fit_prompts(Dataset.from_dict({"prompt": captions}), family, source=source, places=places)


_FITTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""The datasets `fit_prompts` returned, with the processing class and lengths they were fitted to: the trainer does
not tokenize again the captions that the command line checked (naming their lines) before the model loaded."""


def _check_max_prompt_length(max_prompt_length: int, family: "ModelFamily", limit: int, why: str) -> None:
    if max_prompt_length > limit:
        raise ValueError(
            f"max_prompt_length={max_prompt_length} is more than the {limit} prompt tokens the model takes ({why})."
        )
    if max_prompt_length <= (around := family.prompt_lengths([""])[0]):
        raise ValueError(
            f"max_prompt_length={max_prompt_length} leaves no room for a caption: the model's prompt around an empty "
            f"caption has {around} tokens already."
        )


def _cut(caption: str, family: "ModelFamily", max_prompt_length: int, place: str) -> str:
    """The longest start of `caption` whose prompt has at most `max_prompt_length` tokens: whole words, else (a first
    word too long by itself) characters."""

    def fits(end: int) -> bool:
        return family.prompt_lengths([caption[:end]])[0] <= max_prompt_length

    word_ends = [match.end() for match in re.finditer(r"\S+", caption)]
    end = _last(word_ends, fits) or _last(range(1, len(caption) + 1), fits)
    if end is None:
        raise ValueError(
            f"{place}: not even the caption's first character fits max_prompt_length={max_prompt_length}."
        )
    return caption[:end]


def _last(ends, fits) -> int | None:
    """The last of the increasing `ends` that `fits` (which holds for a start of them only), by bisection."""
    low, high = 0, len(ends)
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if fits(ends[middle]) else (low, middle)
    return ends[low - 1] if low else None


def _jsonl_lines(path: Path) -> list[str]:
    """The line of each record of a JSON Lines file (pandas skips blank lines)."""
    return [f"line {number}" for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]


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


def _non_empty_captions(dataset: Dataset, source: str, prompt_column: str) -> list[int]:
    """The rows whose caption is neither missing nor blank (the model would be asked for an image of nothing); the
    others are skipped with a warning."""
    kept = [row for row, prompt in enumerate(dataset["prompt"]) if not (prompt is None or str(prompt).strip() == "")]
    skipped = len(dataset) - len(kept)
    if not kept:
        raise ValueError(f"{source} has no prompts: all {skipped} captions in column {prompt_column!r} are empty.")
    if skipped:
        warnings.warn(f"{source}: skipped {skipped} of {len(dataset)} captions, which are empty.", stacklevel=3)
    return kept
