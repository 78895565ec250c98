"""Evaluate a base model and trained runs on reward and diversity, and draw the frontier
(the same as `trl-t2i evaluate`)."""

from trl_t2i.cli.evaluate import main, make_parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
