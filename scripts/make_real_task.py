#!/usr/bin/env python3
"""Build the real-repository fixture of tests/agent/test_real_repo.py from PyPI (kept for reproducibility).

The task: more-itertools 11.0.2 -> 11.1.0 (MIT licence), upstream issue #1152 "Minor bug in
numeric_range()" fixed by PR #1153: ``reversed(numeric_range(0))`` raised IndexError instead of
giving an empty iterator, as ``reversed(range(0))`` does.

    .venv/bin/python scripts/make_real_task.py [--sdist-dir DIR] [--out DIR] [--repeat N]

What it does, every step checked:

1. ``pip download --no-deps --no-binary :all:`` of both source distributions (or takes them from
   ``--sdist-dir``), checked against the sha256 PyPI publishes (recorded below).
2. Puts the 11.0.2 sdist, as extracted, under git: one commit with a fixed author, committer, date
   (the sdist's upload time) and no user or system git config, so `base_commit` is the same on every
   machine that runs the same git. The index is rebuilt with `git read-tree` (no stat data) so the
   tarball is byte-for-byte reproducible too.
3. Commits the 11.1.0 sdist on top in a scratch copy, takes the real upstream diff of the files named
   in `KEEP`, keeps only the hunks that belong to the fix (see `KEEP`), applies them to the base and
   re-diffs, so the gold patch (source files) and the test patch (test files) are plain `git diff`
   output with exact line numbers. Everything else that changed between the releases is left out.
4. Runs the task's test command (`TEST_COMMAND`: tests/test_more.py less its five slowest tests,
   see `DESELECT`) at base + test patch and at base + test patch + gold patch, `--repeat` times
   each, under every interpreter given (default: Debian's /usr/bin/python3, what the `host` sandbox
   image runs, and this interpreter), and parses the logs with the project's own pytest parser:
   FAIL_TO_PASS = failed in every base run and passed in every gold run; PASS_TO_PASS = passed in
   every run. Tests that are neither are printed and left out.
5. Writes ``<out>/more-itertools-11.0.2.tar.gz`` (the git repository at base, top directory
   ``more-itertools/``; deterministic tar and gzip headers) and ``<out>/task.json``
   (`runtime.records.Task.to_dict()`), each atomically.

The tests need nothing but Python >= 3.10 and pytest (no network, no other package).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.grading.parsers import TestStatus, get_parser  # noqa: E402
from runtime.records import Task  # noqa: E402

PROJECT = "more-itertools"
REPO = "more-itertools/more-itertools"
LICENSE = "MIT"
BASE_VERSION = "11.0.2"
FIXED_VERSION = "11.1.0"
# From PyPI's simple index (https://pypi.org/simple/more-itertools/, JSON form).
SDISTS = {
    BASE_VERSION: {
        "filename": "more_itertools-11.0.2.tar.gz",
        "url": "https://files.pythonhosted.org/packages/a2/f7/139d22fef48ac78127d18e01d80cf1be40236ae489769d17f35c3d425293/more_itertools-11.0.2.tar.gz",
        "sha256": "392a9e1e362cbc106a2457d37cabf9b36e5e12efd4ebff1654630e76597df804",
        "upload_time": "2026-04-09T15:01:33Z",
    },
    FIXED_VERSION: {
        "filename": "more_itertools-11.1.0.tar.gz",
        "url": "https://files.pythonhosted.org/packages/de/1d/f4da6f02cdffe04d6362210b807146a26044c88d839208aec273bb0d9184/more_itertools-11.1.0.tar.gz",
        "sha256": "48e8f4d9e7e5878571ecf6f2b4e57634f93cd474cc8cfbd2376f2d11b396e30d",
        "upload_time": "2026-05-22T14:14:29Z",
    },
}
ISSUE_URL = "https://github.com/more-itertools/more-itertools/issues/1152"
PR_URL = "https://github.com/more-itertools/more-itertools/pull/1153"
TASK_ID = "more-itertools__more-itertools-1153"
REPO_DIR = "more-itertools"  # top directory in the tarball
TARBALL = f"{PROJECT}-{BASE_VERSION}.tar.gz"

# What is kept of the real 11.0.2 -> 11.1.0 diff: file -> (role, a string that marks the hunk).
# Exactly one upstream hunk must contain the marker; it is kept verbatim (PR #1153):
#   more_itertools/more.py  (gold): numeric_range.__reversed__ returns iter([]) when
#                                   self._get_by_index(-1) raises IndexError (an empty range);
#   tests/test_more.py      (test): the new NumericRangeTests.test_empty_reversed.
# Left out as unrelated churn: peekable.__class_getitem__ (and the `import types` it needs in
# more.py and test_more.py), the islice_extended rewrite, seekable.__getitem__, serialize's
# send/throw/close, the tests of those, more.pyi stubs, the version bump (__init__.py, setup.cfg,
# setup.py, PKG-INFO) and docs/versions.rst.
KEEP = {
    "more_itertools/more.py": ("gold", "self._get_by_index(-1)"),
    "tests/test_more.py": ("test", "def test_empty_reversed"),
}
TEST_FILES = ["tests/test_more.py"]  # the test files the test patch touches
# The five slowest tests of tests/test_more.py (~4 of its ~5 s on one core: a DFT round trip and
# thread-concurrency stress tests, nothing to do with numeric_range) are deselected, so that a grade
# takes ~1.5 s; the other 571 tests of the file run.
DESELECT = [
    "tests/test_more.py::DiscreteFourierTransformTests::test_roundtrip",
    "tests/test_more.py::TestConcurrentTee::test_concurrent_consumers",
    "tests/test_more.py::TestSerialize::test_concurrent_calls",
    "tests/test_more.py::ExtractTests::test_all_orderings",
    "tests/test_more.py::TestSynchronized::test_concurrent_calls",
]
TEST_COMMAND = ("PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -m pytest -rA -p no:cacheprovider "
                + " ".join(f"--deselect {name}" for name in DESELECT) + " " + " ".join(TEST_FILES))

PROBLEM_STATEMENT = """\
numeric_range: reversed() raises IndexError on an empty range

`numeric_range` is meant to behave like the built-in `range`. Reversing an empty built-in range
gives an empty iterator:

    >>> list(reversed(range(0)))
    []

Reversing an empty `numeric_range` raises instead:

    >>> from more_itertools import numeric_range
    >>> list(reversed(numeric_range(0)))
    Traceback (most recent call last):
      ...
    IndexError: numeric range object index out of range

`numeric_range.__reversed__` should handle empty ranges (any empty range, e.g. `numeric_range(0)`
or `numeric_range(5, 1)`) and return an empty iterator.
"""

COMMIT_DATE = SDISTS[BASE_VERSION]["upload_time"].replace("Z", "+00:00")
GIT_ENV = {
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "swe-dapo",
    "GIT_AUTHOR_EMAIL": "swe-dapo@localhost",
    "GIT_AUTHOR_DATE": COMMIT_DATE,
    "GIT_COMMITTER_NAME": "swe-dapo",
    "GIT_COMMITTER_EMAIL": "swe-dapo@localhost",
    "GIT_COMMITTER_DATE": COMMIT_DATE,
    "TZ": "UTC",
    "LC_ALL": "C",
}


def log(msg: str) -> None:
    print(f"make_real_task: {msg}", file=sys.stderr, flush=True)


def git(repo: Path, *args: str, stdin: str | None = None) -> str:
    res = subprocess.run(["git", *args], cwd=repo, env={**os.environ, **GIT_ENV}, input=stdin,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed in {repo}: {res.stderr.strip()}")
    return res.stdout


# ---------------------------------------------------------------------------------------------
# 1-2. sources and the base repository


def fetch_sdists(sdist_dir: Path | None, tmp: Path) -> dict[str, Path]:
    out = {}
    for version, info in SDISTS.items():
        path = sdist_dir / info["filename"] if sdist_dir else None
        if path is None or not path.exists():
            dest = tmp / "sdists"
            log(f"pip download {PROJECT}=={version}")
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            "--disable-pip-version-check", f"{PROJECT}=={version}", "-d", str(dest)], check=True)
            path = dest / info["filename"]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != info["sha256"]:
            raise SystemExit(f"{path}: sha256 {digest} != {info['sha256']} published by PyPI")
        out[version] = path
    return out


def extract_sdist(path: Path, dest: Path) -> Path:
    with tarfile.open(path) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python < 3.11.4: refuse anything unusual by hand
            for member in tar.getmembers():
                name = member.name
                if name.startswith("/") or ".." in name.split("/") or not (member.isfile() or member.isdir()):
                    raise SystemExit(f"{path}: refusing member {name!r}")
            tar.extractall(dest)
    (top,) = [p for p in dest.iterdir() if p.is_dir()]
    return top


def make_base_repo(src: Path, repo: Path) -> str:
    shutil.copytree(src, repo, symlinks=True)
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    git(repo, "init", "-q", "--template=", "-b", "main")
    git(repo, "add", "-A", "--force")
    git(repo, "commit", "-q", "--no-verify", "-m",
        f"{PROJECT} {BASE_VERSION}: the source distribution from PyPI\n\n{SDISTS[BASE_VERSION]['url']}\n")
    tracked = sorted(git(repo, "ls-files", "-z").split("\0")[:-1])
    if tracked != files:
        raise SystemExit(f"not every sdist file is tracked: {sorted(set(files) ^ set(tracked))}")
    return git(repo, "rev-parse", "HEAD").strip()


# ---------------------------------------------------------------------------------------------
# 3. the upstream diff, restricted to the fix


def split_hunks(diff: str) -> tuple[str, list[str]]:
    """One file's `git diff` -> (header, hunks)."""
    parts = re.split(r"(?m)^(?=@@ )", diff)
    return parts[0], parts[1:]


def derive_patches(repo: Path, base: str, new_src: Path, tmp: Path) -> tuple[str, str, str]:
    """(gold_patch, test_patch, stat of the whole release diff)."""
    full = tmp / "full"
    shutil.copytree(repo, full, symlinks=True)
    git(full, "rm", "-rq", ".")
    shutil.copytree(new_src, full, symlinks=True, dirs_exist_ok=True)
    git(full, "add", "-A", "--force")
    git(full, "commit", "-q", "--no-verify", "-m", f"{PROJECT} {FIXED_VERSION}")
    stat = git(full, "diff", "--stat=120", base, "HEAD")

    kept: dict[str, list[str]] = {"gold": [], "test": []}
    for path, (role, marker) in KEEP.items():
        header, hunks = split_hunks(git(full, "diff", "--no-color", base, "HEAD", "--", path))
        chosen = [h for h in hunks if marker in h]
        if len(chosen) != 1:
            raise SystemExit(f"{path}: expected one upstream hunk containing {marker!r}, found {len(chosen)}")
        kept[role].append(header + chosen[0])
        log(f"kept 1 of {len(hunks)} upstream hunks of {path} ({role})")

    work = tmp / "fixed"
    shutil.copytree(repo, work, symlinks=True)
    for role in ("test", "gold"):
        git(work, "apply", "--verbose", "-", stdin="".join(kept[role]))
    gold_paths = [p for p, (r, _) in KEEP.items() if r == "gold"]
    test_paths = [p for p, (r, _) in KEEP.items() if r == "test"]
    gold = git(work, "diff", "--no-color", base, "--", *gold_paths)
    test = git(work, "diff", "--no-color", base, "--", *test_paths)
    return gold, test, stat


# ---------------------------------------------------------------------------------------------
# 4. FAIL_TO_PASS / PASS_TO_PASS, by running the tests


def local_command(python: str) -> str:
    command, n = re.subn(r"\bpython3(?= -m pytest)", shlex.quote(python), TEST_COMMAND)
    assert n == 1, TEST_COMMAND
    return command


def run_tests(repo: Path, patches: list[str], python: str, where: Path) -> dict[str, TestStatus]:
    shutil.copytree(repo, where, symlinks=True)
    for patch in patches:
        git(where, "apply", "-", stdin=patch)
    res = subprocess.run(["bash", "-c", local_command(python)], cwd=where, capture_output=True, text=True,
                         env={**os.environ, "PYTEST_ADDOPTS": ""}, timeout=600)
    statuses = get_parser("pytest")(res.stdout + res.stderr)
    if not statuses:
        raise SystemExit(f"no test results from {python} in {where}:\n{(res.stdout + res.stderr)[-3000:]}")
    shutil.rmtree(where)
    return statuses


def check_deselected(repo: Path, python: str) -> None:
    """Every `DESELECT` id names a real test (pytest ignores a --deselect that matches nothing)."""
    res = subprocess.run([python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *TEST_FILES],
                         cwd=repo, capture_output=True, text=True, env={**os.environ, "PYTEST_ADDOPTS": "",
                                                                        "PYTHONDONTWRITEBYTECODE": "1",
                                                                        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    collected = set(res.stdout.split())
    missing = [name for name in DESELECT if name not in collected]
    if res.returncode != 0 or missing:
        raise SystemExit(f"DESELECT names no collected test: {missing}\n{res.stdout[-2000:]}{res.stderr[-2000:]}")


def classify(repo: Path, gold: str, test: str, pythons: list[str], repeat: int,
             tmp: Path) -> tuple[list[str], list[str]]:
    jobs = [(kind, python, i) for python in pythons for kind in ("base", "gold") for i in range(repeat)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        futures = {
            job: pool.submit(run_tests, repo, [test] if job[0] == "base" else [test, gold], job[1],
                             tmp / f"run-{n}")
            for n, job in enumerate(jobs)
        }
        results = {job: f.result() for job, f in futures.items()}
    base_runs = [r for (kind, _, _), r in results.items() if kind == "base"]
    gold_runs = [r for (kind, _, _), r in results.items() if kind == "gold"]
    names = sorted(set().union(*results.values()))
    if ran := set(DESELECT) & set(names):
        raise SystemExit(f"deselected tests ran: {sorted(ran)}")
    failing = (TestStatus.FAILED, TestStatus.ERROR)
    f2p = [n for n in names if all(r.get(n) in failing for r in base_runs)
           and all(r.get(n) is TestStatus.PASSED for r in gold_runs)]
    p2p = [n for n in names if all(r.get(n) is TestStatus.PASSED for r in base_runs + gold_runs)]
    others = sorted(set(names) - set(f2p) - set(p2p))
    for name in others:
        log(f"left out (neither F2P nor P2P): {name}: base {[str(r.get(name)) for r in base_runs]}, "
            f"gold {[str(r.get(name)) for r in gold_runs]}")
    log(f"{len(names)} tests, {len(base_runs) + len(gold_runs)} runs with {pythons}: "
        f"{len(f2p)} FAIL_TO_PASS, {len(p2p)} PASS_TO_PASS, {len(others)} left out")
    if not f2p:
        raise SystemExit("no FAIL_TO_PASS test: the test patch does not catch the bug")
    return f2p, p2p


# ---------------------------------------------------------------------------------------------
# 5. output


def deterministic_tarball(repo: Path, arcname: str, mtime: int) -> bytes:
    """A tar.gz of `repo` under `arcname`: sorted entries, fixed owner and mtime, normalised modes."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            paths = [repo, *sorted(repo.rglob("*"), key=lambda p: p.relative_to(repo).as_posix())]
            for path in paths:
                rel = path.relative_to(repo).as_posix()
                info = tar.gettarinfo(str(path), arcname=arcname if rel == "." else f"{arcname}/{rel}")
                if not (info.isfile() or info.isdir()):
                    raise SystemExit(f"{path}: only files and directories go in the fixture")
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = mtime
                info.mode = 0o755 if info.isdir() or info.mode & 0o100 else 0o644
                if info.isfile():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "tests/agent/fixtures/real", help="fixture directory")
    ap.add_argument("--sdist-dir", type=Path, help="take the sdists from here instead of downloading them")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each configuration (flaky tests drop out)")
    ap.add_argument("--python", action="append", dest="pythons",
                    help="interpreter to run the tests with (repeatable; default /usr/bin/python3 and this one)")
    args = ap.parse_args(argv)
    pythons = args.pythons or [p for p in ("/usr/bin/python3",) if os.path.exists(p)] + [sys.executable]
    for python in pythons:
        subprocess.run([python, "-c", "import pytest"], check=True)

    with tempfile.TemporaryDirectory(prefix="make-real-task-") as tmp_s:
        tmp = Path(tmp_s)
        sdists = fetch_sdists(args.sdist_dir, tmp)
        old_src = extract_sdist(sdists[BASE_VERSION], tmp / "old")
        new_src = extract_sdist(sdists[FIXED_VERSION], tmp / "new")
        repo = tmp / "repo" / REPO_DIR
        base = make_base_repo(old_src, repo)
        log(f"base commit {base}")
        gold, test, stat = derive_patches(repo, base, new_src, tmp)
        log(f"the whole {BASE_VERSION} -> {FIXED_VERSION} diff:\n{stat}")
        check_deselected(repo, pythons[0])
        f2p, p2p = classify(repo, gold, test, pythons, args.repeat, tmp)

        git(repo, "read-tree", "HEAD")  # an index without stat data: reproducible bytes
        if git(repo, "status", "--porcelain", "--untracked-files=all", "--ignored"):
            raise SystemExit(f"{repo} is not clean")
        git(repo, "read-tree", "HEAD")  # `status` refreshed the index; reset it again
        epoch = int(subprocess.run(["git", "show", "-s", "--format=%ct", "HEAD"], cwd=repo, capture_output=True,
                                   text=True, check=True, env={**os.environ, **GIT_ENV}).stdout)
        tarball = deterministic_tarball(repo, REPO_DIR, epoch)

    task = Task(
        id=TASK_ID,
        repo=REPO,
        base_commit=base,
        problem_statement=PROBLEM_STATEMENT,
        image="host",
        test_patch=test,
        FAIL_TO_PASS=f2p,
        PASS_TO_PASS=p2p,
        test_command=TEST_COMMAND,
        log_parser="pytest",
        gold_patch=gold,
        metadata={
            "project": PROJECT,
            "license": LICENSE,
            "base_version": BASE_VERSION,
            "fixed_version": FIXED_VERSION,
            "sources": {v: {k: info[k] for k in ("url", "sha256")} for v, info in SDISTS.items()},
            "upstream_issue": ISSUE_URL,
            "upstream_pr": PR_URL,
            "fixture": TARBALL,
            "repo_dir": REPO_DIR,
            "kept": {path: role for path, (role, _) in KEEP.items()},
            "made_by": "scripts/make_real_task.py",
        },
    )
    out = args.out
    write_atomic(out / TARBALL, tarball)
    write_atomic(out / "task.json", (json.dumps(task.to_dict(), indent=1) + "\n").encode())
    log(f"wrote {out / TARBALL} ({len(tarball)} bytes) and {out / 'task.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
