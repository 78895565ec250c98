"""Convert the official LlamaGen-T2I checkpoints into a `from_pretrained` folder (the same as
`trl-t2i convert_llamagen`)."""

from trl_t2i.cli.convert_llamagen import main, make_parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
