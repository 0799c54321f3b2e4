"""A real SWE-bench-style instance, graded end to end: more-itertools 11.0.2 from PyPI under git, the
upstream fix of issue #1152 (PR #1153, released in 11.1.0) as the gold patch, its real test as
FAIL_TO_PASS and the other 570 tests of tests/test_more.py (less its five slowest, unrelated ones) as
PASS_TO_PASS.

The fixture (tests/agent/fixtures/real/: the repository at base as a tarball, and task.json) is
built by scripts/make_real_task.py. Graded twice: in a LocalWorkspace with this interpreter (the
venv's pytest), and in ns sandboxes on the `host` image with the task's own command (Debian's
python3 and pytest 7). Gold and no-patch are graded concurrently (a run takes ~1.5 s of one core).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from agent.grading import GradeReport, grade, patch_paths
from agent.workspace import LocalWorkspace
from runtime.records import Task

FIXTURES = Path(__file__).parent / "fixtures" / "real"
F2P = ["tests/test_more.py::NumericRangeTests::test_empty_reversed"]
TIMEOUT_S = 300
# Keep the outer pytest's options out of the graded run.
ENV = {"PYTEST_ADDOPTS": ""}


def load_task() -> Task:
    return Task.from_dict(json.loads((FIXTURES / "task.json").read_text()))


def extract(task: Task, dest: Path) -> Path:
    """The repository at `task.base_commit`, fresh, under `dest`."""
    with tarfile.open(FIXTURES / task.metadata["fixture"]) as tar:
        tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    repo = dest / task.metadata["repo_dir"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
    assert head.stdout.strip() == task.base_commit
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True)
    assert status.stdout == ""
    return repo


async def grade_both(task: Task, gold_ws, empty_ws) -> tuple[GradeReport, GradeReport]:
    out: dict[str, GradeReport] = {}

    async def one(key: str, patch: str, ws) -> None:
        out[key] = await grade(task, patch, ws, timeout_s=TIMEOUT_S, allow_empty_patch=True, env=ENV)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "gold", task.gold_patch, gold_ws)
        nursery.start_soon(one, "empty", "", empty_ws)
    return out["gold"], out["empty"]


def check(task: Task, gold: GradeReport, empty: GradeReport) -> None:
    assert gold.resolved, gold.to_dict()
    assert gold.patch_applied and gold.apply_command == "git apply --verbose"
    assert gold.tests == {name: "PASSED" for name in [*task.FAIL_TO_PASS, *task.PASS_TO_PASS]}, gold.to_dict()
    assert gold.test_exit_code == 0

    assert empty.error is None and not empty.resolved, empty.to_dict()
    assert empty.resolution.value == "RESOLVED_NO"
    assert empty.tests == {**{name: "FAILED" for name in task.FAIL_TO_PASS},
                           **{name: "PASSED" for name in task.PASS_TO_PASS}}, empty.to_dict()
    assert "IndexError: numeric range object index out of range" in empty.log
    assert empty.test_exit_code == 1


def test_fixture_is_a_real_swebench_task():
    task = load_task()
    assert task.FAIL_TO_PASS == F2P
    assert len(task.PASS_TO_PASS) == 570 and not set(F2P) & set(task.PASS_TO_PASS)
    assert all(name.startswith("tests/test_more.py::") for name in task.PASS_TO_PASS)
    assert patch_paths(task.gold_patch) == ["more_itertools/more.py"]
    assert patch_paths(task.test_patch) == ["tests/test_more.py"]
    assert task.image == "host" and task.log_parser == "pytest"
    assert task.metadata["project"] == "more-itertools" and task.metadata["license"] == "MIT"
    assert (task.metadata["base_version"], task.metadata["fixed_version"]) == ("11.0.2", "11.1.0")
    assert (FIXTURES / task.metadata["fixture"]).stat().st_size < 1 << 20


async def test_real_task_graded_locally(tmp_path):
    task = load_task()
    # The venv's interpreter and pytest in place of the sandbox's python3.
    command, n = re.subn(r"\bpython3(?= -m pytest)", shlex.quote(sys.executable), task.test_command)
    assert n == 1
    local = replace(task, test_command=command)
    gold_ws = LocalWorkspace(extract(task, tmp_path / "gold"))
    empty_ws = LocalWorkspace(extract(task, tmp_path / "empty"))
    gold, empty = await grade_both(local, gold_ws, empty_ws)
    check(task, gold, empty)
    # The patch the grader applied is the model's diff, exactly.
    assert await gold_ws.diff(task.base_commit) == task.gold_patch + task.test_patch


@pytest.mark.skipif(os.geteuid() != 0, reason="ns sandboxes need root (user, mount and pid namespaces)")
async def test_real_task_graded_in_ns_sandboxes(tmp_path):
    from sandboxd.client import open_local

    task = load_task()
    repo = extract(task, tmp_path)
    async with open_local("ns") as node:
        async with node.open(task.image, repo=str(repo)) as gold_sb, node.open(task.image, repo=str(repo)) as empty_sb:
            head = await gold_sb.exec(["git", "rev-parse", "HEAD"], timeout_s=60)
            assert head.output.decode().strip() == task.base_commit
            python = await gold_sb.exec(["python3", "-c", "import sys, pytest; print(sys.executable)"], timeout_s=60)
            assert python.exit_code == 0, python.output
            gold, empty = await grade_both(task, gold_sb, empty_sb)
    check(task, gold, empty)
