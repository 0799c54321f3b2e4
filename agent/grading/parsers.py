"""Test-log parsers: a test runner's output -> {test name: TestStatus}, as the SWE-bench harness reads it.

Every parser is a pure function of the log text (the part between the start and end markers, see
`agent.grading.rules`). The names a parser produces are the keys that FAIL_TO_PASS / PASS_TO_PASS
lists use, and those lists were made by the SWE-bench harness's own parsers
(`swebench/harness/log_parsers/python.py`) when the datasets were validated. So each parser here
reproduces the harness's keys exactly, quirks included, and the grade of a log is the harness's:

- pytest: the name is the first whitespace-free token after the status (`FAILED x - msg` -> `x`),
  so a parametrised id with a space, ``test_a[a b]``, is keyed ``test_a[a``; `SKIPPED [1] file:line`
  summary lines (no test id) are ignored; verbose ``nodeid STATUS`` lines are read too.
- django: unittest's verbose ``name (module.Class) ... ok``; a test with a docstring is keyed by the
  docstring line that carries ``... ok``; ``expected failure`` / ``unexpected success`` are not read.
- sympy: ``test_x ok|F|E`` lines and the failure headers ``___ path.py:test_x ___``; the last test of
  a file, whose line ends in ``[OK]`` / ``[FAIL]``, is not read (as in the harness).

On top of the harness's keys the pytest-family parsers add two kinds of *extra* entries that the
harness cannot produce, so that they can never change a harness grade (harness keys win on a clash):
the full node id when it contains whitespace (``test_a[a b]``, for datasets that list full ids) and
`XPASS` results. The harness has no XPASS status: such a test is absent from its map, which counts as
a failure; the rules here count XPASS as a failure too.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable

__all__ = [
    "PARSERS",
    "PARSER_FOR_REPO",
    "Parser",
    "StatusMap",
    "TestStatus",
    "get_parser",
    "parse_django",
    "parse_matplotlib",
    "parse_pytest",
    "parse_pytest_options",
    "parse_pytest_v2",
    "parse_seaborn",
    "parse_sympy",
]


class TestStatus(enum.StrEnum):
    """The status of one test in a log; values are the strings the harness writes in its reports."""

    PASSED = "PASSED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    ERROR = "ERROR"
    XFAIL = "XFAIL"
    XPASS = "XPASS"  # not a harness status: read only as an extra (see the module docstring)


TestStatus.__test__ = False  # type: ignore[attr-defined]  # not a pytest test class

StatusMap = dict[str, TestStatus]
Parser = Callable[[str], StatusMap]

# The harness's statuses, in its enum's order (the regex alternation order matters for nothing here,
# but keeping it documents where it came from).
_HARNESS = (TestStatus.FAILED, TestStatus.PASSED, TestStatus.SKIPPED, TestStatus.ERROR, TestStatus.XFAIL)
_HARNESS_ALT = "|".join(s.value for s in _HARNESS)
_HARNESS_PREFIXES = tuple(s.value for s in _HARNESS)
_HARNESS_VALUES = frozenset(_HARNESS_PREFIXES)
_STATUS_FIRST = re.compile(rf"^({_HARNESS_ALT})\s+(\S+)")
_TEST_FIRST = re.compile(rf"^(\S+)\s+({_HARNESS_ALT})(?:\s|$)")
_SKIP_COUNT = re.compile(r"\[\d+\]")


# ---------------------------------------------------------------------------------------------
# pytest: the harness's keys.


def _pytest_harness_line(line: str) -> tuple[str, TestStatus] | None:
    """One `-rA` summary line (``STATUS name``) or verbose line (``name STATUS``), harness rules."""
    if m := _STATUS_FIRST.match(line):
        status, name = TestStatus(m.group(1)), m.group(2)
        if status is TestStatus.FAILED:
            # The harness drops the " - message" separator first; same token unless the name is "-".
            name = line.replace(" - ", " ").split()[1]
        if status is TestStatus.SKIPPED and _SKIP_COUNT.match(name):
            return None  # "SKIPPED [2] tests/x.py:10: reason" names no test
        return name, status
    if m := _TEST_FIRST.match(line):
        return m.group(1), TestStatus(m.group(2))
    return None


# ---------------------------------------------------------------------------------------------
# pytest: full node ids (extras).

_ALL_ALT = "|".join(s.value for s in TestStatus)
_FULL_STATUS_FIRST = re.compile(rf"^({_ALL_ALT}) (\S.*)$")
_FULL_TEST_FIRST = re.compile(rf" ({_ALL_ALT})(?= |$)")


def _node_id_prefix(rest: str) -> str:
    """The node id at the start of ``rest``: up to a " - message" outside brackets, or the end.

    Parametrised ids may hold spaces, dashes and nested brackets (``test_a[x - y]``,
    ``test_b[[1, 2]]``); a " - " inside brackets belongs to the id.
    """
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(depth - 1, 0)
        elif depth == 0 and rest.startswith(" - ", i):
            return rest[:i]
    if depth:  # unbalanced brackets: fall back to the first separator
        return rest.split(" - ", 1)[0].rstrip()
    return rest.rstrip()


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if depth < 0:
            return False
    return depth == 0


def _pytest_full_line(line: str) -> tuple[str, TestStatus] | None:
    if m := _FULL_STATUS_FIRST.match(line):
        rest = m.group(2)
        if rest.startswith("["):  # SKIPPED [1] file:line: reason
            return None
        name = _node_id_prefix(rest)
        return (name, TestStatus(m.group(1))) if name else None
    if line[:1].isspace() or "::" not in line:
        return None
    for m in _FULL_TEST_FIRST.finditer(line):  # verbose "nodeid STATUS [ 50%]"
        name = line[: m.start()]
        if "::" in name and _balanced(name):
            return name, TestStatus(m.group(1))
    return None


def _is_extra(name: str, status: TestStatus) -> bool:
    return status is TestStatus.XPASS or any(ch.isspace() for ch in name)


def _pytest_family(lines: list[str], normalize: Callable[[str], str] = lambda name: name) -> StatusMap:
    harness: StatusMap = {}
    extras: StatusMap = {}
    for line in lines:
        if hit := _pytest_harness_line(line):
            harness[normalize(hit[0])] = hit[1]
        if (full := _pytest_full_line(line)) and _is_extra(*full):
            extras[normalize(full[0])] = full[1]
    return {**extras, **harness}


def parse_pytest(log: str) -> StatusMap:
    """``pytest -rA`` (and ``-v``) output."""
    return _pytest_family(log.split("\n"))


_OPTION = re.compile(r"(.*?)\[(.*)\]")


def _normalize_option(name: str) -> str:
    # Parametrised by a path (requests, pylint, pydicom): keep only its last component, so ids
    # do not depend on where the repository was checked out.
    m = _OPTION.search(name)
    if not m:
        return name
    main, option = m.groups()
    if option.startswith("/") and not option.startswith("//") and "*" not in option:
        option = "/" + option.split("/")[-1]
    return f"{main}[{option}]"


def parse_pytest_options(log: str) -> StatusMap:
    """pytest output whose parametrised ids may be absolute paths (normalised to their last part)."""
    return _pytest_family(log.split("\n"), _normalize_option)


_COLOR = re.compile(r"\[(\d+)m")
_CONTROL = str.maketrans("", "", "".join(chr(c) for c in range(1, 32)))


def parse_pytest_v2(log: str) -> StatusMap:
    """pytest output with colour codes: ``[NNm`` sequences and control characters are removed first."""
    return _pytest_family([_COLOR.sub("", line).translate(_CONTROL) for line in log.split("\n")])


def parse_matplotlib(log: str) -> StatusMap:
    """pytest output as the harness reads matplotlib's: enum reprs in ids are shortened, and only
    ``STATUS name`` lines count (an old-style reader: ``SKIPPED [1] ...`` is keyed ``[1]``)."""
    harness: StatusMap = {}
    extras: StatusMap = {}
    for line in log.split("\n"):
        line = line.replace("MouseButton.LEFT", "1").replace("MouseButton.RIGHT", "3")
        if line.startswith(_HARNESS_PREFIXES):
            words = (line.replace(" - ", " ") if line.startswith("FAILED") else line).split()
            # The harness keeps any first word that merely starts with a status ("PASSEDx"); such a
            # value is neither passing nor failing there, and is dropped here (no test prints it).
            if len(words) > 1 and words[0] in _HARNESS_VALUES:
                harness[words[1]] = TestStatus(words[0])
        if (full := _pytest_full_line(line)) and _is_extra(*full):
            extras[full[0]] = full[1]
    return {**extras, **harness}


def parse_seaborn(log: str) -> StatusMap:
    """pytest output as the harness reads seaborn's: only PASSED and FAILED results count."""
    harness: StatusMap = {}
    extras: StatusMap = {}
    for line in log.split("\n"):
        if line.startswith("FAILED"):
            words = line.split()
            if len(words) > 1:
                harness[words[1]] = TestStatus.FAILED
        elif " PASSED " in line:
            words = line.split()
            if words[1] == "PASSED":
                harness[words[0]] = TestStatus.PASSED
        elif line.startswith("PASSED"):
            words = line.split()
            if len(words) > 1:
                harness[words[1]] = TestStatus.PASSED
        if (full := _pytest_full_line(line)) and _is_extra(*full):
            extras[full[0]] = full[1]
    return {**extras, **harness}


# ---------------------------------------------------------------------------------------------
# django (unittest, verbosity 2).

_DJANGO_PASS_SUFFIXES = (" ... ok", " ... OK", " ...  OK")
# A test's result line interrupted by a multi-line message printed by Django itself.
_DJANGO_INTERRUPTED = [
    re.compile(r"^(.*?)\s\.\.\.\sTesting\ against\ Django\ installed\ in\ ((?s:.*?))\ silenced\)\.\nok$", re.M),
    re.compile(r"^(.*?)\s\.\.\.\sInternal\ Server\ Error:\ \/(.*)\/\nok$", re.M),
    re.compile(r"^(.*?)\s\.\.\.\sSystem check identified no issues \(0 silenced\)\nok$", re.M),
]


def parse_django(log: str) -> StatusMap:
    """``runtests.py --verbosity 2`` output: ``test_x (module.Class) ... ok|FAIL|ERROR|skipped 'why'``.

    Python 3.11+ prints ``test_x (module.Class.test_x)``; both are read as they appear. A test with a
    docstring prints ``test_x (module.Class)`` then ``First docstring line ... ok``: the key is the
    docstring line. A result printed on a later line (``... <output>`` then ``ok``) is credited to the
    last test that printed ``...``.
    """
    status_map: StatusMap = {}
    prev_test: str | None = None
    for line in log.split("\n"):
        line = line.strip()
        if "--version is equivalent to version" in line:
            status_map["--version is equivalent to version"] = TestStatus.PASSED
        if " ... " in line:
            prev_test = line.split(" ... ")[0]
        for suffix in _DJANGO_PASS_SUFFIXES:
            if line.endswith(suffix):
                # django__django-7188 prints a migration message on the same line before the test.
                if line.startswith("Applying sites.0002_alter_domain_unique...test_no_migrations"):
                    line = line.split("...", 1)[-1].strip()
                status_map[line.rsplit(suffix, 1)[0]] = TestStatus.PASSED
                break
        if " ... skipped" in line:
            status_map[line.split(" ... skipped")[0]] = TestStatus.SKIPPED
        if line.endswith(" ... FAIL"):
            status_map[line.split(" ... FAIL")[0]] = TestStatus.FAILED
        if line.startswith("FAIL:") and len(line.split()) > 1:
            status_map[line.split()[1].strip()] = TestStatus.FAILED
        if line.endswith(" ... ERROR"):
            status_map[line.split(" ... ERROR")[0]] = TestStatus.ERROR
        if line.startswith("ERROR:") and len(line.split()) > 1:
            status_map[line.split()[1].strip()] = TestStatus.ERROR
        if line.startswith("ok") and prev_test is not None:
            status_map[prev_test] = TestStatus.PASSED
    for pattern in _DJANGO_INTERRUPTED:
        for m in pattern.finditer(log):
            status_map[m.group(1)] = TestStatus.PASSED
    return status_map


# ---------------------------------------------------------------------------------------------
# sympy (bin/test -C --verbose).

_SYMPY_FAILURE_HEADER = re.compile(r"(_*) (.*)\.py:(.*) (_*)")


def parse_sympy(log: str) -> StatusMap:
    """``bin/test --verbose`` output: ``test_x ok``, ``test_x F``, ``test_x E``, and the failure
    headers ``____ sympy/core/tests/test_x.py:test_y ____`` (keyed ``path.py:test_y``)."""
    status_map: StatusMap = {}
    for m in _SYMPY_FAILURE_HEADER.findall(log):
        status_map[f"{m[1]}.py:{m[2]}"] = TestStatus.FAILED
    for line in log.split("\n"):
        line = line.strip()
        if not line.startswith("test_"):
            continue
        name = line.split()[0]
        if line.endswith(" E"):
            status_map[name] = TestStatus.ERROR
        if line.endswith(" F"):
            status_map[name] = TestStatus.FAILED
        if line.endswith(" ok"):
            status_map[name] = TestStatus.PASSED
    return status_map


# ---------------------------------------------------------------------------------------------
# Registry.

PARSERS: dict[str, Parser] = {
    "pytest": parse_pytest,
    "pytest_options": parse_pytest_options,
    "pytest_v2": parse_pytest_v2,
    "django": parse_django,
    "sympy": parse_sympy,
    "seaborn": parse_seaborn,
    "matplotlib": parse_matplotlib,
}

# The parser the harness uses for each SWE-bench repository (MAP_REPO_TO_PARSER_PY), by name here.
PARSER_FOR_REPO: dict[str, str] = {
    "astropy/astropy": "pytest_v2",
    "django/django": "django",
    "marshmallow-code/marshmallow": "pytest",
    "matplotlib/matplotlib": "matplotlib",
    "mwaskom/seaborn": "seaborn",
    "pallets/flask": "pytest",
    "psf/requests": "pytest_options",
    "pvlib/pvlib-python": "pytest",
    "pydata/xarray": "pytest",
    "pydicom/pydicom": "pytest_options",
    "pylint-dev/astroid": "pytest",
    "pylint-dev/pylint": "pytest_options",
    "pytest-dev/pytest": "pytest",
    "pyvista/pyvista": "pytest",
    "scikit-learn/scikit-learn": "pytest_v2",
    "sqlfluff/sqlfluff": "pytest",
    "sphinx-doc/sphinx": "pytest_v2",
    "sympy/sympy": "sympy",
}


def get_parser(name: str) -> Parser:
    """The parser called `name`; ValueError naming the known ones otherwise."""
    try:
        return PARSERS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(PARSERS))
        raise ValueError(f"Task.log_parser: unknown log parser {name!r}; known: {known}") from None
