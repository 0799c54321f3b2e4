"""The `dir` sandbox runtime: a sandbox is a plain directory on the host. NO ISOLATION AT ALL.

    async with open_dir_runtime("/var/lib/sandboxd-dir") as rt:
        sid = await rt.create("host", repo="/path/to/repo")
        result = await rt.exec(sid, "pytest -x", timeout_s=60)

For machines with neither namespaces (the `ns` runtime) nor podman. Commands run as the daemon's
user, on the host's root filesystem, with the network and every file the daemon can reach; only
their working directory and HOME/TMPDIR point into the sandbox. A command that writes to an
absolute path writes to the host. Limits are validated and recorded, not enforced.

Layout (relative to the state directory):

    s/S     the sandbox's directory, its "root": files, list_dir and cwd resolve under it, and the
            repository is at s/S + workdir (s/S/testbed by default). HOME=s/S/root, TMPDIR=s/S/tmp.
    n/N     a frozen copy: a snapshot, or a sandbox's origin (its state right after create, what
            restore(S) with no snapshot goes back to). Shared by forks, reference counted.
    trash/  directories on their way out, deleted by a background task.

snapshot = `cp -a` of s/S (after killing the sandbox's processes, as `ns` does); restore = kill,
copy the snapshot next to s/S, swap the two by rename, delete the old one in the background; fork
= a copy. Every copy is O(repository size): put the state directory on a tmpfs or on btrfs/xfs
(`cp --reflink=auto`). Measured on the build machine, 5,000 files: 0.25 s on tmpfs, 6-11 s on its
ext4 root disk.

Processes are found through their environment: every command gets SANDBOXD_EXEC=<state>.<sandbox>.<exec>
(inherited across setsid and double forks), so timeouts, restore, destroy and a restart after a
crash kill the whole tree (`kill_process_tree`). A process that clears its environment (env -i)
is still caught on timeout while it descends from the command, but not by restore or destroy.

Also here, shared with the podman runtime: `kill_process_tree`, `Reaper`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Iterable, Sequence

import trio

from sandboxd import files
from sandboxd.checks import check_argv, check_env, check_id, check_number, check_size
from sandboxd.errors import BadRequest, Internal, LimitExceeded, NotFound
from sandboxd.fileapi import FileCalls
from sandboxd.layers import parse_image
from sandboxd.ns import (DEFAULT_ENV, MAX_FILE_BYTES, MAX_OUTPUT_BYTES, MAX_TIMEOUT_S, OUTPUT_DRAIN_S,
                         ExecResult, Limits)
from sandboxd.output import OutputCap

__all__ = ["DirRuntime", "open_dir_runtime", "kill_process_tree", "marked_processes", "Reaper", "state_key",
           "MARKER_VAR"]

log = logging.getLogger("sandboxd.dir")

MARKER_VAR = "SANDBOXD_EXEC"  # <state key>.<sandbox id>.<exec token>, in every command's environment
KILL_WAIT_S = 5.0  # after SIGKILL, how long to wait for the command to be reaped
_SANDBOX_DIRS = {"tmp": 0o1777, "root": 0o700}


# ---------------------------------------------------------------- processes (shared with podman.py)

def _processes() -> Iterable[tuple[int, int]]:
    """(pid, parent pid) of every live, non-zombie process on the host."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if fields and fields[0] != b"Z":
            yield int(name), int(fields[1])


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return False
    return any(var.startswith(marker) for var in env.split(b"\0"))


def marked_processes(marker: str) -> list[int]:
    """Pids of the processes whose environment has a variable starting with `marker`."""
    m = marker.encode()
    return [pid for pid, _ in _processes() if _has_marker(pid, m)]


def kill_process_tree(roots: Iterable[int] = (), marker: str | None = None, *, settle_s: float = 0.01,
                      max_passes: int = 5) -> int:
    """SIGKILL `roots`, their descendants and every process whose environment has a variable
    starting with `marker` (e.g. "SANDBOXD_EXEC=ab12.sb-1."). Blocking; returns how many died.

    Each process found is stopped (SIGSTOP) at once and the search repeats until it finds nothing
    new, so that nothing forks away while we look; then all of them get SIGKILL. A process in the
    middle of execve shows an empty environment for an instant: the whole pass is repeated after
    `settle_s` until one finds nobody.
    """
    roots = set(roots)
    total = 0
    for i in range(max_passes):
        killed = _kill_pass(roots, marker)
        total += killed
        if i > 0 and not killed:
            break
        time.sleep(settle_s)
    return total


def _kill_pass(roots: set[int], marker: str | None, max_rounds: int = 100) -> int:
    own = os.getpid()
    m = marker.encode() if marker else None
    found: set[int] = set()
    for _ in range(max_rounds):
        new = [pid for pid, ppid in _processes()
               if pid != own and pid not in found
               and (pid in roots or ppid in found or ppid in roots or (m is not None and _has_marker(pid, m)))]
        if not new:
            break
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        found.update(new)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(found)


# ---------------------------------------------------------------- diff (shared with podman.py)

# The model's patch: everything at workdir against base_commit, untracked files included, through
# a temporary index so that the repository's own index is left alone (as in ns.py).
# ---------------------------------------------------------------- background deletions (shared)

class Reaper:
    """Runs slow clean-up jobs (blocking callables, in a worker thread) one at a time, off the
    caller's path: `submit()` returns at once; `aclose()` finishes every job submitted so far.
    A job's exception is logged and kept in `errors`, never raised to whoever submitted it."""

    def __init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel(math.inf)
        self._done = trio.Event()
        self.errors: list[str] = []
        self.pending = 0

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            async for fn, args in self._recv:
                try:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(fn, *args)
                except Exception as exc:  # noqa: BLE001  one failed clean-up must not stop the others
                    log.warning("background clean-up %s failed: %s", getattr(fn, "__name__", fn), exc)
                    self.errors.append(f"{getattr(fn, '__name__', fn)}: {exc}")
                finally:
                    self.pending -= 1
        finally:
            self._done.set()

    def submit(self, fn: Callable, *args) -> None:
        self.pending += 1
        self._send.send_nowait((fn, args))

    async def aclose(self) -> None:
        self._send.close()
        await self._done.wait()


# ---------------------------------------------------------------- the runtime

def state_key(state_dir: str) -> str:
    """A short tag for one state directory: names its containers, markers and labels."""
    return hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:10]


def _copy_tree(src: str, dst: str, *, keep_owner: bool = True) -> None:
    """cp -a src dst: modes, times, links, special bits kept exactly. A new dst is a copy of src;
    src ending in /. copies its content into an existing dst."""
    argv = ["cp", "-a", "--reflink=auto", "--", src, dst]
    if not keep_owner:  # a repository copied in belongs to the daemon's user, as in ns
        argv[2:2] = ["--no-preserve=ownership"]
    res = subprocess.run(argv, capture_output=True)
    if res.returncode != 0:
        if not src.endswith("/."):
            shutil.rmtree(dst, ignore_errors=True)  # a partial copy
        err = res.stderr.decode(errors="replace")[-2000:]
        if "No space left" in err:
            raise LimitExceeded("copy does not fit on the disk", field="repo")
        raise Internal(f"copying {src}: {err}")


def _dir_bytes(path: str) -> int:
    total = 0
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            total += st.st_blocks * 512
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
    return total


def _process_usage(marker: str) -> tuple[int, int]:
    """(process count, resident bytes) of the processes carrying marker."""
    pids = marked_processes(marker)
    rss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            pass
    return len(pids), rss


@dataclass
class _Tree:
    """A frozen copy of a sandbox directory: a snapshot or an origin. Deleted when refs drop to 0."""
    id: str
    path: str
    limits: Limits
    env: dict[str, str]
    workdir: str
    refs: int = 0  # sandboxes whose origin it is, + 1 while it is a listed snapshot


@dataclass
class _Sandbox:
    id: str
    root: str
    limits: Limits
    env: dict[str, str]
    workdir: str
    marker: str  # MARKER_VAR=<state>.<id>. : prefix of every exec marker of this sandbox
    origin: _Tree | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)


class DirRuntime(FileCalls):
    """Sandboxes as plain directories, NO isolation. Use `open_dir_runtime()`; same interface as
    NsRuntime. Ids: sandboxes `sb-...`, snapshots `sn-...`."""

    def __init__(self, state_dir: str, nursery: trio.Nursery, reaper: Reaper, *, limits: Limits = Limits()) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self._nursery = nursery
        self._reaper = reaper
        self.default_limits = limits.validate("default_limits")
        self.key = state_key(self.state_dir)
        self._closed = False
        self._sandboxes: dict[str, _Sandbox] = {}
        self._snapshots: dict[str, _Tree] = {}
        self._trees = 0  # frozen copies on disk, snapshots and origins

    def _path(self, *parts: str) -> str:
        return os.path.join(self.state_dir, *parts)

    def clean_stale(self) -> int:
        """Kill the processes and delete the directories a previous run of this state directory
        left (a crash). Blocking; returns how many processes were killed."""
        killed = kill_process_tree(marker=f"{MARKER_VAR}={self.key}.")
        for sub in ("s", "n", "trash"):
            shutil.rmtree(self._path(sub), ignore_errors=True)
            os.makedirs(self._path(sub))
        return killed

    # ------------------------------------------------------------ lookups

    def _sandbox(self, sandbox_id: object) -> _Sandbox:
        if self._closed:
            raise Internal("runtime is closed")
        sb = self._sandboxes.get(check_id(sandbox_id, "sandbox_id"))
        if sb is None:
            raise NotFound(f"no sandbox {sandbox_id!r}", field="sandbox_id")
        return sb

    def _snapshot(self, snapshot_id: object) -> _Tree:
        snap = self._snapshots.get(check_id(snapshot_id, "snapshot_id"))
        if snap is None:
            raise NotFound(f"no snapshot {snapshot_id!r}", field="snapshot_id")
        return snap

    def _trash(self, path: str) -> None:
        """Move a directory out of the way now (rename), delete it in the background."""
        target = self._path("trash", secrets.token_hex(6))
        os.rename(path, target)
        self._reaper.submit(shutil.rmtree, target)

    def _release(self, tree: _Tree | None) -> None:
        if tree is None:
            return
        tree.refs -= 1
        if tree.refs == 0:
            self._trees -= 1
            self._trash(tree.path)

    async def _freeze(self, src: str, limits: Limits, env: dict, workdir: str, prefix: str) -> _Tree:
        tree = _Tree(prefix + secrets.token_hex(6), "", limits, dict(env), workdir)
        tree.path = self._path("n", tree.id)
        await trio.to_thread.run_sync(_copy_tree, src, tree.path)
        self._trees += 1
        return tree

    async def _kill_all(self, sb: _Sandbox) -> None:
        await trio.to_thread.run_sync(kill_process_tree, (), sb.marker)

    # ------------------------------------------------------------ create, fork, destroy

    async def create(self, image: str = "host", *, limits: Limits | None = None, env: dict | None = None,
                     workdir: str = "/testbed", repo: str | None = None) -> str:
        """A new sandbox directory; `repo`, a host directory, is copied to root + workdir. Only
        `host` is accepted: commands run on the host's own filesystem."""
        if self._closed:
            raise Internal("runtime is closed")
        if parse_image(image).kind != "host":
            raise BadRequest(f"image {image!r}: the dir runtime runs commands on the host; only 'host' is accepted",
                             field="image")
        limits = (limits or self.default_limits).validate()
        env = check_env(env)
        if not isinstance(workdir, str) or not workdir.startswith("/"):
            raise BadRequest("workdir must be an absolute path", field="workdir")
        workdir = "/" + files.sandbox_relpath(workdir, "/", field="workdir")
        if repo is not None and (not isinstance(repo, str) or not os.path.isdir(repo)):
            raise NotFound(f"repo {repo!r} is not a directory", field="repo")
        sid = "sb-" + secrets.token_hex(6)
        sb = _Sandbox(sid, self._path("s", sid), limits, env, workdir, f"{MARKER_VAR}={self.key}.{sid}.")

        def build() -> None:
            os.mkdir(sb.root, 0o755)
            for name, mode in _SANDBOX_DIRS.items():
                os.mkdir(os.path.join(sb.root, name))
                os.chmod(os.path.join(sb.root, name), mode)
            target = sb.root + workdir
            os.makedirs(target, exist_ok=True)
            if repo is not None:
                _copy_tree(os.path.join(repo, "."), target, keep_owner=False)

        try:
            await trio.to_thread.run_sync(build)
            sb.origin = await self._freeze(sb.root, limits, env, workdir, "o-")
        except BaseException:
            shutil.rmtree(sb.root, ignore_errors=True)
            raise
        sb.origin.refs = 1
        self._sandboxes[sid] = sb
        return sid

    async def fork(self, snapshot_id: str, *, limits: Limits | None = None) -> str:
        """A new sandbox whose directory is a copy of the snapshot."""
        if self._closed:
            raise Internal("runtime is closed")
        snap = self._snapshot(snapshot_id)
        limits = (limits or snap.limits).validate()
        sid = "sb-" + secrets.token_hex(6)
        sb = _Sandbox(sid, self._path("s", sid), limits, dict(snap.env), snap.workdir,
                      f"{MARKER_VAR}={self.key}.{sid}.", origin=snap)
        snap.refs += 1  # before the copy: a delete_snapshot meanwhile must not take it away
        try:
            await trio.to_thread.run_sync(_copy_tree, snap.path, sb.root)
        except BaseException:
            self._release(snap)
            raise
        self._sandboxes[sid] = sb
        return sid

    async def destroy(self, sandbox_id: str) -> None:
        """Kill every process of the sandbox and delete its directory (in the background)."""
        sb = self._sandbox(sandbox_id)
        del self._sandboxes[sb.id]
        with trio.CancelScope(shield=True):
            async with sb.lock:
                await self._kill_all(sb)
                if os.path.lexists(sb.root):
                    self._trash(sb.root)
                self._release(sb.origin)
                sb.origin = None

    async def aclose(self) -> None:
        if self._closed:
            return
        with trio.CancelScope(shield=True):
            for sid in list(self._sandboxes):
                await self.destroy(sid)
            self._closed = True
            for snap in list(self._snapshots.values()):
                self._release(snap)
            self._snapshots.clear()

    # ------------------------------------------------------------ snapshot / restore

    async def snapshot(self, sandbox_id: str) -> str:
        """A copy of the sandbox's directory; returns the snapshot id. Ends the sandbox's
        processes first (as ns does), so that the copy is of files nobody is writing."""
        sb = self._sandbox(sandbox_id)
        async with sb.lock:
            await self._kill_all(sb)
            snap = await self._freeze(sb.root, sb.limits, sb.env, sb.workdir, "sn-")
        snap.refs = 1
        self._snapshots[snap.id] = snap
        return snap.id

    async def restore(self, sandbox_id: str, snapshot_id: str | None = None) -> None:
        """Kill every process of the sandbox and put its files back as they were at the snapshot
        (or right after create / fork when snapshot_id is None)."""
        sb = self._sandbox(sandbox_id)
        tree = self._snapshot(snapshot_id) if snapshot_id is not None else sb.origin
        async with sb.lock:
            await self._kill_all(sb)
            fresh = f"{sb.root}.{secrets.token_hex(4)}"
            await trio.to_thread.run_sync(_copy_tree, tree.path, fresh)
            self._trash(sb.root)
            os.rename(fresh, sb.root)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        """Forget a snapshot; its copy goes once no sandbox forked from it remains."""
        snap = self._snapshot(snapshot_id)
        del self._snapshots[snap.id]
        self._release(snap)

    # ------------------------------------------------------------ exec

    async def exec(self, sandbox_id: str, argv: Sequence[str] | str, *, timeout_s: float = 600.0,
                   cwd: str | None = None, env: dict | None = None, stdin: bytes | None = None,
                   max_output_bytes: int = 1 << 20,
                   on_output: Callable[[bytes], Awaitable[None]] | None = None) -> ExecResult:
        """Run a command (argv list, or a string for /bin/sh -c) on the host, in a new session,
        with cwd under the sandbox directory (`cwd` is a sandbox path: /testbed/x is root/testbed/x).

        On timeout the command's process group, its descendants and everything carrying its
        marker are killed. Output (stdout + stderr) is capped while it streams, head + tail kept.
        """
        sb = self._sandbox(sandbox_id)
        argv = check_argv(argv)
        timeout_s = check_number(timeout_s, "timeout_s", MAX_TIMEOUT_S)
        max_output_bytes = check_size(max_output_bytes, "max_output_bytes", MAX_OUTPUT_BYTES)
        if stdin is not None and not isinstance(stdin, (bytes, bytearray, memoryview)):
            raise BadRequest("stdin must be bytes", field="stdin")
        if stdin is not None and len(stdin) > MAX_FILE_BYTES:
            raise LimitExceeded(f"stdin must be at most {MAX_FILE_BYTES} bytes", field="stdin")
        if cwd is None:
            cwd = sb.workdir
        elif not isinstance(cwd, str) or not cwd or "\0" in cwd:
            raise BadRequest("cwd must be a non-empty path", field="cwd")
        marker = sb.marker + secrets.token_hex(6)
        full_env = {**DEFAULT_ENV, "HOME": sb.root + "/root", "TMPDIR": sb.root + "/tmp", **sb.env,
                    **check_env(env), MARKER_VAR: marker.partition("=")[2]}
        start = time.perf_counter()
        deadline = trio.current_time() + timeout_s
        async with sb.lock:  # not in the middle of a restore's swap
            host_cwd = os.path.join(sb.root, files.sandbox_relpath(cwd, sb.workdir, field="cwd"))
            if not os.path.isdir(host_cwd):
                raise NotFound(f"cwd {cwd!r}: no such directory", field="cwd")
            try:
                proc = await trio.lowlevel.open_process(
                    argv, cwd=host_cwd, env=full_env, start_new_session=True,
                    stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT)
            except (FileNotFoundError, NotADirectoryError) as exc:
                raise NotFound(f"command not found: {argv[0]!r}", field="argv") from exc
            except PermissionError as exc:
                raise BadRequest(f"command {argv[0]!r}: permission denied", field="argv") from exc
        return await self._run_exec(proc, marker, stdin, deadline, start, max_output_bytes, on_output)

    async def _run_exec(self, proc: trio.Process, marker: str, stdin, deadline: float, start: float,
                        max_output_bytes: int, on_output) -> ExecResult:
        cap = OutputCap(max_output_bytes)
        out_done = trio.Event()
        timed_out = False

        async def pump_out() -> None:
            streamed = 0
            try:
                while chunk := await proc.stdout.receive_some(65536):
                    cap.feed(chunk)
                    if on_output is not None and streamed < max_output_bytes:
                        piece = chunk[: max_output_bytes - streamed]
                        streamed += len(piece)
                        await on_output(piece)
            finally:
                out_done.set()

        async def pump_in() -> None:
            try:
                await proc.stdin.send_all(bytes(stdin))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the command closed its stdin; that is its business
            finally:
                await proc.stdin.aclose()

        async def kill() -> None:
            await trio.to_thread.run_sync(kill_process_tree, (proc.pid,), marker)

        try:
            async with trio.open_nursery() as nursery:
                if proc.stdin is not None:
                    nursery.start_soon(pump_in)
                nursery.start_soon(pump_out)
                with trio.move_on_at(deadline):
                    await proc.wait()
                if proc.returncode is None:
                    timed_out = True
                    await kill()
                    with trio.move_on_after(KILL_WAIT_S):
                        await proc.wait()
                with trio.move_on_after(OUTPUT_DRAIN_S):
                    await out_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:  # cancelled by our caller: the command must not outlive the call
                    await kill()
                    with trio.move_on_after(KILL_WAIT_S):
                        await proc.wait()
                for stream in (proc.stdin, proc.stdout):
                    if stream is not None:
                        await stream.aclose()
        code = proc.returncode if proc.returncode is not None else -signal.SIGKILL
        return ExecResult(code, cap.output(), cap.truncated, timed_out, time.perf_counter() - start,
                          cap.total_bytes)

    # ------------------------------------------------------------ files

    async def _with_root(self, sb: _Sandbox, fn, *args):
        def run():
            try:
                root_fd = os.open(sb.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise Internal(f"sandbox directory is not reachable: {exc}") from exc
            try:
                return fn(root_fd, *args)
            finally:
                os.close(root_fd)

        async with sb.lock:
            return await trio.to_thread.run_sync(run)


    async def sandbox_stats(self, sandbox_id: str) -> dict:
        sb = self._sandbox(sandbox_id)
        pids, rss = await trio.to_thread.run_sync(_process_usage, sb.marker)
        disk = await trio.to_thread.run_sync(_dir_bytes, sb.root)
        # No cgroup: memory is the resident size of the live processes; limits are not enforced.
        return {"memory_bytes": rss, "memory_peak_bytes": 0, "pids": pids, "oom_kills": 0, "disk_bytes": disk,
                "disk_limit_bytes": sb.limits.disk_bytes, "limits_enforced": False}

    def stats(self) -> dict:
        """Node stats: counts of sandboxes, snapshots and frozen copies on disk."""
        return {"runtime": "dir", "isolation": False, "sandboxes": len(self._sandboxes),
                "snapshots": len(self._snapshots), "copies": self._trees,
                "pending_deletions": self._reaper.pending, "background_errors": list(self._reaper.errors[-10:])}


@asynccontextmanager
async def open_dir_runtime(state_dir: str, *, limits: Limits = Limits()) -> AsyncIterator[DirRuntime]:
    """The dir runtime, with the nursery that owns its background deletions. On start, whatever a
    crashed previous run of the same state directory left (processes, directories) is removed; on
    exit every sandbox and snapshot is, and nothing keeps running."""
    log.warning("sandboxd dir runtime: NO ISOLATION. Commands run on this host as %s, with its network "
                "and every file that user can reach; limits are not enforced. Use it only where neither "
                "the ns nor the podman runtime can run.", _whoami())
    os.makedirs(state_dir, exist_ok=True)
    async with trio.open_nursery() as nursery:
        reaper = Reaper()
        await nursery.start(reaper.run)
        rt = DirRuntime(state_dir, nursery, reaper, limits=limits)
        try:
            killed = await trio.to_thread.run_sync(rt.clean_stale)
            if killed:
                log.warning("killed %d processes left by a previous run of %s", killed, rt.state_dir)
            yield rt
        finally:
            with trio.CancelScope(shield=True):
                await rt.aclose()
                await reaper.aclose()
                for sub in ("s", "n", "trash"):
                    shutil.rmtree(rt._path(sub), ignore_errors=True)


def _whoami() -> str:
    uid = os.geteuid()
    return "root (uid 0)" if uid == 0 else f"uid {uid}"
