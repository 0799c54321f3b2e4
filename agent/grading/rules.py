"""The SWE-bench resolution rule, and the reading of an eval log, as pure functions.

Mirrors `swebench/harness/grading.py` (`test_passed`, `test_maintained`, `test_failed`,
`get_eval_tests_report`, `get_resolution_status`) and the log checks of `get_logs_eval`:

- a FAIL_TO_PASS test succeeds when its status is PASSED or XFAIL; anything else, including
  SKIPPED and absent from the log, is a failure;
- a PASS_TO_PASS test succeeds when it is PASSED, XFAIL or SKIPPED; otherwise it is a failure;
- RESOLVED_FULL when both success rates are 1, RESOLVED_PARTIAL when 0 < F2P rate < 1 and the
  P2P rate is 1, RESOLVED_NO otherwise; an empty list has rate 1 (as in the harness); `resolved`
  means RESOLVED_FULL.

XPASS (which the harness never records: its enum has no such status, so the test is absent) is a
failure in both lists, exactly what absence means there.

A log is graded only from the text between `START_TEST_OUTPUT` and `END_TEST_OUTPUT`. A log without
both markers, one carrying a harness failure flag (`APPLY_PATCH_FAIL`, `RESET_FAILED`, `TESTS_ERROR`,
`TESTS_TIMEOUT`, anywhere, as the harness checks), or one in which the parser finds no test at all,
is an error (`GradeError`) and never resolved. (The harness would grade an empty map as RESOLVED_NO,
and when the text between the markers is empty it re-parses the whole log to catch output a remote
runner sent elsewhere; our eval script sends stdout and stderr to one stream, so neither applies.)
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .parsers import Parser, StatusMap, TestStatus, get_parser

__all__ = [
    "APPLY_PATCH_FAIL",
    "END_TEST_OUTPUT",
    "RESET_FAILED",
    "START_TEST_OUTPUT",
    "TESTS_ERROR",
    "TESTS_TIMEOUT",
    "TEST_EXIT_CODE",
    "TEST_PATCH_FAILED",
    "GradeError",
    "LogGrade",
    "ResolutionStatus",
    "TestsReport",
    "f2p_passed",
    "grade_log",
    "p2p_passed",
    "resolution_status",
    "test_output",
    "tests_report",
]

# The harness's log markers (swebench/harness/constants/__init__.py).
START_TEST_OUTPUT = ">>>>> Start Test Output"
END_TEST_OUTPUT = ">>>>> End Test Output"
TEST_EXIT_CODE = ">>>>> Test Exit Code"
APPLY_PATCH_FAIL = ">>>>> Patch Apply Failed"
RESET_FAILED = ">>>>> Reset Failed"
TESTS_ERROR = ">>>>> Tests Errored"
TESTS_TIMEOUT = ">>>>> Tests Timed Out"
# Ours: the harness's eval script carries on when the test patch does not apply; ours stops there.
TEST_PATCH_FAILED = ">>>>> Test Patch Apply Failed"

_HARNESS_FLAGS = (APPLY_PATCH_FAIL, RESET_FAILED, TESTS_ERROR, TESTS_TIMEOUT)


class ResolutionStatus(enum.StrEnum):
    FULL = "RESOLVED_FULL"
    PARTIAL = "RESOLVED_PARTIAL"
    NO = "RESOLVED_NO"


class GradeError(enum.StrEnum):
    """Why a grade has no test outcome. Every error grades as not resolved.

    `infra` errors are the task's or the machine's fault, not the patch's: a trainer may drop such
    an episode instead of rewarding it 0 (see `GradeError.infra`).
    """

    EMPTY_PATCH = "empty_patch"  # the model submitted no change
    PATCH_FAILED = "patch_failed"  # no apply command accepted the model's patch
    RESET_FAILED = "reset_failed"  # the test files could not be restored to the base commit
    TEST_PATCH_FAILED = "test_patch_failed"  # the task's test patch did not apply
    TIMEOUT = "timeout"  # the tests ran past their deadline
    MARKERS_MISSING = "markers_missing"  # the start or end marker is not in the log
    HARNESS_FLAG = "harness_flag"  # a harness failure flag appears in the log
    LOG_UNPARSABLE = "log_unparsable"  # the parser found no test result between the markers
    WORKSPACE_ERROR = "workspace_error"  # running a command or writing a file failed

    @property
    def infra(self) -> bool:
        return self in (GradeError.RESET_FAILED, GradeError.TEST_PATCH_FAILED, GradeError.WORKSPACE_ERROR)


# ---------------------------------------------------------------------------------------------
# The rule.


def f2p_passed(name: str, status_map: Mapping[str, str]) -> bool:
    """The harness's `test_passed`: PASSED or XFAIL."""
    return status_map.get(name) in (TestStatus.PASSED, TestStatus.XFAIL)


def p2p_passed(name: str, status_map: Mapping[str, str]) -> bool:
    """The harness's `test_maintained`: PASSED, XFAIL or SKIPPED."""
    return f2p_passed(name, status_map) or status_map.get(name) == TestStatus.SKIPPED


def _rate(success: Sequence[str], failure: Sequence[str]) -> float:
    total = len(success) + len(failure)
    return 1.0 if total == 0 else len(success) / total


@dataclass(frozen=True)
class TestsReport:
    """Per-test outcome of one graded run: the harness's ``tests_status`` report."""

    __test__ = False  # not a pytest test class

    f2p_success: list[str] = field(default_factory=list)
    f2p_failure: list[str] = field(default_factory=list)
    p2p_success: list[str] = field(default_factory=list)
    p2p_failure: list[str] = field(default_factory=list)

    @property
    def f2p_rate(self) -> float:
        return _rate(self.f2p_success, self.f2p_failure)

    @property
    def p2p_rate(self) -> float:
        return _rate(self.p2p_success, self.p2p_failure)

    @property
    def resolution(self) -> ResolutionStatus:
        return resolution_status(self)

    @property
    def resolved(self) -> bool:
        return self.resolution is ResolutionStatus.FULL

    def to_dict(self) -> dict[str, Any]:
        """The harness's report layout."""
        return {
            "FAIL_TO_PASS": {"success": list(self.f2p_success), "failure": list(self.f2p_failure)},
            "PASS_TO_PASS": {"success": list(self.p2p_success), "failure": list(self.p2p_failure)},
        }


def tests_report(status_map: Mapping[str, str], fail_to_pass: Sequence[str],
                 pass_to_pass: Sequence[str]) -> TestsReport:
    report = TestsReport()
    for name in fail_to_pass:
        (report.f2p_success if f2p_passed(name, status_map) else report.f2p_failure).append(name)
    for name in pass_to_pass:
        (report.p2p_success if p2p_passed(name, status_map) else report.p2p_failure).append(name)
    return report


tests_report.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def resolution_status(report: TestsReport) -> ResolutionStatus:
    f2p, p2p = report.f2p_rate, report.p2p_rate
    if f2p == 1 and p2p == 1:
        return ResolutionStatus.FULL
    if 0 < f2p < 1 and p2p == 1:
        return ResolutionStatus.PARTIAL
    return ResolutionStatus.NO


# ---------------------------------------------------------------------------------------------
# Reading a log.


def test_output(log: str) -> str | None:
    """The text between the first start marker and the first end marker after it; None if either
    is missing (the harness's ``content.split(START)[1].split(END)[0]``)."""
    _, start, rest = log.partition(START_TEST_OUTPUT)
    if not start:
        return None
    body, end, _ = rest.partition(END_TEST_OUTPUT)
    return body if end else None


test_output.__test__ = False  # type: ignore[attr-defined]  # not a pytest test

_EXIT_CODE = re.compile(rf"^{re.escape(TEST_EXIT_CODE)}: (-?\d+)\s*$", re.M)


@dataclass(frozen=True)
class LogGrade:
    """What one eval log says: the parsed statuses and the report, or an error and its reason."""

    status_map: StatusMap
    report: TestsReport | None  # None exactly when `error` is set
    error: GradeError | None = None
    reason: str = ""
    test_exit_code: int | None = None  # the test command's exit status, when the log records it

    @property
    def resolution(self) -> ResolutionStatus:
        return ResolutionStatus.NO if self.report is None else self.report.resolution

    @property
    def resolved(self) -> bool:
        return self.error is None and self.report is not None and self.report.resolved


def grade_log(log: str, parser: str | Parser, fail_to_pass: Sequence[str],
              pass_to_pass: Sequence[str]) -> LogGrade:
    """Grade an eval log (see the module docstring). `parser` is a name in `PARSERS` or a parser."""
    parse = get_parser(parser) if isinstance(parser, str) else parser
    code = _EXIT_CODE.search(log)
    exit_code = int(code.group(1)) if code else None
    body = test_output(log)
    if body is None:
        missing = START_TEST_OUTPUT if START_TEST_OUTPUT not in log else END_TEST_OUTPUT
        return LogGrade({}, None, GradeError.MARKERS_MISSING, f"{missing!r} is not in the log", exit_code)
    for flag in _HARNESS_FLAGS:
        if flag in log:
            return LogGrade({}, None, GradeError.HARNESS_FLAG, f"the log contains the harness flag {flag!r}",
                            exit_code)
    status_map = parse(body)
    if not status_map:
        return LogGrade({}, None, GradeError.LOG_UNPARSABLE,
                        f"no test result found between the markers ({len(body)} characters)", exit_code)
    return LogGrade(status_map, tests_report(status_map, fail_to_pass, pass_to_pass), None, "", exit_code)
