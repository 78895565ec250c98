"""The `ocr` reward on the real PP-OCRv4 models that ship in the rapidocr-onnxruntime wheel (no download)."""

import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from trl_t2i.rewards import get_reward
from trl_t2i.rewards.ocr import OCRReward, edit_distance, quoted_text, text_similarity


rapidocr = pytest.importorskip("rapidocr_onnxruntime")

WHEEL_MODELS = Path(rapidocr.__file__).parent / "models"


def sign(text: str, size: int = 128) -> Image.Image:
    """Black text drawn with PIL's built-in font, centred on a white square."""
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).text((size / 2, size / 2), text, fill="black", font=ImageFont.load_default(24), anchor="mm")
    return image


BLANK = Image.new("RGB", (128, 128), "white")
CASES = {  # name: (caption, image)
    "right": ('a wooden shop sign that says "OPEN"', sign("OPEN")),
    "right, curly quotes, spaces": ("a card that reads “Hello 2049”", sign("HELLO 2049")),
    "wrong": ('a wooden shop sign that says "OPEN"', sign("CLOSED")),
    "part": ('a shop sign that says "OPEN NOW"', sign("OPEN")),
    "blank": ('a wooden shop sign that says "OPEN"', BLANK),
    "nothing quoted": ("a red cat", sign("OPEN")),
}


@pytest.fixture(scope="module")
def scores():
    """The reward of every case, from one call (one batch) of the real model."""
    captions, images = zip(*CASES.values(), strict=True)
    return dict(zip(CASES, get_reward("ocr")(list(captions), list(images)), strict=True))


def test_text_drawn_with_pil_scores_high(scores):
    assert scores["right"] >= 0.9
    assert scores["right, curly quotes, spaces"] >= 0.9  # case and spaces do not count


def test_wrong_text_scores_low(scores):
    assert scores["wrong"] <= 0.25


def test_missing_words_cost_their_share_of_the_target(scores):
    assert scores["part"] == pytest.approx(text_similarity("OPEN", "OPEN NOW")) == pytest.approx(4 / 7)


def test_a_blank_image_scores_zero(scores):
    assert scores["blank"] == 0.0


def test_a_caption_that_quotes_nothing_gets_none_without_running_the_model():
    reward = OCRReward()
    assert reward(["a red cat", "sky"], [sign("OPEN"), BLANK]) == [None, None]
    assert reward.engine is None
    assert reward.__name__ == "ocr"


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ('a sign that says "OPEN"', "OPEN"),
        ("a sign that says “Café”", "Café"),
        ('a banner with "SALE" and a tag with "50%"', "SALE 50%"),
        ('an empty label "" on a jar', None),
        ("a red cat", None),
        ("a cat's 'toy'", None),  # apostrophes and single quotes are not quotes
    ],
)
def test_the_target_is_the_quoted_text(caption, expected):
    assert quoted_text(caption) == expected


@pytest.mark.parametrize(("a", "b"), [("kitten", "sitting"), ("", "abc"), ("flaw", "lawn"), ("same", "same")])
def test_edit_distance_is_levenshtein(a, b):
    def reference(a, b):  # the recursive definition
        if not a or not b:
            return len(a) + len(b)
        return min(reference(a[1:], b) + 1, reference(a, b[1:]) + 1, reference(a[1:], b[1:]) + (a[0] != b[0]))

    assert edit_distance(a, b) == edit_distance(b, a) == reference(a, b)


def test_similarity_ignores_case_and_spaces_and_charges_extra_text():
    assert text_similarity("open 24 H", "OPEN 24H") == 1.0
    assert text_similarity("OPEN OPEN", "OPEN") == 0.0  # four extra letters: as bad as reading nothing
    assert text_similarity("OPENS", "OPEN") == 0.75
    assert text_similarity("", "OPEN") == 0.0


def test_local_model_files_are_used(tmp_path):
    detector = tmp_path / "my_det.onnx"
    shutil.copyfile(WHEEL_MODELS / "ch_PP-OCRv4_det_infer.onnx", detector)
    reward = OCRReward(det_model_path=str(detector))
    assert reward.read(sign("OPEN")) == "OPEN"
    assert Path(reward.engine.text_det.infer.session._model_path) == detector


@pytest.mark.parametrize("setting", ["det_model_path", "rec_model_path"])
def test_a_missing_model_file_names_the_setting_and_the_path(setting, tmp_path):
    missing = str(tmp_path / "no_such_model.onnx")
    with pytest.raises(FileNotFoundError, match=f"`{setting}='{missing}'` is not a file. Pass `{setting}`") as error:
        get_reward("ocr", **{setting: missing})
    assert f"reward_kwargs: {{ocr: {{{setting}: /path/to/model.onnx}}}}" in str(error.value)


def test_rewards_share_one_engine():
    assert OCRReward()._load() is OCRReward()._load()
    assert OCRReward(num_threads=1)._load() is not OCRReward()._load()
