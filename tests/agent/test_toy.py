"""The toy suite: coverage, splits, issue text, determinism, git layout, and every task verified by grading."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
import trio

from agent.grading import GradeError, grade
from agent.toy import (
    BUG_KINDS,
    HELDOUT_TEMPLATES,
    LEVELS,
    TEMPLATES,
    TEST_COMMAND,
    TRAIN_TEMPLATES,
    generate_suite,
    test_ids,
)
from agent.toy.generate import render_task_files
from agent.toy.gitwrite import write_repo
from agent.workspace import LocalWorkspace
from runtime.records import Task

N_TRAIN = len(TRAIN_TEMPLATES) * len(BUG_KINDS)  # every (template, kind) pair once
N_HELDOUT = len(HELDOUT_TEMPLATES) * len(BUG_KINDS)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "suite"
    # The interpreter running these tests has pytest; a bare `python` on PATH may not.
    return out, generate_suite(0, N_TRAIN, N_HELDOUT, out, python=shlex.quote(sys.executable))


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def test_templates_and_kinds():
    assert len(TEMPLATES) >= 6 and len(BUG_KINDS) >= 8
    assert not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES)
    assert set(TRAIN_TEMPLATES) | set(HELDOUT_TEMPLATES) == set(TEMPLATES)
    for template in TEMPLATES.values():
        assert {site.kind for site in template.sites} == set(BUG_KINDS), template.name


def test_every_pair_of_a_split_is_covered_and_splits_share_no_template(suite):
    _, tasks = suite
    by_split = {"train": [t for t in tasks if t.split == "train"], "heldout": [t for t in tasks if t.split == "heldout"]}
    assert len(by_split["train"]) == N_TRAIN and len(by_split["heldout"]) == N_HELDOUT
    for split, names in (("train", TRAIN_TEMPLATES), ("heldout", HELDOUT_TEMPLATES)):
        pairs = {(t.metadata["template"], t.metadata["bug_kind"]) for t in by_split[split]}
        assert pairs == set(product(names, BUG_KINDS)), split
        assert {t.metadata["difficulty"] for t in by_split[split]} == set(LEVELS)
    train_templates = {t.metadata["template"] for t in by_split["train"]}
    heldout_templates = {t.metadata["template"] for t in by_split["heldout"]}
    assert not train_templates & heldout_templates


def test_task_records(suite):
    out, tasks = suite
    assert len({t.id for t in tasks}) == len(tasks)
    for task in tasks:
        assert task.image == "host" and task.log_parser == "pytest"
        assert Path(task.repo).is_absolute() and Path(task.repo).is_relative_to(out)
        assert task.test_command.startswith(TEST_COMMAND.format(python=shlex.quote(sys.executable)) + " tests/")
        assert task.FAIL_TO_PASS and task.PASS_TO_PASS and not set(task.FAIL_TO_PASS) & set(task.PASS_TO_PASS)
        assert task.gold_patch.startswith("diff --git a/") and task.test_patch.startswith("diff --git a/tests/")
    lines = (out / "tasks.jsonl").read_text().splitlines()
    assert [Task.from_dict(json.loads(line)) for line in lines] == tasks


def test_repositories_look_like_fresh_clones(suite):
    _, tasks = suite
    for task in tasks[:: max(1, len(tasks) // 6)]:
        repo = task.repo
        assert git(repo, "rev-parse", "HEAD") == task.base_commit
        assert git(repo, "rev-list", "--count", "HEAD") == "2"
        assert git(repo, "status", "--porcelain") == ""
        subprocess.run(["git", "fsck", "--strict", "--no-progress"], cwd=repo, check=True, capture_output=True)
        # The fixed module is in no commit, and the new tests are not in the repository.
        template, package = TEMPLATES[task.metadata["template"]], task.metadata["package"]
        module = task.metadata["buggy_file"].split("/", 1)[1]
        fixed = template.modules[module].replace("__PKG__", package)
        for commit in git(repo, "rev-list", "HEAD").split():
            assert git(repo, "show", f"{commit}:{task.metadata['buggy_file']}") + "\n" != fixed
        test_file = task.FAIL_TO_PASS[0].split("::")[0]
        name = task.FAIL_TO_PASS[0].split("::")[1].split("[")[0]
        assert f"def {name}(" not in (Path(repo) / test_file).read_text()


def test_issue_text_reveals_what_its_level_says(suite):
    _, tasks = suite
    for task in tasks:
        text, meta = task.problem_statement, task.metadata
        path, function = meta["buggy_file"], meta["buggy_function"]
        dotted, filename = path.removesuffix(".py").replace("/", "."), path.split("/")[-1]
        short = function.rsplit(".", 1)[-1]
        level = meta["difficulty"]
        if level == 1:
            assert f"`{path}`" in text and f"`{function}()`" in text, task.id
        else:
            assert path not in text and dotted not in text and filename not in text, task.id
        if level == 2:
            assert f"`{function}()`" in text, task.id
        if level == 3:
            assert not re.search(rf"\b{re.escape(short)}\(", text), task.id
        assert f"from {meta['package']} import" in text  # the snippet the user ran
        # Never the patch: no added line of the gold patch appears in the issue.
        for line in task.gold_patch.splitlines():
            if line.startswith("+") and not line.startswith("+++") and len(line[1:].strip()) > 6:
                assert line[1:].strip() not in text, (task.id, line)
        assert "diff --git" not in text and "FAIL_TO_PASS" not in text


def tree(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*"))
            if p.is_file() and p.name != "index"}


def test_same_seed_same_bytes(tmp_path):
    a = generate_suite(7, 5, 3, tmp_path / "a")
    b = generate_suite(7, 5, 3, tmp_path / "b")
    c = generate_suite(8, 5, 3, tmp_path / "c")

    def portable(task, root):
        data = task.to_dict()
        data["repo"] = str(Path(task.repo).relative_to(root))
        return data

    assert [portable(t, tmp_path / "a") for t in a] == [portable(t, tmp_path / "b") for t in b]
    for ta, tb in zip(a, b):
        assert tree(Path(ta.repo)) == tree(Path(tb.repo))
    assert [portable(t, tmp_path / "a") for t in a] != [portable(t, tmp_path / "c") for t in c]


def test_gitwrite_matches_the_git_command_line(tmp_path):
    commits = [("first", "2024-01-15T10:00:00+00:00", {"pkg/a.py": "x = 1\n", "README.md": "hi\n",
                                                         "pkg.py": "", "pkg/b/c.txt": "deep\n"}),
               ("second\n\nwith a body", "2024-02-01T16:30:00+00:00", {"tests/test_a.py": "def test(): pass\n",
                                                                       "pkg/a.py": "x = 2\n"})]
    head = write_repo(tmp_path / "direct", commits, author=("A U Thor", "a@example.invalid"))
    cli = tmp_path / "cli"
    cli.mkdir()
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_AUTHOR_NAME": "A U Thor", "GIT_AUTHOR_EMAIL": "a@example.invalid",
           "GIT_COMMITTER_NAME": "A U Thor", "GIT_COMMITTER_EMAIL": "a@example.invalid"}
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=cli, env=env, check=True)
    for message, date, files in commits:
        for path, text in files.items():
            (cli / path).parent.mkdir(parents=True, exist_ok=True)
            (cli / path).write_text(text)
        subprocess.run(["git", "add", "-A"], cwd=cli, env=env, check=True)
        subprocess.run(["git", "commit", "-q", "--cleanup=verbatim", "-m", message], cwd=cli, check=True,
                       env={**env, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date})
    assert head == git(cli, "rev-parse", "HEAD")
    direct = tmp_path / "direct"
    assert git(direct, "status", "--porcelain") == ""
    subprocess.run(["git", "fsck", "--strict", "--no-progress"], cwd=direct, check=True, capture_output=True)
    assert git(direct, "show", "HEAD~1:pkg/a.py") == "x = 1"


def test_test_ids_expand_parametrize_ids():
    source = ("import pytest\n\n@pytest.mark.parametrize('n', [1, 2], ids=['one', 'two'])\ndef test_a(n):\n    pass\n\n"
              "class TestB:\n    def test_c(self):\n        pass\n\ndef helper():\n    pass\n")
    assert test_ids("tests/t.py", source) == ["tests/t.py::test_a[one]", "tests/t.py::test_a[two]",
                                               "tests/t.py::TestB::test_c"]
    with pytest.raises(ValueError, match="explicit ids"):
        test_ids("t.py", "import pytest\n@pytest.mark.parametrize('n', [1])\ndef test_a(n):\n    pass\n")


def test_bad_arguments(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError, match="out_dir"):
        generate_suite(0, 1, 0, tmp_path / "full")
    with pytest.raises(ValueError, match="n_train"):
        generate_suite(0, -1, 0, tmp_path / "a")
    with pytest.raises(TypeError, match="seed"):
        generate_suite("0", 1, 0, tmp_path / "b")
    with pytest.raises(ValueError, match="levels"):
        generate_suite(0, 1, 0, tmp_path / "c", levels=(4,))
    with pytest.raises(ValueError, match="python"):
        generate_suite(0, 1, 0, tmp_path / "d", python=" ")
    [task] = generate_suite(0, 1, 0, tmp_path / "e", python="/opt/venv/bin/python3")
    assert task.test_command.startswith("PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 /opt/venv/bin/python3 -m pytest -rA")


async def test_issue_snippets_tell_the_truth(tmp_path):
    """Each issue's snippet, run on the buggy code, prints what the issue calls actual; on the fixed
    code, what it calls expected (every `backticked` part)."""
    limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))
    problems: list[str] = []

    async def run(template, site) -> None:
        package = template.packages[0]
        root = tmp_path / f"{template.name}-{site.kind}"
        for files in render_task_files(template, site, package)["commits"]:
            for path, text in files.items():
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                (root / path).write_text(text)
        snippet = site.snippet.replace("__PKG__", package)
        outputs = []
        for version in ("buggy", "fixed"):
            if version == "fixed":
                (root / package / site.module).write_text(template.modules[site.module].replace("__PKG__", package))
            async with limiter:
                proc = await trio.run_process([sys.executable, "-c", snippet], cwd=root, capture_stdout=True,
                                              capture_stderr=True, check=False)
            outputs.append((proc.stdout + proc.stderr).decode())
        for claim, output in ((site.actual, outputs[0]), (site.expected, outputs[1])):
            for part in re.findall(r"`([^`]+)`", claim):
                if part not in output and part.strip("'") not in output:
                    problems.append(f"{template.name}/{site.kind}: {part!r} not in {output[-300:]!r}")
        if outputs[0] == outputs[1]:
            problems.append(f"{template.name}/{site.kind}: the snippet does not show the bug")

    async with trio.open_nursery() as nursery:
        for template in TEMPLATES.values():
            for site in template.sites:
                nursery.start_soon(run, template, site)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
async def test_every_task_is_verified_by_grading(suite, tmp_path):
    """Gold patch -> resolved; no patch -> every FAIL_TO_PASS test fails and every PASS_TO_PASS test passes."""
    _, tasks = suite
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))
    problems: list[str] = []

    async def check(task: Task, which: str) -> None:
        async with limiter:
            work = tmp_path / f"{task.id}-{which}"
            await trio.to_thread.run_sync(lambda: shutil.copytree(task.repo, work, symlinks=True))
            ws = LocalWorkspace(work)
            if which == "gold":
                report = await grade(task, task.gold_patch, ws, timeout_s=120, env=env)
                if not report.resolved:
                    problems.append(f"{task.id} gold: {report.error} {report.reason} {report.tests}")
            else:
                report = await grade(task, "", ws, timeout_s=120, env=env, allow_empty_patch=True)
                if report.error is not None or report.report.f2p_success or report.report.p2p_failure:
                    problems.append(f"{task.id} base: {report.error} {report.reason} {report.tests}")
            await trio.to_thread.run_sync(lambda: shutil.rmtree(work))

    async with trio.open_nursery() as nursery:
        for task in tasks:
            nursery.start_soon(check, task, "gold")
            nursery.start_soon(check, task, "base")
    assert not problems, "\n".join(problems)
    task = tasks[0]
    report = await grade(task, "", LocalWorkspace(task.repo), timeout_s=60)
    assert report.error is GradeError.EMPTY_PATCH
