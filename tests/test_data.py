import json

import pytest
from datasets import Dataset

from trl_t2i.data import PROMPT_SETS, load_prompt_dataset


CAPTIONS = ["a red cat", "a blue car", "a green bird"]


def _write(path, kind):
    if kind == "txt":
        path.write_text("\n".join(CAPTIONS) + "\n\n")  # blank lines are skipped
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps({"caption": c, "id": i}) for i, c in enumerate(CAPTIONS)))
    elif kind == "json":
        path.write_text(json.dumps([{"caption": c} for c in CAPTIONS]))
    elif kind == "csv":
        Dataset.from_dict({"caption": CAPTIONS}).to_csv(str(path))
    elif kind == "parquet":
        Dataset.from_dict({"caption": CAPTIONS}).to_parquet(str(path))


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
