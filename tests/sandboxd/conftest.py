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


class Daemon:
    """A real `sandboxd serve` in its own process, its stderr (the log) collected by a thread.

    `addresses` are what it printed after "sandboxd: serving on"; `log_text()` is everything it has
    logged so far; `wait_for_log(pattern)` polls for a line (the daemon logs from another process).
    """

    def __init__(self, proc: subprocess.Popen, root: str) -> None:
        self.proc = proc
        self.root = root
        self.addresses: list[str] = []
        self.lines: list[str] = []
        self._serving = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            match = re.match(r"sandboxd: serving on (.*)", line)
            if match and not self._serving.is_set():
                self.addresses = match.group(1).split()
                self._serving.set()
        self._serving.set()  # EOF: the daemon is gone

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self, start: int = 0) -> str:
        return "".join(self.lines[start:])

    def wait_for_log(self, pattern: str, start: int = 0, timeout_s: float = 10.0) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while True:
            match = re.search(pattern, self.log_text(start))
            if match or time.monotonic() > deadline:
                assert match, f"daemon log has no {pattern!r} after {timeout_s} s:\n{self.log_text(start)[-4000:]}"
                return match
            time.sleep(0.02)

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        return self.proc.returncode


def start_daemon(root: str, listen: list[str], *, token_file: str | None = None, log_level: str = "INFO",
                 extra: list[str] = (), preexec_fn=None, timeout_s: float = 30.0) -> Daemon:
    """Start `sandboxd serve` and wait until it says where it serves; raises with its log if it does not."""
    argv = [sys.executable, "-m", "sandboxd", "serve", "--root", root, "--log-level", log_level]
    for address in listen:
        argv += ["--listen", address]
    if token_file is not None:
        argv += ["--token-file", token_file]
    proc = subprocess.Popen([*argv, *extra], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec_fn)
    daemon = Daemon(proc, root)
    if not daemon._serving.wait(timeout_s) or not daemon.addresses:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"sandboxd serve did not start:\n{daemon.log_text()}")
    return daemon
