"""Convert the official LlamaGen-T2I checkpoints into a folder that `trl-t2i grpo` (and `from_pretrained`) loads:

    trl-t2i convert_llamagen --gpt_checkpoint t2i_XL_stage1_256.pt --vq_checkpoint vq_ds16_t2i.pt \
        --text_encoder google/flan-t5-xl --output_dir llamagen-t2i-xl-256

The checkpoints are those of HF `peizesun/llamagen_t2i` (state dicts under `"model"`); the T5 encoder and its
tokenizer are copied into the folder. The image size comes from the GPT checkpoint's name or saved training arguments
(`--image_size` when neither says it; one that disagrees is an error). A wrong or partial checkpoint fails listing the
missing and unexpected keys.
"""

from dataclasses import dataclass, field

from ..models.llamagen.conversion import convert_llamagen
from .parsing import RecipeParser


@dataclass
class ConvertLlamaGenArguments:
    """Arguments of `trl-t2i convert_llamagen`."""

    gpt_checkpoint: str = field(metadata={"help": "Official GPT checkpoint, e.g. `t2i_XL_stage1_256.pt`."})
    vq_checkpoint: str = field(metadata={"help": "Official VQ checkpoint, e.g. `vq_ds16_t2i.pt`."})
    output_dir: str = field(metadata={"help": "Folder to write the converted model and tokenizer into."})
    text_encoder: str = field(
        default="google/flan-t5-xl",
        metadata={"help": "Hub id or path of the T5 the GPT was trained with (transformers weights + tokenizer)."},
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Image size in pixels the GPT generates. Read from the checkpoint's name (`…_256.pt`, `…_512.pt`) "
            "or its saved training arguments when they say it; any size given must agree with them."
        },
    )
    num_attention_heads: int | None = field(
        default=None, metadata={"help": "Attention heads; defaults to LlamaGen's for the checkpoint's width."}
    )


def make_parser() -> RecipeParser:
    return RecipeParser(ConvertLlamaGenArguments)


def main(args: ConvertLlamaGenArguments) -> str:
    model, _ = convert_llamagen(
        args.gpt_checkpoint,
        args.vq_checkpoint,
        args.text_encoder,
        args.output_dir,
        args.image_size,
        args.num_attention_heads,
    )
    config = model.config
    print(
        f"Converted LlamaGen ({config.num_hidden_layers} layers × {config.hidden_size}, {config.num_image_tokens} "
        f"image tokens over {config.codebook_size} codes) into {args.output_dir}"
    )
    return args.output_dir


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
