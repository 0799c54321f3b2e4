"""Grading as the SWE-bench harness does it: apply the model patch, apply the test patch, run the
tests between start/end markers, parse the log, decide `resolved`.

- `parsers`: test-log parsers (pytest, django, sympy, ...) -> {test: TestStatus}; pure.
- `rules`: the resolution rule (FAIL_TO_PASS / PASS_TO_PASS -> RESOLVED_FULL/PARTIAL/NO) and the
  reading of an eval log (markers, harness flags); pure.
- `grade`: `grade(task, model_patch, workspace, timeout_s=...)` -> `GradeReport`, through the
  `agent.workspace.Workspace` protocol (a sandbox, or a local directory in tests).

Errors: a grade never raises for what a patch or a log contains; it reports `GradeReport.error` (a
`GradeError`) and is then never resolved. Bad arguments raise ValueError / TypeError naming them.
"""

from .grade import APPLY_COMMANDS, GradeReport, eval_script, grade, patch_paths
from .parsers import PARSER_FOR_REPO, PARSERS, Parser, StatusMap, TestStatus, get_parser
from .rules import (
    END_TEST_OUTPUT,
    START_TEST_OUTPUT,
    GradeError,
    LogGrade,
    ResolutionStatus,
    TestsReport,
    grade_log,
    resolution_status,
    tests_report,
)

__all__ = [
    "APPLY_COMMANDS",
    "END_TEST_OUTPUT",
    "PARSERS",
    "PARSER_FOR_REPO",
    "START_TEST_OUTPUT",
    "GradeError",
    "GradeReport",
    "LogGrade",
    "Parser",
    "ResolutionStatus",
    "StatusMap",
    "TestStatus",
    "TestsReport",
    "eval_script",
    "get_parser",
    "grade",
    "grade_log",
    "patch_paths",
    "resolution_status",
    "tests_report",
]
