"""The apply chain's three-way step: a patch whose context drifted (made against an older commit of
the repository) fails `git apply` but applies with `--3way`, and grading goes on from there."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from agent.grading import APPLY_COMMANDS, grade
from agent.workspace import LocalWorkspace
from runtime.records import Task

ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def git(repo, *args, stdin=None) -> str:
    return subprocess.run(["git", *args], cwd=repo, env=ENV, check=True, capture_output=True, text=True, input=stdin).stdout


async def test_drifted_patch_applies_with_3way(tmp_path):
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    lines = [f"X{i} = {i}" for i in range(12)]
    (repo / "calc.py").write_text("\n".join(lines[:6] + ["def add(a, b):", "    return a - b"] + lines[6:]) + "\n")
    (repo / "tests" / "test_calc.py").write_text("def test_mul():\n    assert 2 * 3 == 6\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "old")
    # The model's patch, made against the old commit.
    (repo / "calc.py").write_text((repo / "calc.py").read_text().replace("a - b", "a + b"))
    patch = git(repo, "diff")
    git(repo, "checkout", "-q", "--", "calc.py")
    # The base commit changed the lines right next to the hunk: the patch's context no longer matches.
    text = (repo / "calc.py").read_text().replace("X4 = 4", "X4 = 44").replace("X8 = 8", "X8 = 88")
    (repo / "calc.py").write_text(text)
    git(repo, "commit", "-qam", "base")
    base = git(repo, "rev-parse", "HEAD").strip()
    test_patch = ("diff --git a/tests/test_calc.py b/tests/test_calc.py\n--- a/tests/test_calc.py\n+++ b/tests/test_calc.py\n"
                  "@@ -1,2 +1,7 @@\n def test_mul():\n     assert 2 * 3 == 6\n+\n+\n+def test_add():\n+    from calc import add\n"
                  "+    assert add(2, 3) == 5\n")
    command = f"PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 {shlex.quote(sys.executable)} -m pytest -rA -p no:cacheprovider tests/test_calc.py"
    task = Task(id="drift-1", repo=str(repo), base_commit=base, problem_statement="add subtracts", image="host",
                test_patch=test_patch, FAIL_TO_PASS=["tests/test_calc.py::test_add"],
                PASS_TO_PASS=["tests/test_calc.py::test_mul"], test_command=command, log_parser="pytest")
    plain = subprocess.run(["git", "apply", "--check", "-"], cwd=repo, input=patch, text=True, capture_output=True)
    assert plain.returncode != 0  # the drift is real
    report = await grade(task, patch, LocalWorkspace(repo), timeout_s=120)
    assert report.apply_command == "git apply --verbose --3way" == APPLY_COMMANDS[1]
    assert report.resolved, report.to_dict()
    assert "X4 = 44" in (repo / "calc.py").read_text()  # the base's own change survived the merge
