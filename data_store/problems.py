"""Problem loaders: JSONL, Parquet (`shared:NAME` for a file of the shared data directory), or a
Hugging Face `datasets` name -> the `problems` table.

Every source becomes rows of `problem_id`, `problem`, `answer`, `source`, `metadata` (the source's
other fields as JSON). Field names are mapped (`fields={"problem": "question"}`); without a mapping
the usual names are tried (`problem`/`question`, `answer`/`final_answer`,
`problem_id`/`id`/`unique_id`), so a problems table written by this package loads back unchanged.
The problem id is stable: the source's id when it has one, else a hash of the problem text, so the
same problem keeps its id across rounds, runs and machines.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_store.schema import conform
from search.jsonl import JSONLError, iter_jsonl

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
SHARED_PREFIX = "shared:"
DEFAULT_FIELDS: dict[str, tuple[str, ...]] = {
    "problem": ("problem", "question"),
    "answer": ("answer", "final_answer"),
    "id": ("problem_id", "id", "unique_id"),
    "source": ("source",),
}


class ProblemsError(ValueError):
    """A problem source cannot be turned into a valid problems table."""


def content_id(problem: str) -> str:
    """The id of a problem that has none: a hash of its whitespace-trimmed text."""
    return "sha256-" + hashlib.sha256(problem.strip().encode("utf-8")).hexdigest()[:16]


def problems_file(source: str | Path) -> Path | None:
    """The file a problems source names, or None for a `datasets` name. `shared:NAME` is NAME in the
    shared data directory (`data_store.home.shared_data_dir`, as benchmark names are), so a recipe
    naming it works from any directory and follows `$KAIZEN_SHARED_DATA`."""
    text = str(source)
    if text.startswith(SHARED_PREFIX):
        from data_store.home import shared_data_dir

        return shared_data_dir() / text.removeprefix(SHARED_PREFIX)
    path = Path(source)
    # A path whose folder exists here ("data/problems" next to ./data) is meant as a file: looking it
    # up on the hub instead only fails slowly, naming the hub. (A directory is a `datasets` source.)
    meant_as_file = not path.exists() and len(path.parts) > 1 and path.parent.is_dir()
    return path if path.is_file() or path.suffix in FILE_SUFFIXES or meant_as_file else None


def load_problems(
    source: str | Path,
    *,
    fields: Mapping[str, str] | None = None,
    split: str = "test",
    require_answer: bool = True,
    limit: int | None = None,
) -> pa.Table:
    """Load problems from a JSONL/Parquet file or a `datasets` name (`name` or `name:config`).

    `fields` maps our names (`problem`, `answer`, `id`, `source`) to the source's. With
    `require_answer`, a problem without a reference answer is an error naming it.
    """
    path = problems_file(source)
    if path is not None:
        if not path.is_file():
            raise ProblemsError(f"problems file {path} does not exist")
        rows = _parquet_rows(path) if path.suffix == ".parquet" else _jsonl_rows(path)
        default_source = path.stem
    else:
        rows = _dataset_rows(str(source), split)
        default_source = str(source)
    return _problems_table(
        rows,
        fields=fields or {},
        default_source=default_source,
        require_answer=require_answer,
        limit=limit,
        origin=str(source),
    )


def problems_table(rows: Iterable[Mapping[str, Any]], *, source: str) -> pa.Table:
    """Problems given as rows in memory (the fields a file would have), as a problems table."""
    return _problems_table(
        ((f"row {number}", dict(row)) for number, row in enumerate(rows, start=1)),
        fields={}, default_source=source, require_answer=True, limit=None, origin=source,
    )


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open("rb") as lines:
        try:
            for where, row in iter_jsonl(lines, str(path)):
                if not isinstance(row, dict):
                    raise ProblemsError(f"{where}: expected a JSON object")
                yield where.rpartition(": ")[2], row
        except JSONLError as error:
            raise ProblemsError(str(error)) from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise ProblemsError(f"{path} is not a readable Parquet file: {error}") from error
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"row {number}", row


def _dataset_rows(name: str, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets  # noqa: PLC0415 - heavy; only this source needs it

    dataset_name, _, config_name = name.partition(":")
    try:
        dataset = datasets.load_dataset(dataset_name, config_name or None, split=split)
    except Exception as error:  # the hub, the cache and the builder all raise their own types
        raise ProblemsError(f"cannot load dataset {name!r} (split {split!r}): {error}") from error
    for number, row in enumerate(dataset, start=1):
        yield f"row {number}", dict(row)


def _pick(row: Mapping[str, Any], ours: str, fields: Mapping[str, str]) -> tuple[str | None, Any]:
    """The source field holding `ours` and its value; (None, None) when the row has none."""
    candidates = (fields[ours],) if ours in fields else DEFAULT_FIELDS[ours]
    for name in candidates:
        if name in row:
            return name, row[name]
    return None, None


def _text(value: Any, field_name: str | None, location: str) -> str | None:
    """A field as stripped text (a number as written), or None when missing or blank."""
    if value is None:
        return None
    # str() would turn `true` into "True" and a list into its repr, and a reference no answer can match.
    if isinstance(value, (bool, list, tuple, dict)):
        raise ProblemsError(f"{location}: field {field_name} holds {type(value).__name__} {value!r}; "
                            "expected text or a number")
    text = str(value).strip()
    return text or None


def _normalised_metadata(value: Any) -> dict[str, Any]:
    """The fields of a `metadata` column written by this module (a JSON object), so reading a
    normalised table back does not nest its metadata one level deeper; any other value stays as is."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return {"metadata": value}
        return parsed if isinstance(parsed, dict) else {"metadata": value}
    return {"metadata": value}


def check_field_mapping(fields: Mapping[str, str]) -> None:
    """ProblemsError naming every key of a `{our column: source column}` mapping that is not one of ours."""
    unknown = set(fields) - set(DEFAULT_FIELDS)
    if unknown:
        raise ProblemsError(
            f"unknown field mapping key(s) {', '.join(sorted(unknown))}; use {', '.join(DEFAULT_FIELDS)}"
        )


def _problems_table(
    rows: Iterable[tuple[str, dict[str, Any]]],
    *,
    fields: Mapping[str, str],
    default_source: str,
    require_answer: bool,
    limit: int | None,
    origin: str,
) -> pa.Table:
    check_field_mapping(fields)
    seen: dict[str, tuple[str, str | None]] = {}
    columns: dict[str, list[str | None]] = {
        name: [] for name in ("problem_id", "problem", "answer", "source", "metadata")
    }
    for where, row in rows:
        if limit is not None and len(seen) >= limit:
            break
        location = f"{origin} {where}"
        problem_field, problem = _pick(row, "problem", fields)
        problem = _text(problem, problem_field, location)
        if problem is None:
            raise ProblemsError(
                f"{location}: no problem text (field {problem_field or '/'.join(DEFAULT_FIELDS['problem'])})"
            )
        id_field, raw_id = _pick(row, "id", fields)
        problem_id = _text(raw_id, id_field, location) or content_id(problem)
        answer_field, answer = _pick(row, "answer", fields)
        answer = _text(answer, answer_field, location)
        if require_answer and answer is None:
            raise ProblemsError(
                f"{location}: problem {problem_id} has no answer; rollouts need a reference answer"
            )
        if problem_id in seen:
            if seen[problem_id] != (problem, answer):
                raise ProblemsError(f"{location}: problem id {problem_id} appears twice with different content")
            continue  # the same problem listed twice
        seen[problem_id] = (problem, answer)
        source_field, source = _pick(row, "source", fields)
        used = {problem_field, id_field, answer_field, source_field}
        extra = {key: value for key, value in row.items() if key not in used}
        extra.update(_normalised_metadata(extra.pop("metadata", None)))
        columns["problem_id"].append(problem_id)
        columns["problem"].append(problem)
        columns["answer"].append(answer)
        columns["source"].append(_text(source, source_field, location) or default_source)
        columns["metadata"].append(
            json.dumps(extra, sort_keys=True, default=str, ensure_ascii=False) if extra else None
        )
    return conform(
        pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()}), "problems", source=origin
    )
