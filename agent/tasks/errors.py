"""Errors of task loading, and the container that reports skipped rows.

    TaskLoadError
    ├── TaskFileError      the file or directory as a whole: missing, unknown format, no flavor
    └── TaskSchemaError    one row: names the task id (or the row's place) and the field
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["LoadResult", "RowError", "TaskFileError", "TaskLoadError", "TaskSchemaError"]

T = TypeVar("T")


class TaskLoadError(Exception):
    """Base of the errors raised while loading tasks."""


class TaskFileError(TaskLoadError):
    """The input as a whole cannot be read or understood."""


@dataclass(frozen=True)
class RowError:
    """Why one row was not loaded."""

    where: str  # "tasks.jsonl line 3"
    task_id: str | None  # None when the row has no usable id
    field: str  # the dataset's column, dotted for nested values ("install_config.test_cmd")
    message: str

    def __str__(self) -> str:
        return f"{self.task_id or self.where}: {self.field}: {self.message}" + (
            f" ({self.where})" if self.task_id else "")


class TaskSchemaError(TaskLoadError, ValueError):
    """A row does not fit its dataset's schema. The message starts ``<task id>: <field>: ``."""

    def __init__(self, error: RowError) -> None:
        self.error = error
        self.task_id = error.task_id
        self.field = error.field
        super().__init__(str(error))


class LoadResult(list, Generic[T]):
    """A list of loaded records; `skipped` holds the rows left out under ``on_error="skip"``."""

    def __init__(self, items: list[T] = (), skipped: list[RowError] = ()) -> None:  # type: ignore[assignment]
        super().__init__(items)
        self.skipped: list[RowError] = list(skipped)
