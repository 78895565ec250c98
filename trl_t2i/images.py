"""Image helpers: uint8 tensors to PIL, and captioned grids for logs and model cards."""

import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


ELLIPSIS = "…"


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """`uint8` images `(B, H, W, 3)` to a list of RGB PIL images."""
    return [Image.fromarray(image) for image in images.cpu().numpy()]


def save_whole(image: Image.Image, path: str | Path) -> None:
    """Save `image` as a PNG at `path` whole or not at all: written under a temporary name and renamed into place, so
    that a full disk or a crash never leaves a truncated (often 0-byte) image for a model card or a tracker to show.
    A failure names the file."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        image.save(partial, format="PNG")
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise OSError(error.errno, f"Could not write {path} ({error}); nothing was written there.") from error


def make_grid(
    images: list[Image.Image], captions: list[str] | None = None, columns: int = 4, cell_size: int = 128
) -> Image.Image:
    """Lay `images` out in a grid, each scaled to `cell_size` pixels (nearest: tiny images stay crisp), with an
    optional caption under each, laid out by `caption_lines`: the caption area grows to fit the longest one."""
    if not images:
        raise ValueError("make_grid needs at least one image.")
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    texts = ["\n".join(caption_lines(caption, cell_size - 4, font.getlength)) for caption in captions or []]
    caption_height = max((draw.multiline_textbbox((0, 0), text, font=font, spacing=1)[3] for text in texts), default=0)
    caption_height += 4 if captions else 0
    grid = Image.new("RGB", (columns * cell_size, rows * (cell_size + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for index, image in enumerate(images):
        x, y = (index % columns) * cell_size, (index // columns) * (cell_size + caption_height)
        grid.paste(image.convert("RGB").resize((cell_size, cell_size), Image.NEAREST), (x, y))
        if captions:
            draw.multiline_text((x + 2, y + cell_size + 2), texts[index], fill="black", font=font, spacing=1)
    return grid


def caption_lines(
    caption: str, width: float, measure: Callable[[str], float] = len, prompt_lines: int = 3
) -> list[str]:
    """The lines a caption is drawn in, each at most `width` wide as `measure` sees it (characters by default).

    The caption's first line (the prompt) wraps onto at most `prompt_lines` lines, ending in `…` when cut; each
    further line (a reward, `name=value`) starts a line of its own. Lines break at spaces only, so a number or a
    `name=value` is never split; a word too long for a line is shortened with `…` (in its name, for `name=value`).

    >>> caption_lines("a red fox in the snow\\ncolour_match=0.734\\nprompt_colour_match=0.912", width=20)
    ['a red fox in the', 'snow', 'colour_match=0.734', 'prompt_colour…=0.912']
    """
    prompt, *rewards = caption.splitlines() or [""]
    words = prompt.split()
    lines = _wrap(words, width, measure)
    while len(lines) > prompt_lines:
        words = words[:-1]
        lines = _wrap([*words, ELLIPSIS], width, measure)
    for reward in rewards:
        lines += _wrap(reward.split(), width, measure)
    return lines


def _wrap(words: list[str], width: float, measure: Callable[[str], float]) -> list[str]:
    """Greedy wrap of whole words; a word wider than a line is shortened."""
    lines = []
    for word in (_shorten(word, width, measure) for word in words):
        if lines and measure(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _shorten(word: str, width: float, measure: Callable[[str], float]) -> str:
    """`word` if it fits, else cut with `…`: a `name=value` in its name (the value stays whole), anything else at
    its end."""
    if measure(word) <= width:
        return word
    name, equals, value = word.rpartition("=")
    if not equals:
        name, value = word, ""
    while name and measure(f"{name}{ELLIPSIS}{equals}{value}") > width:
        name = name[:-1]
    return f"{name}{ELLIPSIS}{equals}{value}"
