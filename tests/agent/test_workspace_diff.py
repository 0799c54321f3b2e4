"""The model's patch (`git diff` through a copy of the index) sees every edit, even a same-size edit made
in the second the repository was checked out, when the diff runs a second later (git trusts stat data
that is older than the index: the copy must keep the index's own mtime)."""

from __future__ import annotations

import subprocess
import time

from agent.workspace import LocalWorkspace


def _git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


async def test_a_same_size_edit_in_the_checkout_second_is_in_the_patch(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    for i in range(3):  # the commit and the edit fall in one second (retried if a boundary came between)
        time.sleep(1 - time.time() % 1 + 0.01)  # just after a second starts
        start = int(time.time())
        (repo / "calc.py").write_text(f"def add(a, b):\n    return a - b  # {i}\n")
        _git(repo, "add", "-A")
        _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", f"c{i}")
        (repo / "calc.py").write_text(f"def add(a, b):\n    return a + b  # {i}\n")  # same size
        if int(time.time()) == start:
            break
    commit = _git(repo, "rev-parse", "HEAD")
    time.sleep(1.1)  # the diff runs in a later second than the checkout and the edit
    patch = await LocalWorkspace(repo).diff(commit)
    assert "-    return a - b" in patch and "+    return a + b" in patch
