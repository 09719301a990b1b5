"""The command line's argument parser: argparse whose usage errors are one line, `PROG: error: MESSAGE`."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from search.steps import WORKED_EXAMPLES


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser that reports a usage error in one line (exit status 2) instead of the usage text;
    `--help` still shows it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def field_help(config_class: Any, name: str, *, show_default: bool = False) -> str:
    """A config dataclass field's help string as argparse help (a literal `%` escaped: argparse formats it),
    with the option's default after it when `show_default`."""
    text = config_class.__dataclass_fields__[name].metadata["help"].replace("%", "%%")
    return f"{text} (default %(default)s)" if show_default else text


def add_worked_examples_argument(parser: argparse.ArgumentParser) -> None:
    """`--worked-examples N`, for the commands that sample from a policy."""
    parser.add_argument("--worked-examples", type=int, default=0, choices=range(len(WORKED_EXAMPLES) + 1),
                        metavar=f"{{0..{len(WORKED_EXAMPLES)}}}",
                        help="worked examples in the step format shown before every prompt, for a base model "
                             "that never saw the format (default %(default)s)")
