"""Reading JSON Lines input with errors that name the file and line, shared by every CLI that reads it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any


class JSONLError(ValueError):
    """A line of a JSONL input is not what was expected; the message names the source and line."""


def iter_jsonl(lines: Iterable[bytes | str], source: str) -> Iterator[tuple[str, Any]]:
    """Yield (`"{source}: line N"`, decoded value) for each non-blank line; raise JSONLError on a bad one."""
    for number, raw in enumerate(lines, start=1):
        where = f"{source}: line {number}"
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise JSONLError(f"{where}: not UTF-8 text") from None
        if not raw.strip():
            continue
        try:
            yield where, json.loads(raw)
        except json.JSONDecodeError as error:
            raise JSONLError(f"{where}: invalid JSON ({error.msg})") from None
