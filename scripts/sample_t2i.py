"""Sample images from a text-to-image model, optionally with a trained adapter (the same as `trl-t2i sample`)."""

from trl_t2i.cli.sample import main, make_parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
