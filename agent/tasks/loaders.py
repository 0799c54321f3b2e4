"""Dataset rows -> `runtime.records.Task`, for SWE-bench (Verified, Lite), SWE-Gym and SWE-rebench.

Schemas (what each flavor reads; every other column is kept in `Task.metadata`):

- ``swebench`` (SWE-bench/SWE-bench, _Verified, _Lite): instance_id, repo, base_commit, patch,
  test_patch, problem_statement, hints_text, created_at, version, environment_setup_commit, and
  FAIL_TO_PASS / PASS_TO_PASS as JSON strings. Test command, parser and image come from
  `agent.tasks.harness` (the reference harness's table, by repo and version).
- ``swegym`` (SWE-Gym/SWE-Gym, -Lite): the same schema with FAIL_TO_PASS / PASS_TO_PASS as lists;
  the same loader (both encodings are accepted by both flavors). Whether a row is a SWE-bench or
  a SWE-Gym task follows from its repository (the two sets are disjoint), which picks the spec and
  the image naming.
- ``swerebench`` (nebius/SWE-rebench, nebius/SWE-rebench-V2): the SWE-bench columns (lists for the
  test names) plus ``install_config`` (a dict, or its JSON text, with at least ``test_cmd`` and
  ``log_parser``) and the image: ``image_name`` in V2 (``docker.io/swerebenchv2/...``), or
  ``docker_image`` in the first release. They run differently, following each release's harness:
    * V1 (``docker_image``; SWE-rebench's fork of the SWE-bench harness): the repository is at
      /testbed; the test command is ``LANG=C.UTF-8 LC_ALL=C.UTF-8 <test_cmd> <test files>``, the
      files being those the test patch adds or modifies (deleted ones left out), minus non-test
      extensions (swebench/harness/utils.py `_clean_install_config`, test_spec/python.py).
    * V2 (``image_name``; SWE-rebench-V2 scripts/eval.py): ``test_cmd`` is the whole command (a
      string or a list run under ``set -e``, joined here with `` && ``), run in ``/<repo name>``,
      not /testbed (`Task.metadata["harness"]["workdir"]`).
  ``log_parser`` names a reference parser ("parse_log_pytest"); rows whose parser has no
  counterpart in agent.grading are schema errors naming ``install_config.log_parser``.

Every task gets ``metadata["harness"]``: ``dataset`` ("swebench", "swegym", "swerebench",
"swerebench-v2"), ``log_parser`` (the reference parser's name), ``eval_commands`` (shell lines the
reference runs in the same shell before the test command, e.g. django's locale exports) and
``workdir``. Metadata values are made msgpack-friendly: dict entries whose value is None are dropped
(parquet and Arrow fill absent struct fields with None, so this keeps all formats identical),
datetimes become ISO strings.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import reprlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn, TypeVar

from agent.patch import PatchParseError, parse_patch
from runtime.records import Task

from .errors import LoadResult, RowError, TaskFileError, TaskSchemaError
from .formats import RawRow, read_rows
from .harness import PARSER_NAMES, SpecError, harness_spec, our_parser, swebench_image, swegym_image, test_directives

__all__ = [
    "FLAVORS",
    "detect_flavor",
    "load_swebench",
    "load_swegym",
    "load_swerebench",
    "load_tasks",
    "task_from_row",
    "tasks_from_rows",
]

log = logging.getLogger(__name__)

FLAVORS = ("swebench", "swegym", "swerebench")
T = TypeVar("T")

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = 4
_COMMIT = re.compile(r"[0-9a-f]{7,40}")
_REPO = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")
_IMAGE_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _describe(value: Any) -> str:
    return f"{_short.repr(value)} ({type(value).__name__})"


# ---------------------------------------------------------------------------------------------
# Field access that fails with the task id and the field.


class Fields:
    """One row's columns, checked one by one; failures raise `TaskSchemaError`."""

    def __init__(self, data: Mapping[str, Any], where: str) -> None:
        self.data, self.where = data, where
        self.task_id: str | None = None

    def fail(self, field: str, message: str) -> NoReturn:
        raise TaskSchemaError(RowError(self.where, self.task_id, field, message))

    def present(self, key: str) -> bool:
        return self.data.get(key) is not None

    def text(self, key: str, *, required: bool = True, nonempty: bool = False) -> str | None:
        value = self.data.get(key)
        if value is None:
            if required:
                self.fail(key, "missing")
            return None
        if not isinstance(value, str):
            self.fail(key, f"expected str, got {_describe(value)}")
        if nonempty and not value.strip():
            self.fail(key, "empty")
        return value

    def instance_id(self, *, key: str = "instance_id", image_safe: bool = False) -> str:
        value = self.text(key, nonempty=True)
        assert value is not None
        if image_safe and not _IMAGE_SAFE_ID.fullmatch(value):
            self.fail(key, f"{value!r}: expected letters, digits, '_', '.', '-' (it names an image)")
        if any(ch.isspace() for ch in value):
            self.fail(key, f"{value!r}: must not contain whitespace")
        self.task_id = value
        return value

    def repo(self) -> str:
        value = self.text("repo", nonempty=True)
        if not _REPO.fullmatch(value):  # type: ignore[arg-type]
            self.fail("repo", f"expected 'owner/name', got {value!r}")
        return value  # type: ignore[return-value]

    def commit(self, key: str, *, required: bool = True) -> str | None:
        value = self.text(key, required=required)
        if value is not None and not _COMMIT.fullmatch(value):
            self.fail(key, f"expected a git commit hash (7-40 lowercase hex digits), got {value!r}")
        return value

    def patch(self, key: str, *, required: bool = True) -> str | None:
        value = self.text(key, required=required, nonempty=required)
        if value is None or (not required and not value.strip()):
            return None
        try:
            if not parse_patch(value):
                self.fail(key, "empty patch")
        except PatchParseError as exc:
            self.fail(key, f"not a valid patch: {exc}")
        return value

    def tests(self, key: str, *, nonempty: bool = False) -> list[str]:
        value = self.data.get(key)
        if value is None:
            self.fail(key, "missing")
        if isinstance(value, str):
            try:
                decoded = json.loads(value)
            except json.JSONDecodeError:
                decoded = None
            if not isinstance(decoded, list):
                self.fail(key, f"expected a JSON list of test names, got {_describe(value)}")
            value = decoded
        elif not isinstance(value, (list, tuple)):
            self.fail(key, f"expected a list of test names (or its JSON text), got {_describe(value)}")
        for i, name in enumerate(value):
            if not isinstance(name, str):
                self.fail(key, f"item {i}: expected a test name (str), got {_describe(name)}")
        if nonempty and not value:
            self.fail(key, "empty: a task needs at least one failing test to be graded")
        return list(value)

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.data.get(key)
        if value is None:
            self.fail(key, "missing")
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                self.fail(key, f"expected a JSON object, got {_describe(value)}")
        if not isinstance(value, Mapping):
            self.fail(key, f"expected an object, got {_describe(value)}")
        return plain(value)

    def metadata(self, consumed: Iterable[str], **derived: Any) -> dict[str, Any]:
        """Every column not in `consumed`, made plain, plus `derived` (which must not collide)."""
        consumed = set(consumed)
        out = {k: plain(v) for k, v in self.data.items() if k not in consumed and v is not None}
        for key, value in derived.items():
            if key in out:
                self.fail(key, "column name is reserved for derived metadata")
            out[key] = value
        return out


def plain(value: Any) -> Any:
    """Msgpack-friendly copy: None dict entries dropped, datetimes as ISO strings, tuples as lists."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if value is None or isinstance(value, (str, bytes, bool, int, float)):
        return value
    return str(value)  # Decimal and other scalars parquet may hold: keep the information


def _task(f: Fields, **fields: Any) -> Task:
    try:
        return Task(**fields)
    except (TypeError, ValueError) as exc:
        # Task's messages start with "Task.<field>"; blame that field.
        message = str(exc)
        field = message.split(":", 1)[0].removeprefix("Task.").split("[", 1)[0].split(" ", 1)[0]
        f.fail(field or "row", message)


# ---------------------------------------------------------------------------------------------
# Flavors


_SWEBENCH_CONSUMED = ("instance_id", "repo", "base_commit", "problem_statement", "patch", "test_patch",
                      "FAIL_TO_PASS", "PASS_TO_PASS", "environment_setup_commit")


def _swebench_task(f: Fields, split: str | None) -> Task:
    instance_id = f.instance_id(image_safe=True)
    repo = f.repo()
    base_commit = f.commit("base_commit")
    problem = f.text("problem_statement", nonempty=True)
    test_patch = f.patch("test_patch")
    gold_patch = f.patch("patch", required=False)
    fail_to_pass = f.tests("FAIL_TO_PASS", nonempty=True)
    pass_to_pass = f.tests("PASS_TO_PASS")
    version = f.data.get("version")
    if not isinstance(version, str) or not version:
        why = "missing" if version is None else f"expected str like '3.0', got {_describe(version)}"
        if isinstance(version, float):
            why += " (a float cannot tell '3.1' from '3.10')"
        f.fail("version", why)
    env_commit = f.commit("environment_setup_commit", required=False)
    try:
        spec = harness_spec(repo, version, test_patch)  # type: ignore[arg-type]
    except SpecError as exc:
        f.fail(exc.field, str(exc))
    image = swebench_image(instance_id) if spec.dataset == "swebench" else swegym_image(instance_id)
    harness = {"dataset": spec.dataset, "log_parser": spec.reference_parser,
               "eval_commands": list(spec.eval_commands), "workdir": "/testbed"}
    return _task(f, id=instance_id, repo=repo, base_commit=base_commit, problem_statement=problem,
                 image=image, test_patch=test_patch, FAIL_TO_PASS=fail_to_pass, PASS_TO_PASS=pass_to_pass,
                 test_command=spec.test_command, log_parser=spec.log_parser, gold_patch=gold_patch,
                 environment_setup_commit=env_commit,
                 metadata=f.metadata(_SWEBENCH_CONSUMED, harness=harness), split=split)


def _join_commands(commands: list[str]) -> str:
    # V2 runs each command on its own line under `set -e`: stop at the first failure, as && does.
    return " && ".join(c if "\n" not in c else "{ " + c + "\n}" for c in commands)


def _rebench_task(f: Fields, split: str | None) -> Task:
    instance_id = f.instance_id()
    repo = f.repo()
    base_commit = f.commit("base_commit")
    problem = f.text("problem_statement", nonempty=True)
    test_patch = f.patch("test_patch")
    gold_patch = f.patch("patch", required=False)
    fail_to_pass = f.tests("FAIL_TO_PASS", nonempty=True)
    pass_to_pass = f.tests("PASS_TO_PASS")
    env_commit = f.commit("environment_setup_commit", required=False)
    config = f.mapping("install_config")
    reference_parser = config.get("log_parser")
    if not isinstance(reference_parser, str) or not reference_parser:
        f.fail("install_config.log_parser", "missing" if reference_parser is None
               else f"expected str, got {_describe(reference_parser)}")
    log_parser = our_parser(reference_parser)
    if log_parser is None:
        f.fail("install_config.log_parser", f"{reference_parser!r} has no counterpart in agent.grading "
                                            f"(parsers: {', '.join(PARSER_NAMES)})")
    test_cmd = config.get("test_cmd")
    if isinstance(test_cmd, str):
        test_cmd = [test_cmd]
    if (not isinstance(test_cmd, list) or not test_cmd
            or not all(isinstance(c, str) and c.strip() for c in test_cmd)):
        f.fail("install_config.test_cmd", "missing" if test_cmd is None
               else f"expected a command or a non-empty list of commands, got {_describe(test_cmd)}")
    eval_commands = config.get("eval_commands", [])
    if not isinstance(eval_commands, list) or not all(isinstance(c, str) for c in eval_commands):
        f.fail("install_config.eval_commands", f"expected a list of commands, got {_describe(eval_commands)}")

    if f.present("image_name"):
        image_name, dataset, workdir = f.text("image_name", nonempty=True), "swerebench-v2", "/" + repo.split("/")[1]
        test_command = _join_commands(test_cmd)
    elif f.present("docker_image"):
        image_name, dataset, workdir = f.text("docker_image", nonempty=True), "swerebench", "/testbed"
        if len(test_cmd) != 1:
            f.fail("install_config.test_cmd", "the first SWE-rebench release runs one command; got a list")
        kept = [fp.new_path for fp in parse_patch(test_patch) if not fp.is_deleted]  # type: ignore[arg-type]
        directives = test_directives(repo, test_patch, paths=kept)  # type: ignore[arg-type]
        test_command = "LANG=C.UTF-8 LC_ALL=C.UTF-8 " + " ".join([test_cmd[0], *directives])
    else:
        f.fail("image_name", "missing (SWE-rebench-V2 rows name their image in image_name; the first "
                             "release in docker_image)")
    if any(ch.isspace() for ch in image_name):  # type: ignore[union-attr]
        f.fail("image_name" if dataset == "swerebench-v2" else "docker_image",
               f"{image_name!r}: an image name has no whitespace")
    harness = {"dataset": dataset, "log_parser": reference_parser, "eval_commands": list(eval_commands),
               "workdir": workdir}
    metadata = f.metadata(_SWEBENCH_CONSUMED + ("image_name", "docker_image"), harness=harness)
    return _task(f, id=instance_id, repo=repo, base_commit=base_commit, problem_statement=problem,
                 image=f"podman:{image_name}", test_patch=test_patch, FAIL_TO_PASS=fail_to_pass,
                 PASS_TO_PASS=pass_to_pass, test_command=test_command, log_parser=log_parser,
                 gold_patch=gold_patch, environment_setup_commit=env_commit, metadata=metadata, split=split)


_CONVERTERS: dict[str, Callable[[Fields, str | None], Task]] = {
    "swebench": _swebench_task,
    "swegym": _swebench_task,
    "swerebench": _rebench_task,
}


def task_from_row(row: Mapping[str, Any], *, flavor: str, split: str | None = None, where: str = "row") -> Task:
    """One row of a `flavor` dataset as a Task; `TaskSchemaError` names the id and the field."""
    if flavor not in _CONVERTERS:
        raise ValueError(f"flavor: expected one of {', '.join(FLAVORS)}, got {flavor!r}")
    if not isinstance(row, Mapping):
        raise TaskSchemaError(RowError(where, None, "row", f"expected an object, got {_describe(row)}"))
    return _CONVERTERS[flavor](Fields(row, where), split)


def detect_flavor(rows: Iterable[Mapping[str, Any]]) -> str:
    """The flavor of a dataset, by its columns (FAIL_TO_PASS's encoding tells SWE-bench from SWE-Gym)."""
    rows = [r for r in rows if isinstance(r, Mapping)]
    columns: set[str] = set()
    for row in rows[:100]:
        columns |= set(row)
    if "install_config" in columns:
        return "swerebench"
    if "FAIL_TO_PASS" in columns:
        first = next((r["FAIL_TO_PASS"] for r in rows if r.get("FAIL_TO_PASS") is not None), None)
        return "swegym" if isinstance(first, (list, tuple)) else "swebench"
    if {"patch", "problem_statement"} <= columns:
        raise TaskFileError("these rows are issue/patch pairs with no tests (SWE-RL style): load them "
                            "with agent.tasks.load_patch_pairs")
    shown = ", ".join(sorted(columns)[:15]) or "none"
    raise TaskFileError(f"cannot tell the dataset from its columns ({shown}); expected FAIL_TO_PASS "
                        "(SWE-bench, SWE-Gym) or install_config (SWE-rebench); pass flavor=")


# ---------------------------------------------------------------------------------------------
# Loading


def _select_split(rows: list[RawRow], split: str | None, source: str) -> list[tuple[RawRow, str | None]]:
    if split is None:
        return [(row, row.split) for row in rows]
    labelled = {row.split for row in rows if row.split is not None}
    if labelled and split not in labelled:
        raise TaskFileError(f"{source}: no split {split!r} (has: {', '.join(sorted(labelled))})")
    return [(row, split) for row in rows if row.split is None or row.split == split]


def load_rows(rows: list[RawRow], convert: Callable[[Mapping[str, Any], str, str | None], T], *,
              on_error: str, split: str | None, source: str) -> LoadResult[T]:
    """Convert rows, raising on the first bad one or skipping and reporting bad ones."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")
    items: list[T] = []
    skipped: list[RowError] = []
    seen: dict[str, str] = {}
    for raw, row_split in _select_split(rows, split, source):
        try:
            if raw.data is None:
                raise TaskSchemaError(RowError(raw.where, None, "row", raw.error))
            item = convert(raw.data, raw.where, row_split)
            item_id = item.id  # type: ignore[attr-defined]
            if item_id in seen:
                raise TaskSchemaError(RowError(raw.where, item_id, "instance_id", f"duplicate of {seen[item_id]}"))
            seen[item_id] = raw.where
            items.append(item)
        except TaskSchemaError as exc:
            if on_error == "raise":
                raise
            skipped.append(exc.error)
    if skipped:
        log.warning("%s: skipped %d of %d rows; first: %s", source, len(skipped),
                    len(items) + len(skipped), skipped[0])
    return LoadResult(items, skipped)


def tasks_from_rows(rows: Iterable[Mapping[str, Any]], *, flavor: str = "auto", on_error: str = "raise",
                    split: str | None = None, source: str = "rows") -> LoadResult[Task]:
    """Tasks from rows already in memory (e.g. a `datasets.Dataset` the caller loaded)."""
    raw = [RawRow(f"{source} row {i}", dict(r) if isinstance(r, Mapping) else None,
                  error="" if isinstance(r, Mapping) else f"expected an object, got {_describe(r)}")
           for i, r in enumerate(rows, 1)]
    return _load(raw, flavor=flavor, on_error=on_error, split=split, source=source)


def _load(raw: list[RawRow], *, flavor: str, on_error: str, split: str | None, source: str) -> LoadResult[Task]:
    if flavor == "auto":
        data = [r.data for r in raw if r.data is not None]
        flavor = detect_flavor(data) if data else "swebench"
    if flavor not in _CONVERTERS:
        raise ValueError(f"flavor: expected 'auto' or one of {', '.join(FLAVORS)}, got {flavor!r}")

    def convert(data: Mapping[str, Any], where: str, row_split: str | None) -> Task:
        return _CONVERTERS[flavor](Fields(data, where), row_split)

    return load_rows(raw, convert, on_error=on_error, split=split, source=source)


def load_tasks(path: str | os.PathLike[str], *, format: str = "auto", flavor: str = "auto",
               on_error: str = "raise", split: str | None = None) -> LoadResult[Task]:
    """Load a task file or directory; format and flavor are detected unless given.

    format: "auto", "jsonl", "json", "parquet" or "arrow" (a `datasets.save_to_disk` directory,
        Dataset or DatasetDict, or a single .arrow file).
    flavor: "auto", "swebench", "swegym" or "swerebench" (see the module doc).
    on_error: "raise" (the first bad row raises `TaskSchemaError`) or "skip" (bad rows are left
        out and listed in the result's `.skipped`, and logged).
    split: labels every task with this split; in a DatasetDict (or a Dataset saved with its split),
        selects that split. None keeps the splits the files record.
    """
    return _load(read_rows(path, format), flavor=flavor, on_error=on_error, split=split, source=str(path))


def load_swebench(path: str | os.PathLike[str], **kwargs: Any) -> LoadResult[Task]:
    """SWE-bench, SWE-bench Verified or Lite rows (`load_tasks` with flavor="swebench")."""
    return load_tasks(path, flavor="swebench", **kwargs)


def load_swegym(path: str | os.PathLike[str], **kwargs: Any) -> LoadResult[Task]:
    """SWE-Gym rows (`load_tasks` with flavor="swegym")."""
    return load_tasks(path, flavor="swegym", **kwargs)


def load_swerebench(path: str | os.PathLike[str], **kwargs: Any) -> LoadResult[Task]:
    """SWE-rebench (first release or V2) rows (`load_tasks` with flavor="swerebench")."""
    return load_tasks(path, flavor="swerebench", **kwargs)
