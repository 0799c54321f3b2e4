"""The SWE-bench resolution rule and the reading of eval logs, on hand-made inputs."""

from hypothesis import given
from hypothesis import strategies as st

from agent.grading import GradeError, ResolutionStatus, TestStatus, grade_log, tests_report
from agent.grading.rules import END_TEST_OUTPUT, START_TEST_OUTPUT, TESTS_TIMEOUT, f2p_passed, p2p_passed

P, F, S, E, XF, XP = (TestStatus.PASSED, TestStatus.FAILED, TestStatus.SKIPPED, TestStatus.ERROR,
                      TestStatus.XFAIL, TestStatus.XPASS)


def resolution(status_map, f2p, p2p):
    return tests_report(status_map, f2p, p2p).resolution


def test_everything_passing_is_resolved_full():
    report = tests_report({"a": P, "b": P, "c": P}, ["a", "b"], ["c"])
    assert report.resolution is ResolutionStatus.FULL and report.resolved
    assert report.to_dict() == {"FAIL_TO_PASS": {"success": ["a", "b"], "failure": []},
                                "PASS_TO_PASS": {"success": ["c"], "failure": []}}


def test_some_fail_to_pass_is_partial():
    report = tests_report({"a": P, "b": F, "c": P}, ["a", "b"], ["c"])
    assert report.resolution is ResolutionStatus.PARTIAL and not report.resolved
    assert report.f2p_failure == ["b"] and report.f2p_rate == 0.5


def test_a_broken_pass_to_pass_is_no():
    assert resolution({"a": P, "c": F}, ["a"], ["c"]) is ResolutionStatus.NO
    assert resolution({"a": P, "b": F, "c": E}, ["a", "b"], ["c"]) is ResolutionStatus.NO  # not PARTIAL


def test_no_fail_to_pass_passing_is_no():
    assert resolution({"a": F, "c": P}, ["a"], ["c"]) is ResolutionStatus.NO


def test_status_semantics_of_the_harness():
    # FAIL_TO_PASS: PASSED or XFAIL; SKIPPED, ERROR, XPASS and absence fail.
    for status, ok in ((P, True), (XF, True), (S, False), (F, False), (E, False), (XP, False)):
        assert f2p_passed("t", {"t": status}) is ok, status
        assert resolution({"t": status}, ["t"], []) is (ResolutionStatus.FULL if ok else ResolutionStatus.NO)
    assert not f2p_passed("t", {})
    # PASS_TO_PASS: also SKIPPED.
    for status, ok in ((P, True), (XF, True), (S, True), (F, False), (E, False), (XP, False)):
        assert p2p_passed("t", {"t": status}) is ok, status
    assert resolution({"a": P}, ["a"], ["missing"]) is ResolutionStatus.NO
    # Plain strings (a harness report's values) work the same.
    assert f2p_passed("t", {"t": "PASSED"}) and not f2p_passed("t", {"t": "FAILED"})


def test_empty_lists_follow_the_harness():
    assert resolution({}, [], []) is ResolutionStatus.FULL  # rate 1 when there is nothing to check


statuses = st.sampled_from(list(TestStatus))
names = st.lists(st.sampled_from("abcdefgh"), unique=True, max_size=6)


@given(st.dictionaries(st.sampled_from("abcdefghij"), statuses), names, names)
def test_report_partitions_every_listed_test(status_map, f2p, p2p):
    report = tests_report(status_map, f2p, p2p)
    assert sorted(report.f2p_success + report.f2p_failure) == sorted(f2p)
    assert sorted(report.p2p_success + report.p2p_failure) == sorted(p2p)
    full = all(status_map.get(t) in (P, XF) for t in f2p) and all(status_map.get(t) in (P, XF, S) for t in p2p)
    assert report.resolved is full


def log(body: str, *, start=True, end=True, exit_code=0) -> str:
    parts = ["+ git apply -v -", "Checking patch tests/test_x.py..."]
    if start:
        parts.append(START_TEST_OUTPUT)
    parts.append(body)
    if end:
        parts.append(END_TEST_OUTPUT)
    parts.append(f">>>>> Test Exit Code: {exit_code}")
    return "\n".join(parts) + "\n"


def test_grade_log_resolves_from_the_text_between_the_markers():
    verdict = grade_log(log("PASSED tests/x.py::test_a\nPASSED tests/x.py::test_b"), "pytest",
                        ["tests/x.py::test_a"], ["tests/x.py::test_b"])
    assert verdict.resolved and verdict.error is None and verdict.test_exit_code == 0


def test_results_outside_the_markers_do_not_count():
    text = "PASSED tests/x.py::test_a\n" + log("FAILED tests/x.py::test_a - boom", exit_code=1) + \
        "PASSED tests/x.py::test_a\n"
    verdict = grade_log(text, "pytest", ["tests/x.py::test_a"], [])
    assert not verdict.resolved and verdict.report.f2p_failure == ["tests/x.py::test_a"]
    assert verdict.test_exit_code == 1


def test_missing_markers_are_an_error():
    for text in (log("PASSED tests/x.py::test_a", start=False), log("PASSED tests/x.py::test_a", end=False), ""):
        verdict = grade_log(text, "pytest", ["tests/x.py::test_a"], [])
        assert verdict.error is GradeError.MARKERS_MISSING and not verdict.resolved
        assert verdict.resolution is ResolutionStatus.NO


def test_a_harness_flag_anywhere_is_an_error():
    text = log("PASSED tests/x.py::test_a") + TESTS_TIMEOUT + "\n"
    verdict = grade_log(text, "pytest", ["tests/x.py::test_a"], [])
    assert verdict.error is GradeError.HARNESS_FLAG and not verdict.resolved


def test_an_unparsable_log_is_an_error_not_a_failure():
    verdict = grade_log(log("ImportError while loading conftest '/testbed/conftest.py'."), "pytest", ["a"], [])
    assert verdict.error is GradeError.LOG_UNPARSABLE and not verdict.resolved
    assert "no test result" in verdict.reason


def test_grade_log_takes_a_parser_function():
    verdict = grade_log(log("whatever"), lambda text: {"a": P}, ["a"], [])
    assert verdict.resolved


def test_infra_errors_are_marked():
    assert GradeError.WORKSPACE_ERROR.infra and GradeError.TEST_PATCH_FAILED.infra and GradeError.RESET_FAILED.infra
    assert not GradeError.PATCH_FAILED.infra and not GradeError.TIMEOUT.infra
