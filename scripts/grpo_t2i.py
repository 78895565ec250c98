"""Train a text-to-image model with GRPO and an f-divergence penalty (the same as `trl-t2i grpo`).

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml \
        scripts/grpo_t2i.py --config recipes/janus_pro_7b/qlora_single_gpu.yaml --divergence js
"""

from trl_t2i.cli.grpo import main, make_parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
