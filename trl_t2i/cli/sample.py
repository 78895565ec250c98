"""Sample images from an autoregressive text-to-image model (optionally with a trained LoRA adapter).

    trl-t2i sample --model_name_or_path tiny:janus --prompts "a red cat" "a blue dog"
    trl-t2i sample --model_name_or_path deepseek-community/Janus-Pro-7B --adapter me/janus-grpo-js \
        --prompts "a photo of an astronaut riding a horse" --num_images_per_prompt 4 --dtype bfloat16

Writes one PNG per image and a captioned `grid.png` to `--output_dir`.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import check_prompts_fit
from ..decoding import compile_setting, resolve_compile, sample_image_tokens
from ..images import make_grid, to_pil
from ..models import TINY_JANUS, get_family, load_adapter, load_family, load_model
from ..pretrained import default_device
from .arguments import SamplingArguments
from .parsing import RecipeParser


@dataclass
class SampleArguments(SamplingArguments):
    """Arguments of `trl-t2i sample`; each is also a `--flag` and a YAML key."""

    model_name_or_path: str = field(default=TINY_JANUS, metadata={"help": "Hub id or local path of the base model."})
    adapter: str | None = field(default=None, metadata={"help": "Hub id or local path of a PEFT adapter to apply."})
    prompts: list[str] = field(
        default_factory=lambda: ["a red cat", "a green tree", "a blue sky", "a yellow flower"],
        metadata={"help": "Captions to generate images for."},
    )
    num_images_per_prompt: int = field(default=4, metadata={"help": "Images sampled per caption."})
    batch_size: int = field(default=16, metadata={"help": "Images generated per forward batch."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling generator."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype: float32, bfloat16 or float16."})
    device: str | None = field(default=None, metadata={"help": "Device (default: cuda when available, else cpu)."})
    output_dir: str = field(default="outputs/samples", metadata={"help": "Where images and the grid are written."})
    compile: str = field(
        default="auto",
        metadata={
            "help": "Decode with a static KV cache and a torch.compile'd step (CUDA graphs on GPU), compiled once: "
            "`auto` (on CUDA), `true` or `false`."
        },
    )

    def __post_init__(self):
        self.device = self.device or default_device()
        self.compile = compile_setting(self.compile)


def main(args: SampleArguments) -> Path:
    sampling = args.sampling  # bad settings fail before the model loads
    if args.adapter:
        check_adapter(args.adapter, args.model_name_or_path)
    # its config and processor: the prompts are checked before the weights load
    family = load_family(args.model_name_or_path)
    check_prompts_fit(args.prompts, family)
    model = load_model(args.model_name_or_path, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    if args.adapter:
        # Folded into the base weights once: sampling then runs one matmul per linear instead of three.
        model = load_adapter(model, args.adapter, args.model_name_or_path).merge_and_unload()
    family = get_family(model, family.processing_class)
    captions = [prompt for prompt in args.prompts for _ in range(args.num_images_per_prompt)]
    generator = torch.Generator(args.device).manual_seed(args.seed)
    compile = resolve_compile(args.compile, family, args.device)  # a last, smaller batch reuses the compiled shape

    images = []
    for start in range(0, len(captions), args.batch_size):
        conditioning = family.encode_prompts(captions[start : start + args.batch_size]).to(args.device)
        sample = sample_image_tokens(
            family, model, conditioning, sampling, generator=generator, compile=compile, show_progress=True
        )
        images += to_pil(family.decode(model, sample.image_tokens))

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        image.save(output_dir / f"{index:04d}.png")
    grid_path = output_dir / "grid.png"
    make_grid(images, captions, columns=args.num_images_per_prompt).save(grid_path)
    print(f"Wrote {len(images)} images and {grid_path}")
    return grid_path


def check_adapter(adapter: str, model_name_or_path: str) -> None:
    """A local adapter must be readable and of the base model's family; anything else must look like a Hub id."""
    from ..evaluation import check_base_model, read_run  # here: the evaluation's plotting is not sampling's to import

    if Path(adapter).exists():
        check_base_model(read_run(adapter), model_name_or_path)
    elif not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", adapter):
        raise FileNotFoundError(f"--adapter {adapter!r} is not a directory, nor a Hub id (`namespace/name`).")


def make_parser() -> RecipeParser:
    return RecipeParser(SampleArguments)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
