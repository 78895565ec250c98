import json

import pytest
from conftest import prompt_length, prompt_limit
from datasets import Dataset, Features, Value

from trl_t2i.data import PROMPT_SETS, fit_prompts, load_prompt_dataset
from trl_t2i.models import TINY_JANUS, TINY_LLAMAGEN, load_family


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


# ------------------------------------------------------------------ captions longer than the model takes


@pytest.fixture(scope="module", params=[TINY_JANUS, TINY_LLAMAGEN], ids=["janus", "llamagen"])
def family(request):
    """A tiny model's family, from its config and processor alone."""
    return load_family(request.param)


def _long_caption(family, extra_words=60) -> str:
    words = ["red", "cat", "on", "a", "blue", "car"] * (prompt_limit(family) + extra_words)
    return " ".join(words[: prompt_limit(family) + extra_words])


def test_a_caption_longer_than_the_model_takes_is_refused_naming_its_line_and_length(tmp_path, family):
    long = _long_caption(family)
    path = tmp_path / "prompts.txt"
    path.write_text(f"a red cat\n\n{long}\na blue car\n{long} again\n")
    limit = prompt_limit(family)
    message = (
        f"Prompt file '{path}', line 3: the caption has {prompt_length(family, long)} prompt tokens, more than the "
        f"{limit} the model takes .*\\(1 more: line 5\\).*`--max_prompt_length {limit}`"
    )
    with pytest.raises(ValueError, match=message):
        load_prompt_dataset(str(path), family=family)


def test_a_caption_of_a_jsonl_file_is_named_by_its_line_and_of_a_dataset_by_its_row(tmp_path, family):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"caption": "a red cat"}\n\n' + json.dumps({"caption": _long_caption(family)}) + "\n")
    with pytest.raises(ValueError, match="prompts.jsonl', line 3: "):
        load_prompt_dataset(str(path), prompt_column="caption", family=family)
    dataset = Dataset.from_dict({"prompt": ["a red cat", "", _long_caption(family)]})
    with pytest.raises(ValueError, match="^The train dataset, row 2: "):
        fit_prompts(dataset, family, source="The train dataset")


@pytest.mark.parametrize("words", [70, 15_000], ids=["300-token", "50-KB"])
def test_max_prompt_length_cuts_longer_captions_at_a_word_with_a_warning(tmp_path, family, words):
    long = _long_caption(family, extra_words=words)
    path = tmp_path / "prompts.txt"
    path.write_text(f"a red cat\n{long}\n")
    max_length = prompt_limit(family) - 7
    with pytest.warns(UserWarning, match=f"cut 1 caption.*max_prompt_length={max_length}.*line 2 from "):
        captions = load_prompt_dataset(str(path), family=family, max_prompt_length=max_length)["prompt"]
    assert captions[0] == "a red cat"
    cut = captions[1]
    assert long.startswith(cut) and long[len(cut)] == " "  # whole words
    assert prompt_length(family, cut) <= max_length < prompt_length(family, long[: long.index(" ", len(cut) + 1)])


def test_a_caption_without_spaces_too_long_for_the_model_is_cut_inside_it(family):
    word = ",".join(["red"] * prompt_limit(family))  # one "word" of many tokens
    dataset = Dataset.from_dict({"prompt": [word]})
    with pytest.warns(UserWarning, match="cut 1 caption"):
        (cut,) = fit_prompts(dataset, family, max_prompt_length=prompt_limit(family))["prompt"]
    assert word.startswith(cut) and 0 < len(cut) < len(word) and prompt_length(family, cut) <= prompt_limit(family)


def test_max_prompt_length_beyond_the_model_or_without_room_for_a_caption_is_refused(family):
    dataset = Dataset.from_dict({"prompt": ["a red cat"]})
    limit = prompt_limit(family)
    with pytest.raises(ValueError, match=f"max_prompt_length={limit + 1} is more than the {limit} prompt tokens"):
        fit_prompts(dataset, family, max_prompt_length=limit + 1)
    around = prompt_length(family, "")
    with pytest.raises(ValueError, match=f"leaves no room for a caption: .* {around} tokens already"):
        fit_prompts(dataset, family, max_prompt_length=around)


def test_a_checked_dataset_is_not_tokenized_again_for_the_same_processor(family, monkeypatch):
    dataset = fit_prompts(Dataset.from_dict({"prompt": ["a red cat", "a blue car"]}), family)
    calls = []
    prompt_lengths = family.prompt_lengths
    monkeypatch.setattr(family, "prompt_lengths", lambda texts: calls.append(texts) or prompt_lengths(texts))
    assert fit_prompts(dataset, family) is dataset and calls == []  # the trainer, after the command line
    fit_prompts(dataset, family, max_prompt_length=prompt_limit(family))  # another length: checked again
    assert calls
