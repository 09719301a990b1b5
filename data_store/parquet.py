"""Atomic Parquet and JSON writes: a reader sees a whole file or none, even if the writer is killed mid-file.

Every writer here writes to a hidden temporary name in the destination directory
(`.{name}.{pid}.{random}.tmp`), fsyncs it, and renames it over the final name with `os.replace`
(atomic on POSIX within one file system), then fsyncs the directory so the rename survives a crash.
Readers glob final names only (`*.parquet`), which a temporary name never matches. A killed writer
leaves at most a hidden `.tmp` file behind; `remove_stale_temporaries` sweeps those.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_store.schema import conform

COMPRESSION = "zstd"
TEMP_SUFFIX = ".tmp"


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (which makes the renames and new names in it durable)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; once the block succeeds it becomes `path` atomically.

    Whatever writes the file (pyarrow, DuckDB's COPY) writes to the yielded path. If the block
    raises, the temporary file is removed and `path` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_name(final)
    try:
        yield temporary
        fsync_path(temporary)
        os.replace(temporary, final)
        fsync_path(final.parent)
    finally:
        temporary.unlink(missing_ok=True)


def write_json(path: str | os.PathLike[str], document: Any, **dumps_options: Any) -> Path:
    """Write `document` as JSON (one trailing newline) to `path` atomically; options go to `json.dumps`."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(document, **dumps_options) + "\n", encoding="utf-8")
    return Path(path)


def write_table(data: pa.Table, path: str | os.PathLike[str], *, table: str | None = None) -> Path:
    """Write `data` to `path` atomically; with `table`, first check and cast it to that table's schema."""
    final = Path(path)
    if table is not None:
        data = conform(data, table, source=str(final))
    with atomic_path(final) as temporary:
        pq.write_table(data, temporary, compression=COMPRESSION)
    return final


class ParquetStreamWriter:
    """Write a Parquet file batch by batch; it appears under its final name only on a clean exit.

    with ParquetStreamWriter(path, schema) as writer:
        for batch in batches:
            writer.write(batch)
    """

    def __init__(self, path: str | os.PathLike[str], schema: pa.Schema) -> None:
        self.path = Path(path)
        self.schema = schema
        self._context = atomic_path(self.path)
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> ParquetStreamWriter:
        temporary = self._context.__enter__()
        self._writer = pq.ParquetWriter(temporary, self.schema, compression=COMPRESSION)
        return self

    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        if self._writer is None:
            raise RuntimeError("ParquetStreamWriter.write outside its `with` block")
        self._writer.write(data if isinstance(data, pa.Table) else pa.Table.from_batches([data]))

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._context.__exit__(kind, error, trace)


def remove_stale_temporaries(directory: str | os.PathLike[str], *, older_than_s: float = 3600.0) -> list[Path]:
    """Delete temporary files that killed writers left under `directory`; returns what was removed."""
    cutoff = time.time() - older_than_s
    stale = [
        path for path in Path(directory).rglob(f".*{TEMP_SUFFIX}") if path.is_file() and path.stat().st_mtime < cutoff
    ]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def check_output_directory(path: str | os.PathLike[str], what: str = "output directory") -> Path:
    """Check, before any work, that a command can create or write into the directory `path` (nothing is
    created: a failed run leaves no trace); ValueError in one line when a file is in the way or the
    nearest existing directory is not writable."""
    directory = Path(path)
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise ValueError(f"{what} {directory} cannot be created: {candidate} is a file")
            try:  # a probe, not os.access: root passes access checks on read-only mounts such as /proc
                os.rmdir(tempfile.mkdtemp(prefix=".kaizen-probe-", dir=candidate))
            except OSError as err:
                raise ValueError(f"{what} {directory} cannot be created in {candidate}: "
                                 f"{err.strerror or err}") from None
            break
    return directory
