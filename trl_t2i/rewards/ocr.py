"""Text-rendering reward: a real OCR model (PP-OCRv4, run by RapidOCR on onnxruntime) reads the image, and the text
it reads is compared with the text the caption quotes. `rapidocr-onnxruntime` is an optional extra whose wheel ships
the detection and recognition models, so nothing is downloaded."""

import os
import re

from PIL import Image

from ..pretrained import load_shared


_QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”')
_WHITESPACE = re.compile(r"\s+")
_MODEL_SETTINGS = {"det_model_path": "text-detection", "rec_model_path": "text-recognition"}


def _import_rapidocr():
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as err:
        raise ImportError(
            'The ocr reward needs RapidOCR: `pip install "trl_t2i[ocr]"` (or `pip install rapidocr-onnxruntime`, '
            "Python < 3.13)."
        ) from err
    return RapidOCR


def quoted_text(prompt: str) -> str | None:
    """The text a caption asks to be written: its quoted spans (`"…"` or `“…”`) joined by spaces, else `None`.

    Example:
        >>> quoted_text('a neon sign that says "OPEN" above a door')
        'OPEN'
        >>> quoted_text("a red cat") is None
        True
    """
    spans = [straight or curly for straight, curly in _QUOTED.findall(prompt)]
    text = " ".join(span.strip() for span in spans if span.strip())
    return text or None


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions that turn `a` into `b`.

    Example:
        >>> edit_distance("kitten", "sitting")
        3
    """
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def text_similarity(read: str, target: str) -> float:
    """`1 − edit_distance / len(target)`, clipped to [0, 1], on lower-cased strings without whitespace (Flow-GRPO's
    OCR rule): 1 for the exact text, 0 when nothing of it was read.

    Example:
        >>> text_similarity("Open 24 h", "OPEN 24H")
        1.0
        >>> text_similarity("OPFN", "OPEN")
        0.75
    """
    read, target = (_WHITESPACE.sub("", text).lower() for text in (read, target))
    return max(0.0, 1.0 - edit_distance(read, target) / len(target)) if target else 0.0


class OCRReward:
    """How well the image renders the text its caption quotes, in [0, 1]; captions that quote nothing get `None`.

    The OCR model reads every text line of the image (PP-OCRv4 detection, direction classification and recognition,
    lines with a recognition confidence below 0.5 dropped), the lines are joined, and the result is compared with the
    caption's quoted text (see [`quoted_text`]) by [`text_similarity`]: `1 − normalised edit distance`, case and
    spaces ignored. Extra text costs as much as missing text, so writing the word twice does not pay. A blank image
    scores 0. Runs on the CPU (onnxruntime), about 0.3–1 s per image; one model per process, loaded on the first call.
    Needs the `ocr` extra (`pip install "trl_t2i[ocr]"`).

    Args:
        det_model_path (`str`, *optional*):
            Local path of a PP-OCR text-detection model in ONNX format. Default: PP-OCRv4's, shipped in the
            `rapidocr-onnxruntime` wheel.
        rec_model_path (`str`, *optional*):
            Local path of a PP-OCR text-recognition model in ONNX format (with its character list in the model's
            metadata, as PP-OCRv4's). Default: PP-OCRv4's (Chinese and English), shipped in the wheel.
        num_threads (`int`, *optional*):
            onnxruntime threads per model; default: all cores.

    Example:
        >>> reward = OCRReward()
        >>> reward(['a shop sign that says "OPEN"', "a red cat"], [sign, cat])  # sign: an image showing "OPEN"
        [1.0, None]
    """

    __name__ = "ocr"

    def __init__(
        self, det_model_path: str | None = None, rec_model_path: str | None = None, num_threads: int | None = None
    ):
        _import_rapidocr()  # fail when the reward is created, not in the middle of the first training step
        for setting, path in (("det_model_path", det_model_path), ("rec_model_path", rec_model_path)):
            if path is not None and not os.path.isfile(path):
                raise FileNotFoundError(
                    f"The ocr reward cannot load its {_MODEL_SETTINGS[setting]} model: `{setting}={path!r}` is not a "
                    f"file. Pass `{setting}` the path of a PP-OCR {_MODEL_SETTINGS[setting]} model in ONNX format "
                    f"(in a recipe: `reward_kwargs: {{ocr: {{{setting}: /path/to/model.onnx}}}}`), or leave it unset "
                    "for PP-OCRv4's, shipped in the rapidocr-onnxruntime wheel."
                )
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"`num_threads` must be at least 1 (or unset for all cores), got {num_threads}.")
        self.det_model_path, self.rec_model_path, self.num_threads = det_model_path, rec_model_path, num_threads
        self.engine = None

    def _load(self):
        settings = {"det_model_path": self.det_model_path, "rec_model_path": self.rec_model_path}
        settings = {name: path for name, path in settings.items() if path is not None}
        if self.num_threads is not None:
            settings["intra_op_num_threads"] = self.num_threads
        return load_shared(("rapidocr", *sorted(settings.items())), lambda: _import_rapidocr()(**settings))

    def read(self, image: Image.Image) -> str:
        """Every text line the model reads in `image`, joined by spaces (top to bottom)."""
        if self.engine is None:
            self.engine = self._load()
        lines, _ = self.engine(image.convert("RGB"))
        return " ".join(text for _, text, _ in lines or [])

    def __call__(self, prompts: list[str], completions: list[Image.Image], **kwargs) -> list[float | None]:
        targets = [quoted_text(prompt) for prompt in prompts]
        return [
            None if target is None else text_similarity(self.read(image), target)
            for target, image in zip(targets, completions, strict=True)
        ]
