"""The command line's argument parser: argparse whose usage errors are one line, `PROG: error: MESSAGE`."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser that reports a usage error in one line (exit status 2) instead of the usage text;
    `--help` still shows it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def field_help(config_class: Any, name: str) -> str:
    """A config dataclass field's help string as argparse help (a literal `%` escaped: argparse formats it)."""
    return config_class.__dataclass_fields__[name].metadata["help"].replace("%", "%%")
