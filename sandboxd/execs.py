"""Exec: one command in a sandbox, from the request to its init to the capped result.

    request = ExecRequest.check(argv, ..., workdir=sb.workdir, base_env=...)   # pure validation
    running = await start_exec(chan, request)       # under the sandbox's lock
    result = await running.finish(kill_group, on_output)

The command's stdout and stderr share one pipe (interleaved as written); stdin is a second pipe,
closed at once when there is nothing to send. Init answers the request once the command has
exec'd (or with the error that stopped it: unknown command, bad cwd), and sends its exit status
later. On timeout, or when the caller is cancelled, the command's exec cgroup (its whole process
tree, double forks included) is killed.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

import trio

from sandboxd import files
from sandboxd.checks import check_argv, check_env, check_number, check_size
from sandboxd.errors import BadRequest, Internal, LimitExceeded, NotFound, SandboxError
from sandboxd.initchan import InitCall, InitChannel
from sandboxd.output import OutputCap

__all__ = ["ExecResult", "ExecRequest", "RunningExec", "start_exec", "git_diff_command", "git_diff_result",
           "DEFAULT_ENV", "MAX_TIMEOUT_S", "MAX_OUTPUT_BYTES", "MAX_STDIN_BYTES"]

DEFAULT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
               "LANG": "C.UTF-8"}
MAX_TIMEOUT_S = 24 * 3600.0
MAX_OUTPUT_BYTES = 64 << 20
MAX_STDIN_BYTES = 64 << 20
OUTPUT_DRAIN_S = 0.05  # after the command exits, how long background holders of its stdout may keep it open
KILL_WAIT_S = 5.0  # after killing a timed-out command's group, how long its exit notice may take

KillGroup = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class ExecResult:
    exit_code: int  # negative: killed by that signal (-9 after a timeout)
    output: bytes  # stdout and stderr interleaved; head + marker + tail when truncated
    truncated: bool
    timed_out: bool
    duration_s: float
    output_bytes: int  # everything the command wrote, kept or not


@dataclass(frozen=True)
class ExecRequest:
    argv: list[str]
    env: dict[str, str]  # complete: defaults, image, sandbox and call environment merged
    cwd: str  # absolute, inside the sandbox
    stdin: bytes | None
    timeout_s: float
    max_output_bytes: int

    @classmethod
    def check(cls, argv: Sequence[str] | str, *, timeout_s: float, cwd: str | None, env: dict | None,
              stdin: bytes | None, max_output_bytes: int, workdir: str, base_env: dict[str, str]) -> "ExecRequest":
        argv = check_argv(argv)
        timeout_s = check_number(timeout_s, "timeout_s", MAX_TIMEOUT_S)
        max_output_bytes = check_size(max_output_bytes, "max_output_bytes", MAX_OUTPUT_BYTES)
        if stdin is not None and not isinstance(stdin, (bytes, bytearray, memoryview)):
            raise BadRequest("stdin must be bytes", field="stdin")
        if stdin is not None and len(stdin) > MAX_STDIN_BYTES:
            raise LimitExceeded(f"stdin must be at most {MAX_STDIN_BYTES} bytes", field="stdin")
        if cwd is None:
            cwd = workdir
        elif not isinstance(cwd, str) or not cwd or "\0" in cwd:
            raise BadRequest("cwd must be a non-empty path", field="cwd")
        cwd = "/" + files.sandbox_relpath(cwd, workdir, field="cwd")
        full_env = {**DEFAULT_ENV, **base_env, **check_env(env)}
        return cls(argv, full_env, cwd, bytes(stdin) if stdin else None, timeout_s, max_output_bytes)


async def start_exec(chan: InitChannel, req: ExecRequest) -> "RunningExec":
    """Send the request to init (call with the sandbox's lock held, so that requests keep their
    order). The reply is awaited by `RunningExec.finish`, outside the lock."""
    start = time.perf_counter()
    deadline = trio.current_time() + req.timeout_s
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    try:
        call = chan.new_call()
        try:
            await chan.send(call, {"op": "exec", "argv": req.argv, "env": req.env, "cwd": req.cwd},
                            (stdin_r, out_w))
        finally:
            os.close(stdin_r)
            os.close(out_w)
    except BaseException:
        os.close(stdin_w)
        os.close(out_r)
        raise
    if not req.stdin:
        os.close(stdin_w)  # the command reads EOF
        stdin_w = -1
    return RunningExec(chan, call, req, stdin_w, out_r, deadline, start)


class RunningExec:
    def __init__(self, chan: InitChannel, call: InitCall, req: ExecRequest, stdin_w: int, out_r: int,
                 deadline: float, start: float) -> None:
        self._chan = chan
        self._call = call
        self._req = req
        self._stdin_w = stdin_w
        self._out_r = out_r
        self._deadline = deadline
        self._start = start
        self._kill_group: KillGroup | None = None

    async def finish(self, kill_group: KillGroup,
                     on_output: Callable[[bytes], Awaitable[None]] | None = None) -> ExecResult:
        """Stream the output, wait for the exit (or the deadline), return the result."""
        self._kill_group = kill_group
        out_stream = trio.lowlevel.FdStream(self._out_r)
        in_stream = trio.lowlevel.FdStream(self._stdin_w) if self._stdin_w >= 0 else None
        try:
            try:
                reply = await self._call.reply()
            except SandboxError:
                self._chan.forget(self._call)
                raise
            except trio.Cancelled:
                await self._abandon()
                raise
            return await self._pump(reply["group"], out_stream, in_stream, kill_group, on_output)
        finally:
            with trio.CancelScope(shield=True):
                await out_stream.aclose()
                if in_stream is not None:
                    await in_stream.aclose()

    async def _abandon(self) -> None:
        """Cancelled before init's reply: the command may still start; wait for the reply and
        kill its group, so that it does not outlive the call."""
        with trio.CancelScope(shield=True):
            reply: dict | None = None
            with trio.move_on_after(KILL_WAIT_S):
                try:
                    reply = await self._call.reply()
                except SandboxError:
                    pass
            if reply is not None and "group" in reply and self._kill_group is not None:
                try:
                    await self._kill_group(reply["group"])
                except OSError:
                    pass
            self._chan.forget(self._call)

    async def _pump(self, group: str, out_stream: trio.lowlevel.FdStream,
                    in_stream: trio.lowlevel.FdStream | None, kill_group: KillGroup,
                    on_output: Callable[[bytes], Awaitable[None]] | None) -> ExecResult:
        req, call = self._req, self._call
        cap = OutputCap(req.max_output_bytes)
        out_done = trio.Event()
        timed_out = False
        exit_code: int | None = None

        reached_eof = False

        async def pump_out() -> None:
            nonlocal reached_eof
            streamed = 0
            try:
                while chunk := await out_stream.receive_some(65536):
                    cap.feed(chunk)
                    if on_output is not None and streamed < req.max_output_bytes:
                        piece = chunk[: req.max_output_bytes - streamed]
                        streamed += len(piece)
                        await on_output(piece)
                reached_eof = True
            finally:
                out_done.set()

        async def pump_in() -> None:
            try:
                await in_stream.send_all(req.stdin)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the command closed its stdin; that is its business
            finally:
                await in_stream.aclose()

        try:
            async with trio.open_nursery() as nursery:
                if in_stream is not None:
                    nursery.start_soon(pump_in)
                nursery.start_soon(pump_out)
                with trio.move_on_at(self._deadline):
                    exit_code = await call.exited()
                if exit_code is None:
                    timed_out = True
                    await kill_group(group)
                    with trio.move_on_after(KILL_WAIT_S):
                        exit_code = await call.exited()
                with trio.move_on_after(OUTPUT_DRAIN_S):
                    await out_done.wait()
                nursery.cancel_scope.cancel()
            if not reached_eof:
                # A background process still holds the pipe open, or this loop was too busy to read
                # within the drain window: whatever the command wrote is in the pipe's buffer already.
                # Take it without waiting, or a starved loop returns exit 0 with the output lost.
                for piece in _read_available(out_stream.fileno(), req.max_output_bytes + 65536):
                    cap.feed(piece)
                    if on_output is not None:
                        await on_output(piece)
        finally:
            if exit_code is None and not call.has_exited:
                with trio.CancelScope(shield=True):
                    # cancelled by our caller: the command must not outlive the call
                    try:
                        await kill_group(group)
                        with trio.move_on_after(KILL_WAIT_S):
                            await call.exited()
                    except (OSError, SandboxError):
                        pass
                    self._chan.forget(call)
        return ExecResult(exit_code if exit_code is not None else -signal.SIGKILL, cap.output(),
                          cap.truncated, timed_out, time.perf_counter() - self._start, cap.total_bytes)


def _read_available(fd: int, limit: int) -> list[bytes]:
    """What a non-blocking pipe holds right now (up to `limit` bytes), without waiting for more."""
    pieces: list[bytes] = []
    total = 0
    while total < limit:
        try:
            piece = os.read(fd, min(65536, limit - total))
        except (BlockingIOError, InterruptedError):
            break
        except OSError:  # closed under us
            break
        if not piece:
            break
        pieces.append(piece)
        total += len(piece)
    return pieces


# ---------------------------------------------------------------- diff: an exec of git

# The model's patch: everything in the work tree (untracked files too) against the base commit,
# through a temporary copy of the index, so that the repository's own index is left untouched.
# The index is copied with its mtime (cp -p): git trusts an entry's stat only when the file is older
# than the index, and a fresh copy made the index "newer" than an edit of the same size made in the
# same second as the checkout, which then went missing from the patch (seen under load).
_GIT_DIFF = ('set -e; idx=$(mktemp); trap \'rm -f "$idx"\' EXIT; '
             'cp -p "$(git rev-parse --git-dir)/index" "$idx" 2>/dev/null || true; '
             'git rev-parse --verify --quiet "$1^{commit}" >/dev/null || { echo "unknown commit $1" >&2; exit 3; }; '
             'GIT_INDEX_FILE="$idx" git add -A; '
             'GIT_INDEX_FILE="$idx" git diff --cached --binary --no-color --no-ext-diff "$1"')


def git_diff_command(base_commit: object) -> tuple[list[str], dict[str, str]]:
    """argv and env of the exec that prints the patch; BadRequest for a bad commit-ish."""
    if not isinstance(base_commit, str) or not base_commit or base_commit.startswith("-") or any(
            c.isspace() or c == "\0" for c in base_commit):
        raise BadRequest("base_commit must be a commit-ish", field="base_commit")
    env = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.directory", "GIT_CONFIG_VALUE_0": "*"}
    return ["/bin/sh", "-c", _GIT_DIFF, "diff", base_commit], env


def git_diff_result(res: ExecResult, base_commit: str) -> str:
    """The patch from that exec's result, or the error it means."""
    if res.timed_out:
        raise LimitExceeded("git diff timed out", field="timeout_s")
    if res.exit_code == 3:
        raise NotFound(f"unknown commit {base_commit!r}", field="base_commit")
    if res.exit_code != 0:
        raise Internal(f"git diff failed ({res.exit_code}): {res.output[-2000:].decode(errors='replace')}")
    if res.truncated:
        raise LimitExceeded("diff larger than the output cap", field="base_commit")
    return res.output.decode(errors="surrogateescape")
