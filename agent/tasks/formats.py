"""Dataset rows from files on disk: JSONL, JSON, parquet, and `datasets.save_to_disk` directories.

Never downloads anything. Parquet and Arrow need `pyarrow` (imported only for those formats);
the `datasets` package is not needed: a ``save_to_disk`` directory is read directly (its
``state.json`` lists Arrow IPC stream files, ``data-00000-of-0000N.arrow``; a DatasetDict
directory has ``dataset_dict.json`` and one such directory per split).

A row that cannot be read (a JSONL line that is not a JSON object) is returned as a `RawRow` with
`error` set, so the loader can raise or skip it like any other bad row; a file that cannot be read
at all raises `TaskFileError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import TaskFileError

__all__ = ["FORMATS", "RawRow", "detect_format", "read_rows"]

FORMATS = ("jsonl", "json", "parquet", "arrow")


@dataclass(frozen=True)
class RawRow:
    where: str  # "tasks.jsonl row 3" (rows count from 1)
    data: dict[str, Any] | None
    split: str | None = None  # from a DatasetDict directory or a saved Dataset's split
    error: str = ""  # why `data` is None


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format of `path`: by directory layout, suffix, then content."""
    p = Path(path)
    if not p.exists():
        raise TaskFileError(f"{p}: no such file or directory")
    if p.is_dir():
        if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            return "arrow"
        raise TaskFileError(f"{p}: a directory that is not a datasets.save_to_disk output "
                            "(no state.json or dataset_dict.json); pass a file")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".arrow":
        return "arrow"
    with open(p, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    first = head.lstrip()[:1]
    if first == b"[":
        return "json"
    if first == b"{":
        return "jsonl"  # a .json file of one object per line is common; one object alone also reads
    raise TaskFileError(f"{p}: cannot tell the format (expected .jsonl, .json, .parquet, .arrow or a "
                        "datasets.save_to_disk directory); pass format=")


def read_rows(path: str | os.PathLike[str], format: str = "auto") -> list[RawRow]:
    """Every row of the file or directory at `path`, in order."""
    p = Path(path)
    fmt = detect_format(p) if format == "auto" else format
    if fmt not in FORMATS:
        raise TaskFileError(f"format: expected 'auto' or one of {', '.join(FORMATS)}, got {format!r}")
    if not p.exists():
        raise TaskFileError(f"{p}: no such file or directory")
    if fmt == "jsonl":
        return list(_jsonl(p))
    if fmt == "json":
        return _json(p)
    if fmt == "parquet":
        pq = _pyarrow("parquet").parquet
        try:
            table = pq.read_table(p)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise TaskFileError(f"{p}: not a readable parquet file: {exc}") from exc
        return _table_rows(p.name, table.to_pylist())
    return _arrow(p)


def _jsonl(p: Path) -> Iterator[RawRow]:
    with open(p, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{p.name} line {line_no}"
            try:
                data = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                yield RawRow(where, None, error=f"not valid JSON: {exc}")
                continue
            if isinstance(data, dict):
                yield RawRow(where, data)
            else:
                yield RawRow(where, None, error=f"expected a JSON object, got {type(data).__name__}")


def _json(p: Path) -> list[RawRow]:
    try:
        data = json.loads(p.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TaskFileError(f"{p}: not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise TaskFileError(f"{p}: expected a JSON list of row objects, got {type(data).__name__}")
    rows = []
    for i, item in enumerate(data, 1):
        where = f"{p.name} row {i}"
        if isinstance(item, dict):
            rows.append(RawRow(where, item))
        else:
            rows.append(RawRow(where, None, error=f"expected a JSON object, got {type(item).__name__}"))
    return rows


def _pyarrow(what: str):
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet  # noqa: F401  (makes pyarrow.parquet available)
    except ImportError as exc:
        raise TaskFileError(f"reading {what} files needs pyarrow: pip install pyarrow") from exc
    return pyarrow


def _table_rows(name: str, rows: list[dict], split: str | None = None, start: int = 1) -> list[RawRow]:
    return [RawRow(f"{name} row {i}", row, split) for i, row in enumerate(rows, start)]


def _arrow_file(p: Path) -> list[dict]:
    pa = _pyarrow("arrow")
    try:
        with pa.memory_map(str(p)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()  # what datasets writes
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowException) as exc:
        raise TaskFileError(f"{p}: not a readable Arrow IPC file: {exc}") from exc
    return table.to_pylist()


def _arrow(p: Path) -> list[RawRow]:
    if p.is_file():
        return _table_rows(p.name, _arrow_file(p))
    dict_json = p / "dataset_dict.json"
    if dict_json.is_file():
        splits = _read_json(dict_json).get("splits")
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise TaskFileError(f"{dict_json}: expected {{\"splits\": [names]}}")
        rows: list[RawRow] = []
        for split in splits:
            rows += _saved_dataset(p / split, f"{p.name}/{split}", split)
        return rows
    return _saved_dataset(p, p.name, None)


def _saved_dataset(d: Path, name: str, split: str | None) -> list[RawRow]:
    state = _read_json(d / "state.json")
    files = state.get("_data_files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files):
        raise TaskFileError(f"{d / 'state.json'}: expected '_data_files': [{{\"filename\": ...}}]")
    if split is None and isinstance(state.get("_split"), str):
        split = state["_split"]
    rows: list[RawRow] = []
    for entry in files:
        filename = entry["filename"]
        if os.path.basename(filename) != filename:
            raise TaskFileError(f"{d / 'state.json'}: data file {filename!r} is outside the directory")
        rows += _table_rows(name, _arrow_file(d / filename), split, start=len(rows) + 1)
    return rows


def _read_json(p: Path) -> dict:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TaskFileError(f"{p}: not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TaskFileError(f"{p}: expected a JSON object")
    return data
