"""Start `sandboxd serve` in a child process and wait until it serves: for demos, benchmarks and tests.

    daemon = start_daemon("/var/tmp/sd", ["unix:/var/tmp/sd.sock"])
    async with connect(daemon.addresses[0]) as node: ...
    daemon.stop()

`Daemon` collects the child's stderr (its log) on a thread: `addresses` are what it printed after
"sandboxd: serving on", `log_text()` is everything it logged, `wait_for_log(pattern)` polls for a line.
With `die_with_parent`, the kernel sends the daemon SIGTERM when the process that started it dies, so a
killed benchmark leaves no daemon behind.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

__all__ = ["Daemon", "DaemonFailed", "start_daemon"]


class DaemonFailed(RuntimeError):
    """`sandboxd serve` exited or said nothing before its deadline; the message holds its log."""


class Daemon:
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
            if match:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon log has no {pattern!r} after {timeout_s} s:\n"
                                     f"{self.log_text(start)[-4000:]}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is cleaned up (the next daemon on the root sweeps)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._reader.join(5)

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


def _die_with_parent() -> None:
    from . import linux

    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGTERM)


def start_daemon(root: str, listen: Sequence[str], *, token_file: str | None = None, log_level: str = "INFO",
                 extra: Sequence[str] = (), preexec_fn: Callable[[], None] | None = None, die_with_parent: bool = False,
                 timeout_s: float = 30.0, cwd: str | None = None) -> Daemon:
    """Start `sandboxd serve` and wait until it says where it serves; raises `DaemonFailed` with its log."""
    argv = [sys.executable, "-m", "sandboxd", "serve", "--root", root, "--log-level", log_level]
    for address in listen:
        argv += ["--listen", address]
    if token_file is not None:
        argv += ["--token-file", token_file]
    if die_with_parent and preexec_fn is None:
        preexec_fn = _die_with_parent
    proc = subprocess.Popen([*argv, *extra], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec_fn, cwd=cwd)
    daemon = Daemon(proc, root)
    if not daemon._serving.wait(timeout_s) or not daemon.addresses:
        proc.kill()
        proc.wait(10)
        raise DaemonFailed(f"sandboxd serve did not start:\n{daemon.log_text()}")
    return daemon
