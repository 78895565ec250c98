"""Weight-free rewards that read the image's colours: no model, no download, meaningful on the tiny models."""

import re

import numpy as np
from PIL import Image


COLOUR_RGB = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "orange": (255, 165, 0),
    "purple": (128, 0, 128),
    "pink": (255, 192, 203),
    "grey": (128, 128, 128),
}
_COLOUR_WORD = re.compile(r"\b(" + "|".join(COLOUR_RGB) + r")\b", re.IGNORECASE)
_MAX_DISTANCE = np.sqrt(3) * 255.0


def colour_match(prompts: list[str], completions: list[Image.Image], **kwargs) -> list[float | None]:
    """How close each image's mean colour is to the first colour named in its caption, in [0, 1].

    `1 − ‖mean RGB − target RGB‖ / (√3·255)`. Captions naming no colour get `None` (TRL skips them).

    Example:
        >>> colour_match(["a red cat"], [Image.new("RGB", (8, 8), (255, 0, 0))])
        [1.0]
    """
    rewards = []
    for prompt, image in zip(prompts, completions, strict=True):
        match = _COLOUR_WORD.search(prompt)
        if match is None:
            rewards.append(None)
            continue
        mean = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)
        distance = np.linalg.norm(mean - np.array(COLOUR_RGB[match.group(1).lower()], dtype=np.float64))
        rewards.append(float(1.0 - distance / _MAX_DISTANCE))
    return rewards
