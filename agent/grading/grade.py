"""Grade a model patch in a Workspace the way the SWE-bench harness does (`run_instance`).

`grade(task, model_patch, workspace, timeout_s=...)` expects `workspace` to be a fresh checkout of
`task.base_commit` (a restored sandbox, or a copied directory for `LocalWorkspace`) and then:

1. writes the model patch to ``.git/swe_dapo/model.patch`` (inside the git directory, so neither
   `git status`, the tests nor the patches can see it) and applies it with the harness's commands,
   in order, stopping at the first that exits 0 (`APPLY_COMMANDS`). `git apply` is all-or-nothing;
   after a failed ``--reject`` (which applies what it can and leaves ``.rej`` files) the touched
   files are restored to the base commit before `patch` is tried. None applies -> `patch_failed`.
2. writes the test patch and the eval script (`eval_script`) next to it and runs the script with
   ``bash``, under `timeout_s`, its output capped by the workspace (head + tail kept). The script:

       set -uo pipefail
       <tasks with metadata["harness"] only: activate the conda env "testbed" if the image has
        /opt/miniconda3, then metadata["harness"]["eval_commands"] (django's locale exports, ...)>
       <for each file the test patch touches: git checkout BASE -- f, or rm -rf f if new>
       git apply --verbose .git/swe_dapo/test.patch || { echo '>>>>> Test Patch Apply Failed'; exit 1; }
       echo '>>>>> Start Test Output'
       <task.test_command>
       rc=$?
       echo '>>>>> End Test Output'
       echo ">>>>> Test Exit Code: $rc"

   The reset makes the test patch win over a model patch that edited, deleted or created test files
   (the harness resets the same files). Unlike the harness, a test patch that does not apply stops
   the run (`test_patch_failed`) instead of running stale tests.
3. grades the log with `rules.grade_log` and the task's parser.

Every failure is a `GradeReport` with `error` set and `resolved` False, never an exception, except
a bad `task.log_parser` or argument (ValueError / TypeError naming it, before any work) and
cancellation.

Deviations from the harness (rare paths; a patch that `git apply` takes is graded exactly alike):
an empty patch is the error `empty_patch` without running the tests (`allow_empty_patch=True` runs
them, to check a task at its base commit); files touched by a failed ``--reject`` are restored
before `patch` runs (the harness runs `patch` over the half-applied tree); `.orig` files left by a
fuzzy `patch` stay where they are (the current harness moves them back over the patched files,
which undoes a fuzzy apply); a test patch that does not apply stops the run.
"""

from __future__ import annotations

import posixpath
import re
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from runtime.records import Task

from ..workspace import Workspace
from .parsers import get_parser
from .rules import (
    END_TEST_OUTPUT,
    RESET_FAILED,
    START_TEST_OUTPUT,
    TEST_EXIT_CODE,
    TEST_PATCH_FAILED,
    GradeError,
    ResolutionStatus,
    TestsReport,
    grade_log,
)

__all__ = ["APPLY_COMMANDS", "CONDA_ACTIVATE", "EVAL_DIR", "GradeReport", "eval_script", "grade", "harness_eval_commands",
           "patch_paths"]

# The harness's GIT_APPLY_CMDS (swebench/harness/run_evaluation.py), tried in this order, with a
# three-way merge inserted after the plain apply as the design asks: it takes patches whose context
# drifted but whose blobs the repository has, and never applies anything `git apply` would refuse
# silently (a conflict fails it, and the files are reset before the next command).
APPLY_COMMANDS: tuple[str, ...] = (
    "git apply --verbose",
    "git apply --verbose --3way",
    "git apply --verbose --reject",
    "patch --batch --fuzz=5 -p1 -i",
)
EVAL_DIR = ".git/swe_dapo"  # relative to the workspace's workdir
MODEL_PATCH = f"{EVAL_DIR}/model.patch"
TEST_PATCH = f"{EVAL_DIR}/test.patch"
EVAL_SCRIPT = f"{EVAL_DIR}/eval.sh"

APPLY_TIMEOUT_S = 60.0
APPLY_OUTPUT_BYTES = 64 << 10
LOG_TAIL_CHARS = 4000  # of the eval log, kept in `to_dict()`


# ---------------------------------------------------------------------------------------------
# Which files a patch touches (a small reader of diff headers; hunks are skipped by their counts).

_HUNK = re.compile(r"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")
_DIFF_GIT = re.compile(r'^diff --git ("(?:[^"\\]|\\.)*"|\S+) ("(?:[^"\\]|\\.)*"|\S+)$')
_ESCAPES = {"a": "\a", "b": "\b", "t": "\t", "n": "\n", "v": "\v", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}


def _unquote(name: str) -> str:
    """A path as git writes it: C-quoted (octal bytes) when it holds unusual characters."""
    if not (len(name) >= 2 and name[0] == name[-1] == '"'):
        return name
    out = bytearray()
    body, i = name[1:-1], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt in "01234567" and re.match(r"[0-7]{3}", body[i + 1:i + 4]):
                out.append(int(body[i + 1:i + 4], 8) & 0xFF)
                i += 4
                continue
            out += _ESCAPES.get(nxt, nxt).encode()
            i += 2
            continue
        out += ch.encode()
        i += 1
    return out.decode("utf-8", errors="surrogateescape")


def _strip_prefix(name: str) -> str | None:
    name = _unquote(name.split("\t", 1)[0].rstrip())
    if name == "/dev/null" or not name:
        return None
    return name[2:] if name.startswith(("a/", "b/")) else name


def patch_paths(patch: str) -> list[str]:
    """Paths (old and new names, in order of appearance, no duplicates) a unified diff touches."""
    paths: list[str] = []
    lines = patch.split("\n")
    old_left = new_left = 0
    for i, line in enumerate(lines):
        if old_left > 0 or new_left > 0:  # inside a hunk
            tag = line[:1]
            if tag == "\\":  # "\ No newline at end of file"
                continue
            if tag in (" ", ""):
                old_left, new_left = old_left - 1, new_left - 1
                continue
            if tag in ("-", "+"):
                old_left, new_left = (old_left - 1, new_left) if tag == "-" else (old_left, new_left - 1)
                continue
            old_left = new_left = 0  # a header: the hunk was shorter than announced
        names: list[str | None] = []
        if m := _HUNK.match(line):
            old_left = int(m.group(1) or 1)
            new_left = int(m.group(2) or 1)
        elif m := _DIFF_GIT.match(line):
            names = [_strip_prefix(m.group(1)), _strip_prefix(m.group(2))]
        elif line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            names = [_strip_prefix(line[4:]), _strip_prefix(lines[i + 1][4:])]
        elif line.startswith(("rename from ", "rename to ", "copy from ", "copy to ")):
            names = [_unquote(line.split(" ", 2)[2])]
        for name in names:
            if name and name not in paths:
                paths.append(name)
    return paths


def _safe_relative(path: str) -> bool:
    """A path we may reset or remove: relative, inside the repository, not in .git."""
    if not path or "\0" in path or path.startswith("/"):
        return False
    norm = posixpath.normpath(path)
    return norm not in (".", "..") and not norm.startswith("../") and norm.split("/", 1)[0] != ".git"


# ---------------------------------------------------------------------------------------------
# The eval script.

_RESET_LOOP = """\
for path in {paths}; do
  if git cat-file -e "$base:$path" 2>/dev/null; then
    git checkout -q "$base" -- "$path" || {{ echo '{reset_failed}'; exit 1; }}
  else
    rm -rf -- "$path" || {{ echo '{reset_failed}'; exit 1; }}
  fi
done
"""


# What the harness's eval script does first in a SWE-bench-style image (conda env "testbed"); guarded,
# so that it is a no-op where there is no conda.
CONDA_ACTIVATE = ("if [ -f /opt/miniconda3/bin/activate ]; then "
                  "source /opt/miniconda3/bin/activate && conda activate testbed; fi")


def harness_eval_commands(task: Task) -> list[str] | None:
    """``task.metadata["harness"]["eval_commands"]`` (set by agent.tasks for SWE-bench-style rows:
    shell lines the reference harness runs before the tests, in the same shell), or None when the
    task has no harness metadata (toy tasks). ValueError naming the field when it is malformed."""
    harness = task.metadata.get("harness")
    if harness is None:
        return None
    where = "Task.metadata['harness']"
    if not isinstance(harness, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(harness).__name__}")
    commands = harness.get("eval_commands", [])
    if isinstance(commands, str) or not isinstance(commands, (list, tuple)) or \
            not all(isinstance(c, str) for c in commands):
        raise ValueError(f"{where}['eval_commands']: expected a list of shell lines, got {commands!r:.200}")
    return list(commands)


def eval_script(task: Task) -> str:
    """The bash script that resets the test files, applies the test patch and runs the tests
    between the markers (see the module docstring). Pure: the same task gives the same bytes."""
    lines = [
        "#!/bin/bash",
        f"# Written by agent.grading for task {task.id!r}: the SWE-bench harness's eval script.",
        "set -uo pipefail",
        f"base={shlex.quote(task.base_commit)}",
    ]
    setup = harness_eval_commands(task)
    if setup is not None:  # a task from a harness dataset: its environment, as the harness sets it up
        lines += [CONDA_ACTIVATE, *setup]
    if task.test_patch.strip():
        paths = [p for p in patch_paths(task.test_patch) if _safe_relative(p)]
        if paths:
            lines.append(_RESET_LOOP.format(paths=" ".join(shlex.quote(p) for p in paths),
                                            reset_failed=RESET_FAILED).rstrip("\n"))
        lines.append(f"git apply --verbose {TEST_PATCH} || {{ echo '{TEST_PATCH_FAILED}'; exit 1; }}")
    lines += [
        f"echo '{START_TEST_OUTPUT}'",
        task.test_command,
        "rc=$?",
        f"echo '{END_TEST_OUTPUT}'",
        f'echo "{TEST_EXIT_CODE}: $rc"',
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The report.


@dataclass(frozen=True)
class GradeReport:
    """The grade of one model patch on one task. `resolved` is True only for RESOLVED_FULL with no error."""

    task_id: str
    resolution: ResolutionStatus = ResolutionStatus.NO
    error: GradeError | None = None
    reason: str = ""  # why `error` happened, for a human
    patch_applied: bool = False
    apply_command: str = ""  # the command that applied the model patch ("" when none did)
    report: TestsReport | None = None  # per-test outcome; None when the tests were not graded
    tests: dict[str, str] = field(default_factory=dict)  # F2P and P2P name -> status, or "missing"
    test_exit_code: int | None = None
    log_truncated: bool = False
    apply_s: float = 0.0
    tests_s: float = 0.0
    duration_s: float = 0.0
    log: str = field(default="", repr=False)  # the eval script's output (capped by the workspace)

    @property
    def resolved(self) -> bool:
        return self.error is None and self.resolution is ResolutionStatus.FULL

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; the log is reduced to its last `LOG_TAIL_CHARS` characters."""
        report = self.report.to_dict() if self.report is not None else {}
        return {
            "task_id": self.task_id,
            "resolved": self.resolved,
            "resolution": self.resolution.value,
            "error": self.error.value if self.error is not None else None,
            "infra_error": self.error.infra if self.error is not None else False,
            "reason": self.reason,
            "patch_applied": self.patch_applied,
            "apply_command": self.apply_command,
            "tests": dict(self.tests),
            "FAIL_TO_PASS": report.get("FAIL_TO_PASS", {"success": [], "failure": []}),
            "PASS_TO_PASS": report.get("PASS_TO_PASS", {"success": [], "failure": []}),
            "test_exit_code": self.test_exit_code,
            "log_truncated": self.log_truncated,
            "apply_s": round(self.apply_s, 4),
            "tests_s": round(self.tests_s, 4),
            "duration_s": round(self.duration_s, 4),
            "log_tail": self.log[-LOG_TAIL_CHARS:],
        }


# ---------------------------------------------------------------------------------------------
# Grading.


def _encode(text: str) -> bytes:
    try:
        return text.encode("utf-8", errors="surrogateescape")  # round-trips Workspace.diff's bytes
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="replace")


def _tail(data: bytes, n: int = 1500) -> str:
    return data[-n:].decode("utf-8", errors="replace").strip()


class _Failed(Exception):
    """Internal: stop grading with this error."""

    def __init__(self, error: GradeError, reason: str) -> None:
        super().__init__(reason)
        self.error, self.reason = error, reason


async def _apply_model_patch(task: Task, workspace: Workspace, patch: str) -> str:
    """Try `APPLY_COMMANDS` in order; the command that applied, or raise _Failed."""
    await workspace.write_file(MODEL_PATCH, _encode(patch))
    touched = [p for p in patch_paths(patch) if _safe_relative(p)]
    output = b""
    for command in APPLY_COMMANDS:
        res = await workspace.exec([*command.split(), MODEL_PATCH], timeout_s=APPLY_TIMEOUT_S, stdin=b"",
                                   max_output_bytes=APPLY_OUTPUT_BYTES)
        if res.exit_code == 0 and not res.timed_out:
            return command
        output = res.output
        if ("--reject" in command or "--3way" in command) and touched:
            # --reject leaves the hunks that applied and .rej files, a failed --3way conflict markers
            # and unmerged index entries: undo them before the next command.
            reset = ('base=$1; shift; for p in "$@"; do '
                     'if git cat-file -e "$base:$p" 2>/dev/null; then git checkout -q "$base" -- "$p"; '
                     'else rm -rf -- "$p"; fi; rm -f -- "$p.rej" "$p.orig"; done')
            await workspace.exec(["/bin/sh", "-c", reset, "reset", task.base_commit, *touched],
                                 timeout_s=APPLY_TIMEOUT_S, stdin=b"", max_output_bytes=APPLY_OUTPUT_BYTES)
    raise _Failed(GradeError.PATCH_FAILED, f"no apply command accepted the patch; last output: {_tail(output)}")


def _script_failure(log: str) -> _Failed | None:
    """Our own eval-script flags, looked for only before the start marker (tests cannot forge them)."""
    before = log.split(START_TEST_OUTPUT, 1)[0]
    if re.search(rf"^{re.escape(TEST_PATCH_FAILED)}$", before, re.M):
        return _Failed(GradeError.TEST_PATCH_FAILED, f"the task's test patch did not apply: {before[-1500:].strip()}")
    if re.search(rf"^{re.escape(RESET_FAILED)}$", before, re.M):
        return _Failed(GradeError.RESET_FAILED, f"could not restore the test files: {before[-1500:].strip()}")
    return None


async def grade(
    task: Task,
    model_patch: str,
    workspace: Workspace,
    *,
    timeout_s: float,
    allow_empty_patch: bool = False,
    env: Mapping[str, str] | None = None,
    max_log_bytes: int = 16 << 20,
) -> GradeReport:
    """Grade `model_patch` on `task` in `workspace` (a fresh checkout of `task.base_commit`).

    `timeout_s` bounds the test run (patch application has its own `APPLY_TIMEOUT_S` per command);
    `env` is added to the test run's environment; `allow_empty_patch` runs the tests even for an
    empty patch (to check that a task's FAIL_TO_PASS tests fail at the base commit).
    """
    if not isinstance(task, Task):
        raise TypeError(f"task: expected runtime.records.Task, got {type(task).__name__}")
    if not isinstance(model_patch, str):
        raise TypeError(f"model_patch: expected str, got {type(model_patch).__name__}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"timeout_s: must be a number > 0, got {timeout_s!r}")
    parser = get_parser(task.log_parser)
    harness_eval_commands(task)  # refuse malformed metadata before any work
    start = time.perf_counter()
    state: dict[str, Any] = {"apply_command": "", "apply_s": 0.0, "tests_s": 0.0}

    def failed(error: GradeError, reason: str, **extra: Any) -> GradeReport:
        return GradeReport(task_id=task.id, error=error, reason=reason, patch_applied=bool(state["apply_command"]),
                           apply_command=state["apply_command"], apply_s=state["apply_s"], tests_s=state["tests_s"],
                           duration_s=time.perf_counter() - start, **extra)

    empty = not model_patch.strip()
    if empty and not allow_empty_patch:
        return failed(GradeError.EMPTY_PATCH, "the model patch is empty")
    try:
        if not empty:
            t0 = time.perf_counter()
            try:
                state["apply_command"] = await _apply_model_patch(task, workspace, model_patch)
            finally:
                state["apply_s"] = time.perf_counter() - t0
        if task.test_patch.strip():
            await workspace.write_file(TEST_PATCH, _encode(task.test_patch))
        await workspace.write_file(EVAL_SCRIPT, eval_script(task).encode())
        t0 = time.perf_counter()
        res = await workspace.exec(["bash", EVAL_SCRIPT], timeout_s=timeout_s, stdin=b"",
                                   env=dict(env) if env else None, max_output_bytes=max_log_bytes)
        state["tests_s"] = time.perf_counter() - t0
    except _Failed as exc:
        return failed(exc.error, exc.reason)
    except Exception as exc:  # the workspace broke (sandbox lost, disk full): data, not a crash
        return failed(GradeError.WORKSPACE_ERROR, f"{type(exc).__name__}: {exc}")
    log = res.output.decode("utf-8", errors="replace")
    if res.timed_out:
        return failed(GradeError.TIMEOUT, f"the tests ran past {timeout_s:g} s", log=log, log_truncated=res.truncated)
    if script_failure := _script_failure(log):
        return failed(script_failure.error, script_failure.reason, log=log, log_truncated=res.truncated)
    verdict = grade_log(log, parser, task.FAIL_TO_PASS, task.PASS_TO_PASS)
    if verdict.error is not None:
        return failed(verdict.error, verdict.reason, log=log, log_truncated=res.truncated,
                      test_exit_code=verdict.test_exit_code)
    names = [*task.FAIL_TO_PASS, *task.PASS_TO_PASS]
    return GradeReport(
        task_id=task.id,
        resolution=verdict.resolution,
        patch_applied=bool(state["apply_command"]),
        apply_command=state["apply_command"],
        report=verdict.report,
        tests={name: str(verdict.status_map.get(name, "missing")) for name in names},
        test_exit_code=verdict.test_exit_code,
        log_truncated=res.truncated,
        apply_s=state["apply_s"],
        tests_s=state["tests_s"],
        duration_s=time.perf_counter() - start,
        log=log,
    )
