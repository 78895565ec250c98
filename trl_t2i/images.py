"""Image helpers: uint8 tensors to PIL, and captioned grids for logs and model cards."""

import textwrap

import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """`uint8` images `(B, H, W, 3)` to a list of RGB PIL images."""
    return [Image.fromarray(image) for image in images.cpu().numpy()]


def make_grid(
    images: list[Image.Image], captions: list[str] | None = None, columns: int = 4, cell_size: int = 128
) -> Image.Image:
    """Lay `images` out in a grid, each scaled to `cell_size` pixels (nearest: tiny images stay crisp), with an
    optional caption of up to three lines under each (each line of a caption wraps on its own)."""
    if not images:
        raise ValueError("make_grid needs at least one image.")
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    font = ImageFont.load_default()
    caption_height = 3 * 12 + 4 if captions else 0
    grid = Image.new("RGB", (columns * cell_size, rows * (cell_size + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    characters_per_line = max(8, cell_size // 6)
    for index, image in enumerate(images):
        x, y = (index % columns) * cell_size, (index // columns) * (cell_size + caption_height)
        grid.paste(image.convert("RGB").resize((cell_size, cell_size), Image.NEAREST), (x, y))
        if captions:
            lines = [
                part for line in captions[index].splitlines() for part in textwrap.wrap(line, characters_per_line)
            ]
            lines = lines[:3]
            draw.multiline_text((x + 2, y + cell_size + 2), "\n".join(lines), fill="black", font=font, spacing=1)
    return grid
