"""Upload a training output directory (adapter, processor files, card, sample grid) to the Hub, e.g. to retry a
push that failed at the end of training:

    trl-t2i push --output_dir runs/janus-js --hub_model_id me/janus-pro-7b-grpo-js [--dry_run]
"""

from dataclasses import dataclass, field

from ..hub import push_output, upload_files
from .parsing import RecipeParser


@dataclass
class PushArguments:
    """Arguments of `trl-t2i push`."""

    output_dir: str = field(metadata={"help": "Training output directory (what `save_model` wrote)."})
    hub_model_id: str = field(metadata={"help": "Target repo id, e.g. `me/janus-pro-7b-grpo-js`."})
    private: bool | None = field(default=None, metadata={"help": "Create the repo as private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to."})
    dry_run: bool = field(
        default=False,
        metadata={"help": "List the files that would be uploaded, and where, without contacting the Hub."},
    )


def make_parser() -> RecipeParser:
    return RecipeParser(PushArguments)


def main(args: PushArguments) -> str | None:
    if args.dry_run:
        files = upload_files(args.output_dir)
        print(f"Would upload {len(files)} files from {args.output_dir} to the Hub repo {args.hub_model_id}:")
        print("\n".join(f"  {path.name}  ({path.stat().st_size / 1e6:.2f} MB)" for path in files))
        return None
    url = push_output(args.output_dir, args.hub_model_id, private=args.private, revision=args.revision)
    print(f"Pushed {args.output_dir} to {url}")
    return url


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
