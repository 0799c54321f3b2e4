import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest


def _overlay_available() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return "overlay" in f.read()
    except OSError:
        return False


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not _overlay_available(),
    reason="the ns runtime needs root (namespaces, mounts, cgroups) and overlayfs",
)


@pytest.fixture
async def rt(tmp_path):
    """An ns runtime on a fresh state directory; every sandbox, mount and cgroup goes at the end."""
    from sandboxd import Limits, open_ns_runtime

    limits = Limits(memory_bytes=512 << 20, pids=256, disk_bytes=64 << 20)
    async with open_ns_runtime(str(tmp_path / "state"), limits=limits) as runtime:
        yield runtime
    parent = runtime.cgroups.parent
    leftovers = [c for c in ("memory", "pids", "freezer") if os.path.exists(f"/sys/fs/cgroup/{c}/{parent}")]
    assert not leftovers, f"cgroups left behind: {leftovers}"


@pytest.fixture
def git_repo(tmp_path):
    """A small git repository on the host with one commit; returns (path, commit)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "mod.py").write_text("def f():\n    return 1\n")
    (repo / "README").write_text("hello\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "base"]):
        subprocess.run(["git", *args], cwd=repo, env=env, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                            check=True).stdout.strip()
    return str(repo), commit


from sandboxd.launch import Daemon, start_daemon  # noqa: E402,F401 (the tests' daemon helper)
