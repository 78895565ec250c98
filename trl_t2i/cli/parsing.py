"""Parsing shared by the commands: recipe paths that work from any directory, and a `--help` that shows trl_t2i's
own options before the hundreds that TRL and transformers add."""

import argparse
import dataclasses
import inspect
import sys
from collections.abc import Iterable
from pathlib import Path

from trl import TrlParser


RECIPES = Path(__file__).resolve().parents[1] / "recipes"
"""The recipes shipped in the package; a checkout's top-level `recipes` is a link to this folder."""


def find_recipe(recipe: str | Path) -> Path:
    """`recipe` if it exists, else the packaged recipe it names: `recipes/janus_pro_1b/lora_single_gpu.yaml` (the
    paths of the README and the recipe headers then work from any directory, and without a checkout),
    `janus_pro_1b/lora_single_gpu.yaml` or `janus_pro_1b/lora_single_gpu`."""
    path = Path(recipe)
    if path.is_file():
        return path
    name = path.parts[1:] if path.parts[:1] == ("recipes",) else path.parts
    packaged = RECIPES.joinpath(*name)
    for candidate in (packaged, packaged.with_name(f"{packaged.name}.yaml")):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(f"recipes/{path.relative_to(RECIPES)}" for path in RECIPES.rglob("*.yaml")))
    raise FileNotFoundError(f"Recipe {str(recipe)!r} not found here nor among the packaged recipes: {shipped}.")


class RecipeParser(TrlParser):
    """A `TrlParser` whose `--config` is listed in `--help` and may name a packaged recipe (see `find_recipe`)."""

    def __init__(self, dataclass_types, **kwargs):
        kwargs.setdefault("usage", "%(prog)s [--config recipe.yaml] [--option value ...]")  # not 300 options
        super().__init__(dataclass_types, **kwargs)
        # Only documents the flag: `parse_args_and_config` takes `--config` out before argparse sees it, and
        # SUPPRESS keeps it out of the parsed namespace.
        self.add_argument(
            "--config",
            default=argparse.SUPPRESS,
            metavar="YAML",
            help="Recipe whose keys set the defaults of the options below; flags override it. A path that does not "
            "exist here names a recipe shipped with trl_t2i: recipes/tiny/cpu_demo.yaml, tiny/cpu_demo.yaml or "
            "tiny/cpu_demo.",
        )

    def parse_args_and_config(self, args: Iterable[str] | None = None, *more, **kwargs):
        args = list(sys.argv[1:] if args is None else args)
        args = [part for arg in args for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
        # TRL reads the first `--config` only, and argparse would pass a second one on as an extra namespace
        values = [index + 1 for index, arg in enumerate(args) if arg == "--config"]
        if any(index == len(args) or args[index].startswith("--") for index in values):
            self.error("--config needs a recipe, e.g. --config recipes/tiny/cpu_demo.yaml.")
        if len(values) > 1:
            self.error(
                f"--config given {len(values)} times ({', '.join(args[index] for index in values)}): give one recipe "
                "and override its keys with --flags (e.g. --learning_rate 1e-4)."
            )
        if values:
            args[values[0]] = str(find_recipe(args[values[0]]))
        return super().parse_args_and_config(args, *more, **kwargs)


def group_options(parser: TrlParser, groups: list[tuple[str, list[str]]], hidden: Iterable[str] = ()):
    """Show each option of `parser` in `--help` under the first of `groups` (title, field names) that names it, in
    the order of the groups and of their names, after `-h` and `--config`. The `hidden` options are left out of
    `--help` but still parse, so that a config that rejects them can say why."""
    hidden = set(hidden)
    sections = [
        (parser.add_argument_group(title), {name: i for i, name in enumerate(names)}) for title, names in groups
    ]
    for action in list(parser._optionals._group_actions):
        if action.dest in hidden:
            action.help = argparse.SUPPRESS
        for section, order in sections:
            if action.dest in order:
                parser._optionals._group_actions.remove(action)
                section._group_actions.append(action)
                break
    for section, order in sections:
        section._group_actions.sort(key=lambda action: order[action.dest])  # stable: `--no_x` stays after `--x`
    return parser


def field_names(dataclass_type, own: bool = False) -> list[str]:
    """The fields of a dataclass; with `own`, only those its class body declares (new or overridden), in its order."""
    names = [field.name for field in dataclasses.fields(dataclass_type)]
    return [name for name in inspect.get_annotations(dataclass_type) if name in names] if own else names
