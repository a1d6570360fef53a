"""Files are the contract between stages: jsonl records, written incrementally and atomically.

A stage appends each finished record to `<name>.jsonl.partial` (flushed per record), so a killed
stage resumes with its finished records; `finish()` renames the file to `<name>.jsonl` and only
then is the output complete. `<stage>.done.json` is written last of all.

A file the stages write has a record type (slkit.core.schema): what is written to it is checked against
that type, and readers name the type they expect (read_records, read_document), so a record lacking a field
fails naming file:line:field.
"""
from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from pydantic import ValidationError

from slkit.core.schema import DoneMarker, ProgressState, Record, describe_errors, run_file


class RecordFileError(ValueError):
    """A jsonl line that cannot be used; the message names the file and line."""


def read_jsonl_lines(path: str | os.PathLike, required: Iterable[str] = ()) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of every record of a jsonl file; a malformed line or a missing field
    raises with file:line. Blank lines are skipped but counted."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise RecordFileError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise RecordFileError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            missing = [k for k in required if k not in record]
            if missing:
                raise RecordFileError(f"{path}:{number}: missing field(s) {', '.join(missing)}")
            records.append((number, record))
    return records


def read_jsonl(path: str | os.PathLike, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """All records of a jsonl file; a malformed line or a missing field raises with file:line."""
    return [record for _, record in read_jsonl_lines(path, required)]


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def checked(record_type: type[Record], data: Any, where: str) -> dict[str, Any]:
    """`data` as a record of `record_type` (defaults filled in), or RecordFileError naming where and the field."""
    try:
        return record_type.model_validate(data).model_dump()
    except ValidationError as err:
        raise RecordFileError(f"{where}: {describe_errors(err)} ({record_type.__name__})") from None


def read_records(path: str | os.PathLike, record_type: type[Record]) -> list[dict[str, Any]]:
    """Every record of a jsonl file the stages write, checked against its type: a record lacking a field
    of `record_type`, or holding one it does not have, raises naming file:line:field."""
    return [checked(record_type, record, f"{path}:{number}") for number, record in read_jsonl_lines(path)]


def read_document(path: str | os.PathLike, record_type: type[Record]) -> dict[str, Any]:
    """A json file the stages write (a summary, a done-marker), checked against its type; raises naming file:field."""
    try:
        data = read_json(path)
    except json.JSONDecodeError as err:
        raise RecordFileError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    return checked(record_type, data, str(path))


def _as_written(path: Path, record: Record | dict[str, Any], where: str) -> dict[str, Any]:
    """What goes into a file: a record as its dict. A file of the schema takes only records of its type."""
    entry = run_file(path)
    if isinstance(record, Record):
        if entry is not None and not isinstance(record, entry.record):
            raise RecordFileError(f"{where}: {path.name} holds {entry.record.__name__} records, "
                                  f"not {type(record).__name__}")
        return record.model_dump()
    return record if entry is None else checked(entry.record, record, where)


class RecordWriteError(OSError):
    """A record could not be written (a full disk, a quota); the message names the file."""


def _cannot_write(path: Path, err: OSError, kept: str = "") -> RecordWriteError:
    hint = ("free space and rerun to resume" if err.errno in (errno.ENOSPC, errno.EDQUOT)
            else "rerun to resume once it can be written")
    return RecordWriteError(f"{path}: cannot write ({err.strerror}); {kept}{hint}")


def _write_atomic(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Write `lines` to path.tmp, then rename it to path: readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _cannot_write(path, err) from err
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write a json document; one of the schema's files must hold a document of its type."""
    data = _as_written(Path(path), data, str(path)) if isinstance(data, (dict, Record)) else data
    _write_atomic(path, [json.dumps(data, ensure_ascii=False, indent=2)])


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[Record | dict[str, Any]]) -> None:
    """Write every record at once; one of the schema's files must hold records of its type."""
    lines = [json.dumps(_as_written(Path(path), record, f"{path}:{number}"), ensure_ascii=False) + "\n"
             for number, record in enumerate(records, 1)]  # all checked before the file is touched
    _write_atomic(path, lines)


class RecordWriter:
    """Append-only jsonl writer that survives a kill: finished records are kept, a torn last line is dropped.

    A file finished by a stage that then died before its done-marker is resumed too, not redone.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.records: list[dict[str, Any]] = []
        if self.path.exists() and not self.partial.exists():
            os.replace(self.path, self.partial)  # complete, but its stage is not: finish() renames it back
        if self.partial.exists():
            raw = self.partial.read_bytes()
            lines = raw.split(b"\n")
            complete, torn = lines[:-1], lines[-1]
            for number, line in enumerate(complete, 1):
                if line.strip():
                    self.records.append(self._resumed(json.loads(line), number))
            if torn.strip():  # killed mid-write: drop the torn tail
                with open(self.partial, "wb") as f:
                    f.write(b"\n".join(complete) + (b"\n" if complete else b""))
        # Unbuffered: each record reaches the file in write(), so a kill loses no finished record.
        self._file = open(self.partial, "ab", buffering=0)

    def _resumed(self, record: dict[str, Any], number: int) -> dict[str, Any]:
        """A record a killed stage wrote, checked against the file's type (a stage of an older slkit fails here)."""
        entry = run_file(self.path)
        return record if entry is None else checked(entry.record, record, f"{self.partial}:{number}")

    def write(self, record: Record | dict[str, Any]) -> None:
        """Append a record; to a file of the schema, only a record of its type (a dict is checked against it)."""
        record = _as_written(self.path, record, f"{self.partial}:{len(self.records) + 1}")
        line = memoryview((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        end = self._file.tell()
        try:
            while line:  # a nearly full disk writes part of a line, then refuses the rest
                line = line[self._file.write(line):]
        except OSError as err:
            self._file.truncate(end)  # leave no torn line behind
            self._file.close()
            raise _cannot_write(self.partial, err, f"the {len(self.records)} records before this one are kept: ") from err
        self.records.append(record)

    def finish(self) -> list[dict[str, Any]]:
        self._file.close()
        os.replace(self.partial, self.path)
        return self.records

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._file.closed:
            self._file.close()


def done_marker(iter_dir: str | os.PathLike, stage: str) -> Path:
    return Path(iter_dir) / f"{stage}.done.json"


def is_done(iter_dir: str | os.PathLike, stage: str) -> bool:
    return done_marker(iter_dir, stage).exists()


def mark_done(iter_dir: str | os.PathLike, stage: str, summary: Record | dict[str, Any],
              iteration: int | None = None) -> None:
    """Write the done-marker; `iteration` records the iteration a stage outside iter_<k>/ ran after. The summary
    must be of the stage's summary type (schema.STAGE_SUMMARIES)."""
    marker = done_marker(iter_dir, stage)
    summary = summary.model_dump() if isinstance(summary, Record) else summary
    write_json_atomic(marker, checked(DoneMarker, {"stage": stage, "finished_at": time.time(), "iteration": iteration,
                                                   "summary": summary}, str(marker)))


class Progress:
    """What the running stage has done, in a small json file the pipeline's progress bar polls: records ("done"
    of "total") and texts the engine finished ("texts" of "texts_expected"). Texts move as the engine finishes
    them, where records may wait for several: an extension job is 2 texts per micro-iteration for several
    micro-iterations, and every job of a stage finishes in its last micro-iteration. `texts_per_item` is the
    texts one record is expected to take (more tries take more: the expected count then grows with what was
    generated)."""

    interval_s = 0.5  # at most two writes a second, and one at each end

    def __init__(self, iter_dir: str | os.PathLike, stage: str, total: int, done: int = 0, texts_per_item: int = 1):
        self.path = Path(iter_dir) / "progress.json"
        self.stage, self.total, self.done = stage, total, done
        self.texts, self.texts_expected = 0, max(0, total - done) * texts_per_item
        self.started = time.time()
        self._last = 0.0
        # Texts finish on an engine's worker threads (slkit.engines.jobs), records on the stage's thread.
        self._writing = threading.Lock()
        self._write()

    def advance(self, n: int = 1) -> None:
        """`n` more records done."""
        self.done += n
        self._maybe_write(self.done >= self.total)

    def generated(self, n: int = 1) -> None:
        """`n` more texts finished by the engine."""
        self.texts += n
        self.texts_expected = max(self.texts_expected, self.texts)
        self._maybe_write(False)

    def _maybe_write(self, last: bool) -> None:
        if last or time.monotonic() - self._last > self.interval_s:
            self._write()

    def _write(self) -> None:
        with self._writing:
            self._last = time.monotonic()
            write_json_atomic(self.path, ProgressState(stage=self.stage, done=self.done, total=self.total, texts=self.texts,
                                                       texts_expected=self.texts_expected, started=self.started))
