"""What the agent and the grader act on: a repository checkout with a shell, behind one Protocol.

`Workspace` is implemented by a sandbox handle of `sandboxd.client` (a sandbox on a build node, or
in-process) and by `LocalWorkspace` here: a plain directory on this machine with commands run as
subprocesses, no isolation at all. `LocalWorkspace` is for unit tests of pure agent logic and for
generating and verifying toy tasks; grading and episodes run in sandboxes.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import trio

from sandboxd.execs import ExecResult, git_diff_command, git_diff_result
from sandboxd.output import OutputCap

__all__ = ["ExecResult", "LocalWorkspace", "Workspace"]


@runtime_checkable
class Workspace(Protocol):
    """A repository (at `workdir`) and a shell in the same environment."""

    workdir: str

    async def exec(
        self,
        argv: Sequence[str] | str,
        *,
        timeout_s: float = 600.0,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        stdin: bytes | None = None,
        max_output_bytes: int = 1 << 20,
    ) -> ExecResult:
        """Run `argv` (a string runs under /bin/sh -c) in a new session; on timeout the whole
        process tree is killed and `timed_out` is set. Relative `cwd` is under `workdir`."""
        ...

    async def read_file(self, path: str) -> bytes:
        """Read a file; relative paths are under `workdir`."""
        ...

    async def write_file(self, path: str, data: bytes) -> None:
        """Write a file (creating parent directories); relative paths are under `workdir`."""
        ...

    async def diff(self, base_commit: str) -> str:
        """`git diff` of the repository against `base_commit`, new files included (the model's patch)."""
        ...


class LocalWorkspace:
    """A directory on this machine. No isolation: commands run as this user, with this user's rights."""

    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        self.workdir = str(Path(workdir).resolve())

    def _path(self, path: str) -> Path:
        return Path(path) if os.path.isabs(path) else Path(self.workdir, path)

    async def exec(
        self,
        argv: Sequence[str] | str,
        *,
        timeout_s: float = 600.0,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        stdin: bytes | None = None,
        max_output_bytes: int = 1 << 20,
    ) -> ExecResult:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        cmd = ["/bin/sh", "-c", argv] if isinstance(argv, str) else list(argv)
        full_env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", **(env or {})}
        cap = OutputCap(max_output_bytes)
        start = time.perf_counter()
        timed_out = False
        read_end, write_end = os.pipe()
        try:
            proc = await trio.lowlevel.open_process(
                cmd, cwd=str(self._path(cwd or ".")), env=full_env, stdin=None if stdin is None else -1,
                stdout=write_end, stderr=write_end, start_new_session=True,
            )
        finally:
            os.close(write_end)
        reader = trio.lowlevel.FdStream(read_end)
        try:
            async with trio.open_nursery() as nursery:
                if stdin is not None:
                    async def feed() -> None:
                        try:
                            await proc.stdin.send_all(stdin)
                        except trio.BrokenResourceError:
                            pass
                        finally:
                            await proc.stdin.aclose()
                    nursery.start_soon(feed)
                with trio.move_on_after(timeout_s) as scope:
                    while chunk := await reader.receive_some(65536):
                        cap.feed(chunk)
                    await proc.wait()
                if scope.cancelled_caught:
                    timed_out = True
                nursery.cancel_scope.cancel()
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole session: children and grandchildren
            except ProcessLookupError:
                pass
            with trio.CancelScope(shield=True):
                await proc.wait()
                await reader.aclose()
        return ExecResult(
            exit_code=-signal.SIGKILL if timed_out else proc.returncode,
            output=cap.output(),
            truncated=cap.truncated,
            timed_out=timed_out,
            duration_s=time.perf_counter() - start,
            output_bytes=cap.total_bytes,
        )

    async def read_file(self, path: str) -> bytes:
        return await trio.Path(self._path(path)).read_bytes()

    async def write_file(self, path: str, data: bytes) -> None:
        target = trio.Path(self._path(path))
        await target.parent.mkdir(parents=True, exist_ok=True)
        await target.write_bytes(data)

    async def diff(self, base_commit: str) -> str:
        # The same command and errors as a sandbox's diff (a throwaway index: the repository's own
        # index, and the model's view of it, stay untouched).
        argv, env = git_diff_command(base_commit)
        res = await self.exec(argv, timeout_s=120, env=env, max_output_bytes=64 << 20)
        return git_diff_result(res, base_commit)
