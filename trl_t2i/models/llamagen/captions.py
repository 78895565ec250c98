"""The caption cleaning LlamaGen-T2I was trained with, applied before T5 as its T5 embedder does (`language/t5.py`,
`use_text_preprocessing=True`, PixArt-α's rules): every caption goes through `clean_caption_once` twice.

One pass URL-decodes and lowercases the caption, then removes what web captions carry besides a description (URLs,
HTML, @handles, CJK characters, IP addresses, file names, ids and product codes, shop boilerplate such as "free
shipping", sizes such as "2x2"), unifies dashes and quotes, turns most symbols into spaces ("&", "#", "/", "*", …),
repairs mis-decoded text (ftfy) and spaces punctuation followed by a letter ("u.s." → "u. s."). The rules run in
LlamaGen's order: each one sees the output of the one before.

It needs `ftfy` and `beautifulsoup4`: `pip install "trl_t2i[llamagen]"`.
"""

import html
import importlib.util
import re
import urllib.parse
import warnings


EXTRA_PACKAGES = {"ftfy": "ftfy", "bs4": "beautifulsoup4"}
"""The modules the cleaning imports, and their packages (the `llamagen` extra)."""

_FILE_EXTENSIONS = "png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4"
_DOMAIN = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b/?(?!@)"
_DASHES = (
    "\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0"
    "\ufe31\ufe32\ufe58\ufe63\uff0d"
)


def _rules(*pairs: tuple[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(pattern), replacement) for pattern, replacement in pairs]


# Before the HTML is parsed: a URL's scheme ("http:", "www:" and what follows) or a bare domain goes.
_BEFORE_HTML = _rules(
    ("<person>", "person"),
    (rf"\b(?:https?:(?:/{{1,3}}|[a-zA-Z0-9%])|{_DOMAIN})", ""),
    (rf"\b(?:www:(?:/{{1,3}}|[a-zA-Z0-9%])|{_DOMAIN})", ""),
)

# On the text of the HTML: markup leftovers, noise, dashes and quotes unified, symbols to spaces.
_AFTER_HTML = _rules(
    (r"@[\w\d]+\b", ""),  # @handles
    ("[\u31c0-\u9fff]+", ""),  # CJK strokes, enclosed letters, compatibility forms and ideographs
    (f"[{_DASHES}]+", "-"),
    ("[`´«»“”¨]", '"'),
    ("[‘’]", "'"),
    ("&quot;?", ""),
    ("&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # a trailing article id
    (r"\\n", " "),  # an escaped new line left in the text
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (rf"\S+\.(?:{_FILE_EXTENSIONS})", ""),  # file names
    ("[\"']{2,}", '"'),
    (r"\.{2,}", " "),
    (r"[#®•©™&@·º½¾¿¡§~)(\]\[}{|\\/*]+", " "),
    (r"\s+\.\s+", " "),
)

# Words joined by dashes or underscores (slugs, file names) are split when there are more than three joints.
_JOINTS = re.compile(r"[-_]")

# After the text is repaired: codes, boilerplate and sizes removed, then punctuation and spaces tidied.
_AFTER_REPAIR = _rules(
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (rf"\b(?:{_FILE_EXTENSIONS})(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes: 2x2, 1.5×3 (also with a Cyrillic х)
    (r"\b\s+:\s+", ": "),
    (r"(\D[,./])\b", r"\1 "),  # a space after punctuation followed by a word: "u.s." → "u. s."
    (r"\s+", " "),
    (r"^[\"']([\w\W]+)[\"']$", r"\1"),  # the caption quoted as a whole
    (r"^['_,\-:;]", ""),
    (r"['_,\-:+]$", ""),
    (r"^\.\S+$", ""),
)


def missing_packages() -> list[str]:
    """The packages of the `llamagen` extra that are not installed."""
    return [package for module, package in EXTRA_PACKAGES.items() if importlib.util.find_spec(module) is None]


def check_installed() -> None:
    """Raise a clear `ImportError` when the cleaning cannot run."""
    missing = missing_packages()
    if missing:
        raise ImportError(
            f"This LlamaGen model cleans its captions as LlamaGen did in training (its config's `clean_captions`), "
            f'which needs {" and ".join(missing)}: pip install "trl_t2i[llamagen]". Only a model trained on '
            "lowercased captions should set `clean_captions: false` in its config.json instead."
        )


def clean_caption(caption: str) -> str:
    """A caption as LlamaGen-T2I's T5 encoder saw captions in training: `clean_caption_once`, twice.

    ```python
    >>> clean_caption("A 2x2 grid of U.S. stamps & coins")
    'a grid of u. s. stamps coins'
    ```
    """
    return clean_caption_once(clean_caption_once(caption))


def clean_caption_once(caption: str) -> str:
    """One pass of LlamaGen's (PixArt-α's) caption cleaning (see the module docstring)."""
    import ftfy
    from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning

    caption = urllib.parse.unquote_plus(str(caption)).strip().lower()
    caption = _substitute(caption, _BEFORE_HTML)
    with warnings.catch_warnings():  # a caption that looks like a file name or URL is still a caption
        warnings.simplefilter("ignore", MarkupResemblesLocatorWarning)
        caption = BeautifulSoup(caption, features="html.parser").text
    caption = _substitute(caption, _AFTER_HTML)
    if len(_JOINTS.findall(caption)) > 3:
        caption = _JOINTS.sub(" ", caption)
    caption = html.unescape(html.unescape(ftfy.fix_text(caption))).strip()
    return _substitute(caption, _AFTER_REPAIR).strip()


def _substitute(caption: str, rules: list[tuple[re.Pattern, str]]) -> str:
    for pattern, replacement in rules:
        caption = pattern.sub(replacement, caption)
    return caption
