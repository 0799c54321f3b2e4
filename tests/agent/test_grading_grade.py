"""grade() end to end with LocalWorkspace on a tiny repository (add() subtracts)."""

import dataclasses
import difflib
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.grading import APPLY_COMMANDS, GradeError, ResolutionStatus, eval_script, grade, patch_paths
from agent.workspace import LocalWorkspace
from runtime.records import Task

CALC = "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n"
CALC_FIXED = CALC.replace("a - b", "a + b")
TEST_CALC = ("from pkg.calc import add, mul\n\n\ndef test_mul():\n    assert mul(2, 3) == 6\n\n\n"
             "def test_zero():\n    assert add(0, 0) == 0\n")
TEST_CALC_NEW = TEST_CALC + "\n\ndef test_add():\n    assert add(2, 3) == 5\n"
TEST_EXTRA = "from pkg.calc import add\n\n\ndef test_add_negative():\n    assert add(-2, -3) == -5\n"
PYTEST = f"PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 {shlex.quote(sys.executable)} -m pytest -rA -p no:cacheprovider"


def udiff(path: str, old: str | None, new: str | None) -> str:
    a = old.splitlines(keepends=True) if old is not None else []
    b = new.splitlines(keepends=True) if new is not None else []
    head = f"diff --git a/{path} b/{path}\n"
    if old is None:
        head += "new file mode 100644\n"
    elif new is None:
        head += "deleted file mode 100644\n"
    return head + "".join(difflib.unified_diff(a, b, "a/" + path if old is not None else "/dev/null",
                                               "b/" + path if new is not None else "/dev/null"))


GOLD = udiff("pkg/calc.py", CALC, CALC_FIXED)
TEST_PATCH = udiff("tests/test_calc.py", TEST_CALC, TEST_CALC_NEW) + udiff("tests/test_extra.py", None, TEST_EXTRA)
F2P = ["tests/test_calc.py::test_add", "tests/test_extra.py::test_add_negative"]
P2P = ["tests/test_calc.py::test_mul", "tests/test_calc.py::test_zero"]


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """The repository at its base commit; each test grades in a copy."""
    repo = tmp_path_factory.mktemp("grading") / "repo"
    files = {"pkg/__init__.py": "", "pkg/calc.py": CALC, "tests/test_calc.py": TEST_CALC,
             ".gitignore": "__pycache__/\n"}
    for path, text in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "base"]):
        subprocess.run(git + args, cwd=repo, check=True)
    base = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
    return repo, base.stdout.strip()


@pytest.fixture
def make(origin, tmp_path):
    """make(**task fields) -> (task, fresh LocalWorkspace at the base commit)."""
    repo, base = origin
    counter = iter(range(100))

    def _make(**overrides):
        fields = dict(id="calc-1", repo=str(repo), base_commit=base, problem_statement="add() subtracts",
                      image="host", test_patch=TEST_PATCH, FAIL_TO_PASS=F2P, PASS_TO_PASS=P2P,
                      test_command=f"{PYTEST} tests/test_calc.py tests/test_extra.py", log_parser="pytest",
                      gold_patch=GOLD)
        fields.update(overrides)
        work = tmp_path / f"work{next(counter)}"
        shutil.copytree(repo, work, symlinks=True)
        return Task(**fields), LocalWorkspace(work)

    return _make


async def test_gold_patch_resolves(make):
    task, ws = make()
    report = await grade(task, GOLD, ws, timeout_s=60)
    assert report.resolved and report.error is None
    assert report.resolution is ResolutionStatus.FULL
    assert report.apply_command == APPLY_COMMANDS[0] and report.patch_applied
    assert report.tests == {name: "PASSED" for name in F2P + P2P}
    assert report.test_exit_code == 0
    data = json.loads(json.dumps(report.to_dict()))
    assert data["resolved"] is True and data["FAIL_TO_PASS"]["success"] == F2P
    assert ">>>>> End Test Output" in data["log_tail"]


async def test_empty_patch_is_an_error_and_never_resolved(make):
    for patch in ("", "\n  \n"):
        task, ws = make()
        report = await grade(task, patch, ws, timeout_s=60)
        assert report.error is GradeError.EMPTY_PATCH and not report.resolved
        assert report.tests_s == 0.0  # nothing ran


async def test_empty_patch_run_shows_the_base_state(make):
    task, ws = make()
    report = await grade(task, "", ws, timeout_s=60, allow_empty_patch=True)
    assert report.error is None and not report.resolved
    assert report.report.f2p_failure == F2P and report.report.p2p_success == P2P
    assert report.resolution is ResolutionStatus.NO and not report.patch_applied


@pytest.mark.parametrize("patch", [
    "this is not a patch\n",
    udiff("pkg/nope.py", "x = 1\n", "x = 2\n"),  # a file that does not exist
    "diff --git a/logo.png b/logo.png\nindex 1111111..2222222 100644\nBinary files a/logo.png and b/logo.png differ\n",
    GOLD.replace("-    return a - b", "-    return a ** b").replace(" def add(a, b):", " def sub(a, b):")
        .replace("\n \n \n def mul(a, b):", "\n \n \n def div(a, b):"),  # no line matches, even fuzzily
], ids=["garbage", "missing-file", "binary-without-data", "wrong-context"])
async def test_patches_that_do_not_apply(make, patch):
    task, ws = make()
    report = await grade(task, patch, ws, timeout_s=60)
    assert report.error is GradeError.PATCH_FAILED and not report.resolved and not report.patch_applied
    assert report.report is None and report.tests == {} and report.tests_s == 0.0
    assert "no apply command accepted the patch" in report.reason


async def test_a_fuzzy_patch_falls_through_to_patch(make):
    task, ws = make()
    fuzzy = GOLD.replace(" def add(a, b):", " def add(x, y):")  # one context line is off
    report = await grade(task, fuzzy, ws, timeout_s=60)
    assert report.apply_command == "patch --batch --fuzz=5 -p1 -i"
    assert report.resolved
    assert not list(Path(ws.workdir).rglob("*.rej"))  # the failed --reject attempt was undone


async def test_a_patch_touching_the_test_files_cannot_change_the_outcome(make):
    cheat_tests = (udiff("tests/test_calc.py", TEST_CALC, TEST_CALC + "\n\ndef test_add():\n    pass\n")
                   + udiff("tests/test_extra.py", None, "def test_add_negative():\n    pass\n"))
    task, ws = make()
    baseline = await grade(task, "", ws, timeout_s=60, allow_empty_patch=True)
    task, ws = make()
    cheat = await grade(task, cheat_tests, ws, timeout_s=60)
    assert cheat.patch_applied and not cheat.resolved
    assert cheat.tests == baseline.tests  # the test patch won
    task, ws = make()
    gold_and_delete = GOLD + udiff("tests/test_calc.py", TEST_CALC, None)
    report = await grade(task, gold_and_delete, ws, timeout_s=60)
    assert report.resolved  # the deleted test file was restored before the test patch
    task, ws = make()
    gold = await grade(task, GOLD + cheat_tests, ws, timeout_s=60)
    assert gold.resolved and gold.tests == {name: "PASSED" for name in F2P + P2P}


async def test_hanging_tests_time_out(make):
    hang = TEST_PATCH + udiff("tests/test_hang.py", None, "import time\n\n\ndef test_hang():\n    time.sleep(600)\n")
    task, ws = make(test_patch=hang, FAIL_TO_PASS=F2P + ["tests/test_hang.py::test_hang"],
                    test_command=f"{PYTEST} tests/test_calc.py tests/test_extra.py tests/test_hang.py")
    report = await grade(task, GOLD, ws, timeout_s=3)
    assert report.error is GradeError.TIMEOUT and not report.resolved
    assert report.tests_s < 15
    assert ">>>>> Start Test Output" in report.log


@pytest.mark.parametrize("command", ["exit 0", "kill -9 $$", f"{PYTEST} tests/test_calc.py; exit 0"])
async def test_missing_markers_are_an_error(make, command):
    task, ws = make(test_command=command)
    report = await grade(task, GOLD, ws, timeout_s=60)
    assert report.error is GradeError.MARKERS_MISSING and not report.resolved
    assert "End Test Output" in report.reason


async def test_a_log_without_results_is_an_error(make):
    task, ws = make(test_command="echo 'nothing to see'")
    report = await grade(task, GOLD, ws, timeout_s=60)
    assert report.error is GradeError.LOG_UNPARSABLE and not report.resolved


async def test_a_missing_test_file_is_a_clear_error(make):
    task, ws = make(test_command=f"{PYTEST} tests/test_missing.py")
    report = await grade(task, GOLD, ws, timeout_s=60)
    assert report.error is GradeError.LOG_UNPARSABLE and not report.resolved
    assert "file or directory not found" in report.log


async def test_a_test_patch_that_does_not_apply_is_an_infra_error(make):
    broken = TEST_PATCH.replace(" def test_zero():", " def test_zero_renamed():")
    task, ws = make(test_patch=broken)
    report = await grade(task, GOLD, ws, timeout_s=60)
    assert report.error is GradeError.TEST_PATCH_FAILED and not report.resolved
    assert report.to_dict()["infra_error"] is True


async def test_a_gigantic_log_is_capped_and_still_graded(make):
    loud = TEST_PATCH + udiff("tests/test_loud.py", None, "def test_loud():\n    print('x' * 3_000_000)\n")
    task, ws = make(test_patch=loud, PASS_TO_PASS=P2P,
                    test_command=f"{PYTEST} tests/test_calc.py tests/test_extra.py tests/test_loud.py")
    report = await grade(task, GOLD, ws, timeout_s=60, max_log_bytes=256 << 10)
    assert report.log_truncated and len(report.log) < 300_000
    assert report.resolved  # the markers and the summary survive in the kept head and tail


class BrokenWorkspace(LocalWorkspace):
    async def exec(self, *args, **kwargs):
        raise OSError("sandbox node went away")


async def test_a_failing_workspace_is_reported_not_raised(make):
    task, ws = make()
    report = await grade(task, GOLD, BrokenWorkspace(ws.workdir), timeout_s=60)
    assert report.error is GradeError.WORKSPACE_ERROR and "sandbox node went away" in report.reason
    assert report.to_dict()["infra_error"] is True and not report.resolved


class RecordingWorkspace(LocalWorkspace):
    calls = 0

    async def exec(self, *args, **kwargs):
        RecordingWorkspace.calls += 1
        return await super().exec(*args, **kwargs)


async def test_bad_arguments_are_refused_before_any_work(make):
    task, ws = make()
    recorder = RecordingWorkspace(ws.workdir)
    with pytest.raises(ValueError, match="Task.log_parser"):
        await grade(dataclasses.replace(task, log_parser="junit"), GOLD, recorder, timeout_s=60)
    with pytest.raises(ValueError, match="timeout_s"):
        await grade(task, GOLD, recorder, timeout_s=0)
    with pytest.raises(TypeError, match="model_patch"):
        await grade(task, None, recorder, timeout_s=60)
    assert RecordingWorkspace.calls == 0


async def test_harness_eval_commands_run_before_the_tests_in_the_same_shell(make):
    command = f'test "${{TOY_FLAG:-}}" = on && {PYTEST} tests/test_calc.py tests/test_extra.py'
    task, ws = make(test_command=command, metadata={"harness": {"eval_commands": ["export TOY_FLAG=on"]}})
    assert (await grade(task, GOLD, ws, timeout_s=60)).resolved
    task, ws = make(test_command=command)  # without them the command refuses to run the tests
    assert (await grade(task, GOLD, ws, timeout_s=60)).error is GradeError.LOG_UNPARSABLE
    task, ws = make(metadata={"harness": {"eval_commands": "export TOY_FLAG=on"}})
    with pytest.raises(ValueError, match="eval_commands"):
        await grade(task, GOLD, ws, timeout_s=60)


def test_eval_script_layout(origin):
    repo, base = origin
    task = Task(id="t", repo=str(repo), base_commit=base, problem_statement="", image="host",
                test_patch=TEST_PATCH, FAIL_TO_PASS=F2P, PASS_TO_PASS=P2P, test_command="run-the-tests",
                log_parser="pytest")
    script = eval_script(task)
    assert script == eval_script(task)  # pure
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash" and f"base={base}" in lines
    assert "for path in tests/test_calc.py tests/test_extra.py; do" in lines
    order = [lines.index(x) for x in ("git apply --verbose .git/swe_dapo/test.patch || { echo '>>>>> Test Patch "
                                      "Apply Failed'; exit 1; }", "echo '>>>>> Start Test Output'", "run-the-tests",
                                      "echo '>>>>> End Test Output'")]
    assert order == sorted(order)
    assert "conda" not in script  # no harness metadata: no environment set-up
    harness = dataclasses.replace(task, metadata={"harness": {"eval_commands": ["export LANG=en_US.UTF-8"]}})
    lines = eval_script(harness).splitlines()
    assert lines.index("export LANG=en_US.UTF-8") < lines.index("echo '>>>>> Start Test Output'")
    assert any("conda activate testbed" in line for line in lines)


def test_patch_paths():
    assert patch_paths(TEST_PATCH) == ["tests/test_calc.py", "tests/test_extra.py"]
    rename = ("diff --git a/old name.py b/new.py\nsimilarity index 90%\nrename from old name.py\nrename to new.py\n"
              "--- a/old name.py\n+++ b/new.py\n@@ -1,2 +1,2 @@\n--- not a header\n+++ nor this\n")
    assert patch_paths(rename) == ["old name.py", "new.py"]
    quoted = 'diff --git "a/caf\\303\\251.py" "b/caf\\303\\251.py"\n--- "a/caf\\303\\251.py"\n+++ "b/caf\\303\\251.py"\n'
    assert patch_paths(quoted) == ["café.py"]
    plain = "--- pkg/calc.py.orig\t2024-01-01 10:00:00\n+++ pkg/calc.py\t2024-01-01 10:00:01\n@@ -1 +1 @@\n-a\n+b\n"
    assert patch_paths(plain) == ["pkg/calc.py.orig", "pkg/calc.py"]
    assert patch_paths("garbage") == []
