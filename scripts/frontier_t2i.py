"""Sweep divergences × β on a recipe, evaluate every run and draw the reward–diversity frontier."""

from trl_t2i.cli.frontier import main, make_parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
