"""Weight-free rewards on the JPEG file size of the image (DDPO's compressibility tasks); the caption is ignored."""

import io

from PIL import Image


JPEG_QUALITY = 95


def _jpeg_kilobytes(image: Image.Image) -> float:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.tell() / 1000


def jpeg_compressibility(prompts: list[str], completions: list[Image.Image], **kwargs) -> list[float]:
    """Minus the image's JPEG size in kB (1 kB = 1000 bytes) at quality 95: simple, flat images score higher.

    The compressibility reward of DDPO and Flow-GRPO, unscaled. The value depends on the image's resolution, so compare
    it only between images of the same size.

    Example:
        >>> jpeg_compressibility(["a red cat"], [Image.new("RGB", (64, 64), (255, 0, 0))])
        [-0.695]
    """
    return [-_jpeg_kilobytes(image) for image in completions]


def jpeg_incompressibility(prompts: list[str], completions: list[Image.Image], **kwargs) -> list[float]:
    """The image's JPEG size in kB at quality 95: detailed, textured images score higher.

    The opposite of [`jpeg_compressibility`], DDPO's incompressibility reward.

    Example:
        >>> jpeg_incompressibility(["a red cat"], [Image.new("RGB", (64, 64), (255, 0, 0))])
        [0.695]
    """
    return [_jpeg_kilobytes(image) for image in completions]
