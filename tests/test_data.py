import json

import pytest
from datasets import Dataset, Features, Value

from trl_t2i.data import PROMPT_SETS, load_prompt_dataset


CAPTIONS = ["a red cat", "a blue car", "a green bird"]


def _write(path, kind, captions=CAPTIONS):
    if kind == "txt":
        path.write_text("\n".join(captions) + "\n\n")  # blank lines are skipped
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps({"caption": c, "id": i}) for i, c in enumerate(captions)))
    elif kind == "json":
        path.write_text(json.dumps([{"caption": c} for c in captions]))
    elif kind == "csv":
        Dataset.from_dict({"caption": captions}).to_csv(str(path), index=False)
    elif kind == "parquet":
        Dataset.from_dict({"caption": captions}, features=Features({"caption": Value("string")})).to_parquet(str(path))


@pytest.mark.parametrize("kind", ["txt", "jsonl", "json", "csv", "parquet"])
def test_local_prompt_files_load_with_a_prompt_column(tmp_path, kind):
    path = tmp_path / f"prompts.{kind}"
    _write(path, kind)
    dataset = load_prompt_dataset(str(path), prompt_column="prompt" if kind == "txt" else "caption")
    assert dataset["prompt"] == CAPTIONS


def test_built_in_prompt_sets_load():
    assert {"colour_objects", "simple_scenes"} <= set(PROMPT_SETS)
    for name in PROMPT_SETS:
        prompts = load_prompt_dataset(name)["prompt"]
        assert len(prompts) >= 80 and all(isinstance(p, str) and p.strip() == p and p for p in prompts)


def test_missing_file_and_column_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        load_prompt_dataset(str(tmp_path / "nothing.jsonl"))
    path = tmp_path / "prompts.jsonl"
    _write(path, "jsonl")
    with pytest.raises(ValueError, match="'text' not found.*\\['caption', 'id'\\]"):
        load_prompt_dataset(str(path), prompt_column="text")


# Each way a prompt file can hold no caption at all: no bytes, blank lines, an empty list, a header without rows.
EMPTY_FILES = [
    ("txt", ""),
    ("txt", "\n  \n"),
    ("jsonl", ""),
    ("jsonl", "\n\n"),
    ("json", "[]"),
    ("csv", ""),
    ("csv", "caption\n"),
    ("parquet", None),
]


@pytest.mark.parametrize(("kind", "content"), EMPTY_FILES, ids=[f"{k}-{c!r}" for k, c in EMPTY_FILES])
def test_a_prompt_file_without_prompts_is_a_clear_error(tmp_path, kind, content):
    path = tmp_path / f"prompts.{kind}"
    if content is None:
        _write(path, kind, captions=[])
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=f"Prompt file '{path}' has no prompts"):
        load_prompt_dataset(str(path), prompt_column="prompt" if kind == "txt" else "caption")


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_empty_captions_are_skipped_with_a_warning(tmp_path, kind):
    path = tmp_path / f"prompts.{kind}"
    _write(path, kind, captions=["a red cat", "", "   ", None, "a blue car"])
    # pandas already skips a CSV's blank lines: fewer rows to skip there
    with pytest.warns(UserWarning, match=f"Prompt file '{path}': skipped [23] of [45] captions, which are empty"):
        dataset = load_prompt_dataset(str(path), prompt_column="caption")
    assert dataset["prompt"] == ["a red cat", "a blue car"]


@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv"])
def test_a_prompt_file_of_empty_captions_is_a_clear_error(tmp_path, kind):
    path = tmp_path / f"prompts.{kind}"
    _write(path, kind, captions=["", "  "])
    with pytest.raises(ValueError, match=f"Prompt file '{path}' has no prompts"):
        load_prompt_dataset(str(path), prompt_column="prompt" if kind == "txt" else "caption")
