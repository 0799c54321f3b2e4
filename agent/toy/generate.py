"""Materialise toy tasks: one small git repository per task, with one injected bug.

Layout under `out_dir`::

    out_dir/tasks.jsonl              one Task.to_dict() per line (written last, atomically)
    out_dir/train/<task id>/         a git repository (branch main, 2 commits, HEAD = base_commit)
    out_dir/heldout/<task id>/

`Task.repo` is the repository's absolute path (what `agent.scheduler.task_checkout` copies to
/testbed), `Task.image` is "host", `base_commit` is HEAD: the buggy code with its existing tests.
Commit 1 adds the package, README, pyproject and .gitignore; commit 2 adds the tests. The bug is in
both, so the history never shows the fix. The test patch appends the FAIL_TO_PASS tests to an
existing test file; the gold patch restores the one changed snippet.

Everything is a function of (seed, n_train, n_heldout, levels): file bytes, commit ids (fixed
authors and dates), issue texts and task ids. Each split cycles through its (template, bug kind)
pairs in a seeded order, so `len(templates) * len(BUG_KINDS)` tasks cover every pair once.
"""

from __future__ import annotations

import difflib
import json
import os
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

from runtime.records import Task

from .gitwrite import write_repo
from .issues import LEVELS, issue_text
from .model import BUG_KINDS, PKG, BugSite, Template, test_ids
from .templates import HELDOUT_TEMPLATES, TEMPLATES, TRAIN_TEMPLATES

__all__ = ["TEST_COMMAND", "generate_suite", "render_task_files"]

VERSION = "0.3.1"
# Plugin autoload off: with the project's venv (pytest-trio, hypothesis, anyio) it costs ~0.9 s of a
# ~1.1 s run on the build machine; the toy tests need no plugin. "{python}" is `generate_suite`'s
# `python`: the interpreter (with pytest) as the sandbox sees it.
TEST_COMMAND = "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 {python} -m pytest -rA -p no:cacheprovider"
_AUTHOR = ("Toy Maintainer", "maintainer@toy.invalid")
_COMMITS = (("Initial version of {package}", "2024-01-15T10:00:00+00:00"),
            ("Add tests", "2024-02-01T16:30:00+00:00"))
_GITIGNORE = "__pycache__/\n*.pyc\n.pytest_cache/\n"


# ---------------------------------------------------------------------------------------------
# Files of one task (pure).


def _package_init(template: Template, package: str) -> str:
    lines = [f'"""{template.description}"""', ""]
    names: list[str] = []
    for module in sorted(template.exports):
        exported = sorted(template.exports[module])
        lines.append(f"from .{module.removesuffix('.py')} import {', '.join(exported)}")
        names += exported
    lines += ["", f'__version__ = "{VERSION}"', "", "__all__ = [" + ", ".join(f'"{n}"' for n in sorted(names)) + "]"]
    return "\n".join(lines) + "\n"


def _project_files(template: Template, package: str) -> dict[str, str]:
    return {
        "README.md": f"# {package}\n\n{template.description}\n\n## Development\n\n    python -m pytest\n",
        "pyproject.toml": (f'[project]\nname = "{package}"\nversion = "{VERSION}"\n'
                           f'description = "{template.description}"\nrequires-python = ">=3.8"\n\n'
                           '[tool.pytest.ini_options]\ntestpaths = ["tests"]\n'),
        ".gitignore": _GITIGNORE,
    }


def _unified_diff(path: str, old: str, new: str) -> str:
    """A git-style diff of one text file (both texts end with a newline)."""
    body = difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                fromfile=f"a/{path}", tofile=f"b/{path}", n=3)
    return f"diff --git a/{path} b/{path}\n" + "".join(body)


def _add_tests(source: str, tests: str) -> str:
    """`source` with the test functions of `tests` appended and its import lines merged in."""
    lines = tests.strip("\n").split("\n")
    imports = []
    while lines and lines[0].startswith(("import ", "from ")):
        imports.append(lines.pop(0))
    body = "\n".join(lines).strip("\n")
    src_lines = source.rstrip("\n").split("\n")
    new_imports = [line for line in imports if line not in src_lines]
    if new_imports:
        last = max((i for i, line in enumerate(src_lines) if line.startswith(("import ", "from "))), default=-1)
        src_lines[last + 1:last + 1] = new_imports
    return "\n".join(src_lines) + "\n\n\n" + body + "\n"


def render_task_files(template: Template, site: BugSite, package: str) -> dict[str, object]:
    """Everything about one (template, bug site, package name) except the issue text and git.

    Returns a dict with "commits" (list of {path: text} per commit), "gold_patch", "test_patch",
    "FAIL_TO_PASS", "PASS_TO_PASS" and "test_files".
    """
    sub = (lambda text: text.replace(PKG, package))
    fixed = {f"{package}/{name}": sub(src) for name, src in template.modules.items()}
    buggy_path = f"{package}/{site.module}"
    buggy = dict(fixed)
    buggy[buggy_path] = fixed[buggy_path].replace(sub(site.fixed), sub(site.buggy), 1)
    buggy[f"{package}/__init__.py"] = _package_init(template, package)
    tests = {path: sub(src) for path, src in template.tests.items()}

    existing = [tid for path, src in tests.items() for tid in test_ids(path, src)]
    unknown = [b for b in site.breaks if b not in existing]
    if unknown:
        raise ValueError(f"template {template.name!r}, site {site.kind}: breaks names unknown tests {unknown}")
    new_tests = sub(site.tests)
    f2p = test_ids(site.test_file, new_tests) + list(site.breaks)
    clash = [t for t in f2p[: len(f2p) - len(site.breaks)] if t in existing]
    if clash:
        raise ValueError(f"template {template.name!r}, site {site.kind}: new tests clash with existing {clash}")
    p2p = [t for t in existing if t not in site.breaks]

    patched_test = _add_tests(tests[site.test_file], new_tests)
    return {
        "commits": [{**buggy, **_project_files(template, package)}, tests],
        "gold_patch": _unified_diff(buggy_path, buggy[buggy_path], fixed[buggy_path]),
        "test_patch": _unified_diff(site.test_file, tests[site.test_file], patched_test),
        "FAIL_TO_PASS": f2p,
        "PASS_TO_PASS": p2p,
        "test_files": sorted(tests),
    }


# ---------------------------------------------------------------------------------------------
# Output.


def _write_jsonl(path: Path, tasks: Sequence[Task]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for task in tasks:
                f.write(json.dumps(task.to_dict(), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# The suite.


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name}: must be >= 0, got {value}")
    return value


def generate_suite(seed: int, n_train: int, n_heldout: int, out_dir: str | os.PathLike[str], *,
                   levels: Sequence[int] = LEVELS, python: str = "python3") -> list[Task]:
    """Generate `n_train` + `n_heldout` toy tasks under `out_dir` (created; must be empty).

    Train tasks use `TRAIN_TEMPLATES`, held-out tasks `HELDOUT_TEMPLATES` (disjoint). `python` is
    the interpreter the test command runs, as the sandbox sees it; it needs pytest (in a `host`
    sandbox, `python3` is Debian's /usr/bin/python3 with python3-pytest, which `make` installs).
    Returns the tasks, train first, and
    writes them to ``out_dir/tasks.jsonl``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected int, got {type(seed).__name__}")
    _check_count("n_train", n_train)
    _check_count("n_heldout", n_heldout)
    levels = tuple(levels)
    if not levels or any(level not in LEVELS for level in levels):
        raise ValueError(f"levels: expected a non-empty subset of {LEVELS}, got {levels!r}")
    if not isinstance(python, str) or not python.strip():
        raise ValueError(f"python: expected an interpreter command, got {python!r}")
    command = TEST_COMMAND.format(python=python)
    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out_dir: {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)

    tasks: list[Task] = []
    for split, names, count in (("train", TRAIN_TEMPLATES, n_train), ("heldout", HELDOUT_TEMPLATES, n_heldout)):
        pairs = [(name, kind) for name in names for kind in BUG_KINDS]
        random.Random(f"swe-dapo-toy:{seed}:{split}").shuffle(pairs)
        for i in range(count):
            template_name, kind = pairs[i % len(pairs)]
            template = TEMPLATES[template_name]
            rng = random.Random(f"swe-dapo-toy:{seed}:{split}:{i}")
            site = rng.choice([s for s in template.sites if s.kind == kind])
            level = levels[i % len(levels)]
            tasks.append(_make_task(out / split, f"toy-{seed}-{split}-{i:04d}", split, seed, template, site,
                                    level, rng, command))
    _write_jsonl(out / "tasks.jsonl", tasks)
    return tasks


def _make_task(split_dir: Path, task_id: str, split: str, seed: int, template: Template, site: BugSite,
               level: int, rng: random.Random, command: str) -> Task:
    package = rng.choice(template.packages)
    files = render_task_files(template, site, package)
    commits = [(message.format(package=package), date, tree)
               for (message, date), tree in zip(_COMMITS, files["commits"])]  # type: ignore[arg-type]
    repo = split_dir / task_id
    base_commit = write_repo(repo, commits, author=_AUTHOR)
    return Task(
        id=task_id,
        repo=str(repo),
        base_commit=base_commit,
        problem_statement=issue_text(site, context=template.context, package=package, version=VERSION,
                                     level=level, rng=rng),
        image="host",
        test_patch=files["test_patch"],  # type: ignore[arg-type]
        FAIL_TO_PASS=files["FAIL_TO_PASS"],  # type: ignore[arg-type]
        PASS_TO_PASS=files["PASS_TO_PASS"],  # type: ignore[arg-type]
        test_command=f"{command} {' '.join(files['test_files'])}",  # type: ignore[arg-type]
        log_parser="pytest",
        gold_patch=files["gold_patch"],  # type: ignore[arg-type]
        metadata={"template": template.name, "bug_kind": site.kind, "difficulty": level, "package": package,
                  "buggy_file": f"{package}/{site.module}", "buggy_function": site.function,
                  "entry_function": site.entry_function, "seed": seed},
        split=split,
    )
