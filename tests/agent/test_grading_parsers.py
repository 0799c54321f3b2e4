"""Log parsers against hand-written logs in the real formats (tests/agent/fixtures/logs)."""

from pathlib import Path

import pytest

from agent.grading import PARSER_FOR_REPO, PARSERS, TestStatus, get_parser
from agent.grading.parsers import parse_django, parse_matplotlib, parse_pytest, parse_seaborn, parse_sympy

LOGS = Path(__file__).parent / "fixtures" / "logs"
P, F, S, E, XF, XP = (TestStatus.PASSED, TestStatus.FAILED, TestStatus.SKIPPED, TestStatus.ERROR,
                      TestStatus.XFAIL, TestStatus.XPASS)


def parse(name: str, parser: str) -> dict[str, TestStatus]:
    return PARSERS[parser]((LOGS / name).read_text())


def test_pytest_summary_keys_are_the_harness_keys_plus_extras():
    m = parse("pytest_ra.log", "pytest")
    demo = "tests/test_demo.py::"
    # The harness's keys: the first token after the status, so spaced ids are cut at the space.
    assert m[demo + "test_ok"] == P
    assert m[demo + "test_param[a"] == P
    assert m[demo + "test_param[[1,"] == P
    assert m[demo + "test_param[plain]"] == P
    assert m[demo + "TestGroup::test_method[1]"] == P
    assert m[demo + "test_xfail"] == XF
    assert m[demo + "test_error"] == E
    assert m["tests/test_broken.py"] == E  # collection error: the module is the key
    assert m[demo + "test_fail"] == F  # "FAILED x - message": the message is not part of the name
    assert m[demo + "test_param[x"] == F
    assert m[demo + "test_xpass_strict"] == F
    assert m[demo + "TestGroup::test_method[2]"] == F
    # Extras: full ids with spaces, and XPASS (absent from the harness's map, a failure there and here).
    assert m[demo + "test_param[a b]"] == P
    assert m[demo + "test_param[[1, 2]]"] == P
    assert m[demo + "test_param[x - y]"] == F
    assert m[demo + "test_xpass"] == XP
    # "SKIPPED [1] file:line: reason" names no test.
    assert not any(k.startswith("[") or k.endswith("test_skipped") for k in m)
    # The harness also reads "____ ERROR collecting ..." section headers as a test named by the
    # underscores; harmless (no dataset lists such a name) and kept for exactness.
    assert m["____________________"] == E
    assert "connecting" not in " ".join(m)  # captured output is not a result


def test_pytest_verbose_lines():
    m = parse("pytest_verbose.log", "pytest")
    io = "tests/test_io.py::"
    assert m[io + "test_read_csv"] == P
    assert m[io + "test_read_csv_bad_header"] == F
    assert m[io + "test_encoding[utf-8]"] == P
    assert m[io + "test_network"] == S  # "SKIPPED (needs network)"
    assert m[io + "test_old_api"] == XF
    assert m[io + "TestWriter::test_flush"] == E
    # The harness cannot read a verbose line whose id has a space; the full id is an extra.
    assert m[io + "test_encoding[latin 1]"] == P
    assert io + "test_encoding[latin" not in m


def test_extras_never_override_a_harness_key():
    log = "PASSED tests/x.py::test_a\nXPASS tests/x.py::test_a - flaky\nXPASS tests/x.py::test_b - r\n"
    m = parse_pytest(log)
    assert m["tests/x.py::test_a"] == P
    assert m["tests/x.py::test_b"] == XP


def test_pytest_options_normalises_path_parameters():
    m = parse("pytest_options.log", "pytest_options")
    assert m["tests/test_self.py::TestRunTC::test_version"] == P
    assert m["tests/test_self.py::TestRunTC::test_output_file_valid_path[/output.txt]"] == P
    assert m["tests/test_self.py::test_glob[/testbed/tests/*.py]"] == P  # globs are kept whole
    assert m["tests/test_self.py::test_url[//example.com/a/b]"] == P  # so are "//" URLs
    assert m["tests/test_self.py::test_rcfile[/pylintrc]"] == F
    assert not any("pytest-of-root" in k for k in m)


def test_pytest_v2_strips_colour_codes():
    m = parse("pytest_v2_color.log", "pytest_v2")
    q = "astropy/units/tests/test_quantity.py::"
    assert m[q + "test_quantity_creation"] == P
    assert m[q + "test_unit_conversion"] == F
    assert m[q + "test_repr[unit"] == P and m[q + "test_repr[unit 0]"] == P
    # The plain parser reads none of these lines: they start with an escape sequence.
    assert q + "test_quantity_creation" not in parse("pytest_v2_color.log", "pytest")


def test_django_classic_format():
    m = parse("django_classic.log", "django")
    c = "(queries.tests.QuerySetTests)"
    assert m[f"test_basic {c}"] == P
    assert m["Regression test for #123: filtering across a reverse relation."] == P  # docstring line
    assert f"test_ticket_123 {c}" not in m
    assert m[f"test_fails {c}"] == F
    assert m[f"test_errors {c}"] == E
    assert m[f"test_skipped {c}"] == S
    assert m[f"test_prints {c}"] == P  # "... <output>" then "ok" on its own line
    assert m["--version is equivalent to version"] == P
    assert f"test_expected {c}" not in m  # "expected failure" is not read by the harness
    # "FAIL: name (...)" / "ERROR: name (...)" headers are keyed by the first word, as in the harness.
    assert m["test_fails"] == F and m["test_errors"] == E
    assert not any(k.startswith("Applying") for k in m)  # migration "... OK" lines are not tests


def test_django_py311_format():
    m = parse("django_py311.log", "django")
    d = "utils_tests.test_dateparse"
    assert m[f"test_parse_date ({d}.DateParseTests.test_parse_date)"] == P
    assert m["parse_datetime() accepts a time zone offset."] == P
    assert m[f"test_parse_duration ({d}.DurationParseTests.test_parse_duration)"] == F
    # A result line interrupted by Django's own message.
    assert m["test_check_command (check_framework.tests.CheckCommandTests.test_check_command)"] == P
    assert m[f"test_unsupported ({d}.DateParseTests.test_unsupported)"] == S


def test_sympy():
    m = parse("sympy.log", "sympy")
    assert m == {
        "test__aresame": P,
        "test_structure": P,
        "test_equality": F,
        "test_printmethod": P,
        "test_latex_basic": E,
        # failure headers, keyed path.py:name
        "sympy/printing/tests/test_latex.py:test_latex_basic": F,
        "sympy/core/tests/test_basic.py:test_equality": F,
        # The last test of each file ends its line with [OK]/[FAIL] and is not read (as in the harness).
    }


def test_seaborn_reads_only_passed_and_failed():
    m = parse("seaborn.log", "seaborn")
    assert m == {
        "tests/test_core.py::TestSemanticMapping::test_call_lookup": P,
        "tests/test_core.py::TestHueMapping::test_init_from_map[muted]": P,
        "tests/test_core.py::TestVectorPlotter::test_long_df": F,
        "tests/test_core.py::test_infer_orient": P,
    }


def test_matplotlib_quirks():
    m = parse("matplotlib.log", "matplotlib")
    t = "lib/matplotlib/tests/test_backend_bases.py::"
    assert m[t + "test_toolbar_zoompan[1]"] == P  # MouseButton.LEFT -> 1
    assert m[t + "test_interactive_pan[3-None]"] == F  # MouseButton.RIGHT -> 3, " - msg" dropped
    assert m[t + "test_draw[svg]"] == P
    assert m["[1]"] == S  # the old reader keys "SKIPPED [1] ..." by "[1]"


def test_garbage_and_empty_logs_parse_to_nothing():
    junk = "Traceback (most recent call last):\n  File 'x.py', line 1\nSyntaxError: invalid syntax\n"
    for name, parser in PARSERS.items():
        assert parser("") == {}, name
        assert parser(junk) == {}, name


def test_registry():
    assert set(PARSERS) >= {"pytest", "pytest_options", "pytest_v2", "django", "sympy", "seaborn", "matplotlib"}
    assert set(PARSER_FOR_REPO.values()) <= set(PARSERS)
    assert get_parser("django") is parse_django
    with pytest.raises(ValueError, match="Task.log_parser.*'nope'.*known: django"):
        get_parser("nope")
    assert PARSERS["sympy"] is parse_sympy and PARSERS["seaborn"] is parse_seaborn
    assert PARSERS["matplotlib"] is parse_matplotlib
