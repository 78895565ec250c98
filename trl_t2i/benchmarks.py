"""Sampled images written in the folder layouts that the standard benchmarks' own scorers read, so that a reported
number is one command away from `trl-t2i evaluate`.

- GenEval (`djghosh13/geneval`): its `evaluation/evaluate_images.py <folder>` visits every sub-folder whose name is
  all digits, reads that folder's `metadata.jsonl` (the prompt's line of `evaluation_metadata.jsonl`, one JSON
  object) and scores every `samples/<digits>.png`:

      <folder>/00000/metadata.jsonl
      <folder>/00000/samples/0000.png, 0001.png, ...
      <folder>/00001/...

- Plain: one PNG per prompt and image, `<folder>/<prompt index:05d>_<image index:02d>.png`, and `prompts.jsonl`
  mapping each file to its prompt, for the scorers that read a folder of images (FID/KID tools, or DPG-Bench and
  T2I-CompBench after renaming to their own file names).
"""

import json
from pathlib import Path

from PIL import Image


def read_geneval_metadata(path: str | Path) -> list[str]:
    """The lines of GenEval's `evaluation_metadata.jsonl` (blank lines skipped), each checked to be a JSON object
    with a `prompt` string; returned as written, for `write_geneval` to copy.

    Example:
        >>> lines = read_geneval_metadata("geneval/prompts/evaluation_metadata.jsonl")
        >>> json.loads(lines[0])["prompt"]
        'a photo of a bench'
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"GenEval metadata {str(path)!r} does not exist. Pass the `evaluation_metadata.jsonl` of GenEval's "
            "`prompts/` folder (553 prompts), or one written by its `create_prompts.py`."
        )
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    for number, line in enumerate(lines, start=1):
        try:
            prompt = json.loads(line).get("prompt")
        except (ValueError, AttributeError):
            prompt = None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(
                f"Line {number} of {str(path)!r} is not a GenEval metadata object with a `prompt` string: "
                f"{line[:120]!r}"
            )
    if not lines:
        raise ValueError(f"GenEval metadata {str(path)!r} holds no prompts.")
    return lines


def geneval_prompts(metadata: list[str]) -> list[str]:
    """The prompt of each metadata line."""
    return [json.loads(line)["prompt"] for line in metadata]


def write_geneval(folder: Path, metadata: list[str], images: list[list[Image.Image]]) -> None:
    """One run's images in GenEval's layout: prompt `i`'s line and images under `folder/<i:05d>/`."""
    for index, (line, prompt_images) in enumerate(zip(metadata, images, strict=True)):
        samples = folder / f"{index:05d}" / "samples"
        samples.mkdir(parents=True, exist_ok=True)
        (samples.parent / "metadata.jsonl").write_text(line + "\n")
        for image_index, image in enumerate(prompt_images):
            image.save(samples / f"{image_index:04d}.png")


def write_plain(folder: Path, prompts: list[str], images: list[list[Image.Image]]) -> None:
    """One run's images as `folder/<prompt index:05d>_<image index:02d>.png`, and `folder/prompts.jsonl`."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (prompt, prompt_images) in enumerate(zip(prompts, images, strict=True)):
        for image_index, image in enumerate(prompt_images):
            name = f"{index:05d}_{image_index:02d}.png"
            image.save(folder / name)
            rows.append({"file": name, "prompt_index": index, "image_index": image_index, "prompt": prompt})
    (folder / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
