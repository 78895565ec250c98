import numpy as np
import pytest
from PIL import Image

from trl_t2i.images import ELLIPSIS, caption_lines, make_grid


REWARDS = {"colour_match": "0.734", "prompt_colour_match": "0.912", "jpeg_compressibility": "-12.3"}
CAPTION = "\n".join(
    ["a photo of a red fox sitting in the snow", *(f"{name}={value}" for name, value in REWARDS.items())]
)


@pytest.mark.parametrize("width", [12, 16, 21, 40])
def test_caption_lines_keep_every_reward_whole_on_its_own_line(width):
    lines = caption_lines(CAPTION, width)
    assert all(len(line) <= width for line in lines)
    reward_lines = lines[-len(REWARDS) :]
    for line, (name, value) in zip(reward_lines, REWARDS.items(), strict=True):
        shown_name, shown_value = line.rsplit("=", 1)
        assert shown_value == value  # the number is never split nor cut
        assert shown_name == name or (shown_name.endswith(ELLIPSIS) and name.startswith(shown_name[:-1]))
    prompt_words = " ".join(lines[: -len(REWARDS)]).split()
    assert all(word in CAPTION.split() or word.endswith(ELLIPSIS) for word in prompt_words)  # split at spaces only


def test_long_prompts_are_cut_with_an_ellipsis_after_whole_words():
    lines = caption_lines("one two three four five six seven eight nine ten\nreward=1.0", width=10, prompt_lines=2)
    assert lines == ["one two", "three …", "reward=1.0"]


def test_grid_caption_area_grows_to_fit_the_longest_caption():
    images = [Image.new("RGB", (8, 8), "red")] * 2
    one_reward = make_grid(images, ["a red fox\ncolour_match=0.734"] * 2, columns=2)
    three_rewards = make_grid(images, [CAPTION, "a red fox\ncolour_match=0.734"], columns=2)
    assert three_rewards.height > one_reward.height
    caption = np.asarray(three_rewards.crop((0, 128, 128, three_rewards.height)).convert("L"))
    inked = np.flatnonzero((caption < 128).any(axis=1))  # rows of the caption area with text
    assert inked[-1] - inked[0] > 4 * 10  # five lines drawn...
    assert inked[-1] < len(caption) - 1  # ...and the last one not cut off by the edge of the grid
