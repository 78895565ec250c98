"""Plan a training recipe for a GPU's memory: largest batches, LoRA/QLoRA, flags (the same as `trl-t2i plan`)."""

from trl_t2i.cli.plan import main, make_parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
