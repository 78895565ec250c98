"""LlamaGen's caption cleaning (its T5 embedder's PixArt rules, twice), on the cases where it differs from
lowercasing, and where the family applies it."""

import pytest
import torch

from trl_t2i.models import build_tiny_llamagen, get_family
from trl_t2i.models.llamagen import captions
from trl_t2i.models.llamagen.captions import clean_caption


@pytest.mark.parametrize(
    "caption, cleaned",
    [
        ("A 2x2 grid of four photos", "a grid of four photos"),  # sizes go
        ("a 1.5×3 rug", "a rug"),
        ("A map of the U.S. made of sushi.", "a map of the u. s. made of sushi."),  # punctuation before a word: spaced
        ("salt & pepper", "salt pepper"),  # most symbols become spaces
        ("a cat/dog hybrid *sleeping*", "a cat dog hybrid sleeping"),
        ("a sign that says “Welcome”", 'a sign that says "welcome"'),  # curly quotes straightened
        ("the cat’s toy", "the cat's toy"),
        ("“A quoted caption”", "a quoted caption"),  # a caption quoted as a whole loses its quotes
        ("a red—blue flag", "a red-blue flag"),  # every dash is "-"
        ("<b>a bold</b> cat &amp; dog", "a bold cat dog"),  # HTML
        ("photo of a cat from www.example.com", "photo of a cat from"),  # URLs
        ("A RED CAT", "a red cat"),
    ],
)
def test_captions_are_cleaned_as_llamagen_cleans_them(caption, cleaned):
    assert clean_caption(caption) == cleaned


def test_the_second_pass_is_not_redundant():
    # the first pass drops the trailing dash, which only then leaves a caption quoted as a whole
    assert captions.clean_caption_once('"A cat" -') == '"a cat"'
    assert clean_caption('"A cat" -') == "a cat"


def _family(clean_captions: bool):
    model, tokenizer = build_tiny_llamagen()
    model.config.clean_captions = clean_captions
    return get_family(model, tokenizer), tokenizer


@pytest.mark.parametrize("clean_captions", [True, False])
def test_the_family_tokenizes_cleaned_or_lowercased_captions(clean_captions):
    family, tokenizer = _family(clean_captions)
    texts = ["A red cat & a blue dog.", "a 2x2 grid of green apples"]
    expected = [clean_caption(text) if clean_captions else text.lower().strip() for text in texts]
    ids, mask = family.tokenize_prompts(texts)
    encoding = tokenizer(expected, padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(ids, encoding["input_ids"]) and torch.equal(mask, encoding["attention_mask"])


def test_cleaning_without_the_extra_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(captions, "missing_packages", lambda: ["beautifulsoup4"])
    with pytest.raises(ImportError, match=r"beautifulsoup4.*pip install \"trl_t2i\[llamagen\]\".*clean_captions"):
        _family(clean_captions=True)


def test_the_tiny_llamagen_needs_no_extra(monkeypatch):
    monkeypatch.setattr(captions, "missing_packages", lambda: ["ftfy", "beautifulsoup4"])
    model, tokenizer = build_tiny_llamagen()
    assert not model.config.clean_captions
    get_family(model, tokenizer).tokenize_prompts(["A Red Cat"])
