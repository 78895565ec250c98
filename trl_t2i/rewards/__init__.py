"""Reward functions with TRL's signature `f(prompts, completions, **kwargs) -> list[float | None]`.

`completions` are PIL images; `prompts` are the raw captions (not chat-templated).
"""

from .colour import COLOUR_RGB, prompt_colour_match


__all__ = ["COLOUR_RGB", "prompt_colour_match"]
