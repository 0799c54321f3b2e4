"""The `ns` sandbox runtime: overlayfs layers, Linux namespaces and cgroups, driven from trio.

    async with open_ns_runtime("/var/lib/sandboxd") as rt:
        sid = await rt.create("host", repo="/path/to/repo")
        snap = await rt.snapshot(sid)
        result = await rt.exec(sid, "pytest -x", timeout_s=60)
        await rt.restore(sid, snap)

Anatomy of a sandbox `S` (mounts in the private namespace of the mount thread, see mounter.py;
their layout in roots.py):

    s/S, s/S/rN  the shell (a tiny shared tmpfs) and the root in it, generation N: overlay(image
                 layers and snapshot layers, upper u/U) + the image's read-only binds
    u/U          the upper: a tmpfs of `disk_bytes` (a sandbox that fills its disk gets ENOSPC,
                 and nobody else notices); freed by unmounting it, never by walking it
    init         pid 1 of S's pid namespace, in S's mount, net (lo only), ipc, uts and cgroup
                 namespaces, forked ahead of time by the zygote (zygote.py); its root is a copy
                 of the shell (pivot_root), a mount slave of s/S: the daemon's mounts in s/S
                 propagate into it. It spawns every command (_init.py, execs.py). An idle
                 sandbox is this one process.

Restore = three steps, none waiting for another: init kills every process (kill(-1) from pid 1);
the mount thread mounts the snapshot's layers over a spare, pre-made empty upper as root
generation N+1; init mounts a /proc in it and makes it the root of later commands (once the killed
processes are reaped). The call returns once the new root is mounted; the next call on the
sandbox waits for init's answers. No process is spawned, nothing is deleted on the way:
generation N and its upper are unmounted by the mount thread when it is idle.

Snapshot = kill and reap every process, unmount generation N, and mount N+1 whose stack has N's
upper as a new read-only layer on top. A snapshot therefore ends the sandbox's processes too
(they could otherwise keep writing into what is now a shared lower layer).

Tmpfs pages are charged to the memory cgroup of whoever writes them: a sandbox's disk usage
counts against its memory limit (keep memory_bytes above disk_bytes).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Sequence

import trio

from sandboxd import files, linux, roots
from sandboxd.cgroups import CgroupLimits, Cgroups, SandboxCgroup, detect
from sandboxd.checks import check_argv, check_env, check_id, check_number, check_size
from sandboxd.errors import BadRequest, Internal, NotFound
from sandboxd.execs import (DEFAULT_ENV, MAX_OUTPUT_BYTES, MAX_TIMEOUT_S, OUTPUT_DRAIN_S,  # noqa: F401
                            ExecRequest, ExecResult, start_exec)
from sandboxd.fileapi import MAX_FILE_BYTES, FileCalls  # noqa: F401 (MAX_FILE_BYTES: re-exported)
from sandboxd.initchan import InitCall, InitChannel
from sandboxd.layers import Layer, LayerStore, overlay_options
from sandboxd.mounter import MountThread
from sandboxd.nsimages import Image, ImageStore
from sandboxd.roots import SpareUppers, Upper
from sandboxd.zygote import Zygote

__all__ = ["NsRuntime", "open_ns_runtime", "Limits", "ExecResult", "DirEntry"]

# The other runtimes (podman.py, dirrt.py) import these names from here; their homes are now
# checks.py and execs.py.
_check_argv, _check_env, _check_id, _check_number, _check_size = (check_argv, check_env, check_id,
                                                                  check_number, check_size)

DirEntry = files.DirEntry

START_TIMEOUT_S = 30.0
KILL_TIMEOUT_S = 10.0  # destroy: how long init's namespace may take to die after SIGKILL
SPARE_UPPERS = 2  # empty uppers kept ready per disk size
INIT_POOL = 4  # inits kept half-started (a group of forks takes them at once; see zygote.py)


@dataclass(frozen=True)
class Limits:
    memory_bytes: int = 4 << 30  # RAM + tmpfs disk of the whole sandbox; OOM kills inside it only
    pids: int = 1024  # processes + threads; a fork bomb stops here
    disk_bytes: int = 2 << 30  # size of the writable upper (ENOSPC past it)

    def validate(self, prefix: str = "limits") -> "Limits":
        for name in ("memory_bytes", "pids", "disk_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise BadRequest(f"{name} must be a positive integer, got {value!r}", field=f"{prefix}.{name}")
        if self.memory_bytes < 16 << 20:
            raise BadRequest("memory_bytes must be at least 16 MiB", field=f"{prefix}.memory_bytes")
        if self.pids < 8:
            raise BadRequest("pids must be at least 8", field=f"{prefix}.pids")
        return self


@dataclass
class _Snapshot:
    id: str
    stack: tuple[str, ...]
    image: Image
    limits: Limits
    env: dict[str, str]
    workdir: str


@dataclass
class _Sandbox:
    id: str
    image: Image
    limits: Limits
    env: dict[str, str]  # the image's, then create()'s
    workdir: str
    shell: str
    stack: tuple[str, ...] = ()
    origin: tuple[str, ...] = ()  # the stack right after create (restore without a snapshot)
    upper: Upper | None = None
    cgroup: SandboxCgroup | None = None
    init_pid: int = 0
    pidfd: int = -1  # init's: signals and exit without pid reuse
    chan: InitChannel | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)
    mounted: bool = False
    generation: int = 0  # the root is s/S/r<generation>
    pending: list[InitCall] = field(default_factory=list)  # a restore's requests, not yet answered

    @property
    def root(self) -> str:
        """The sandbox root as the daemon reaches it: through init's root (any thread)."""
        return f"/proc/{self.init_pid}/root/r{self.generation}"


class NsRuntime(FileCalls):
    """Sandboxes on this machine. Use `open_ns_runtime()`; every method is a trio coroutine
    except `stats()`. Ids are strings: sandboxes `sb-...`, snapshots `sn-...`."""

    def __init__(self, state_dir: str, nursery: trio.Nursery, *, cgroup_parent: str | None = None,
                 limits: Limits = Limits()) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self._nursery = nursery
        self.default_limits = limits.validate("default_limits")
        self._closed = False
        for sub in ("l", "u", "s", "z"):
            os.makedirs(os.path.join(self.state_dir, sub), exist_ok=True)
        # Mount points left by a crash are empty directories here (the mounts died with the
        # namespace); clear them.
        for sub in ("u", "s"):
            for entry in os.scandir(os.path.join(self.state_dir, sub)):
                shutil.rmtree(entry.path, ignore_errors=True)
        tag = secrets.token_hex(3) if cgroup_parent is None else ""
        self.cgroups = Cgroups(detect(), cgroup_parent or f"sandboxd-{tag}")
        self.cgroups.remove_stale()
        self.layers = LayerStore()
        self._sandboxes: dict[str, _Sandbox] = {}
        self._snapshots: dict[str, _Snapshot] = {}
        self.mounter = MountThread(self.state_dir)
        self.uppers = SpareUppers(self.mounter, SPARE_UPPERS)
        try:
            self.images = ImageStore(self.state_dir, self.layers, self.mounter)
            self.zygote = Zygote.start(self.mounter, "z", INIT_POOL)
        except BaseException:
            self.mounter.close()
            raise
        nursery.start_soon(self.zygote.receive_embryos)

    # ------------------------------------------------------------ lookups

    def _sandbox(self, sandbox_id: object) -> _Sandbox:
        if self._closed:
            raise Internal("runtime is closed")
        sb = self._sandboxes.get(check_id(sandbox_id, "sandbox_id"))
        if sb is None:
            raise NotFound(f"no sandbox {sandbox_id!r}", field="sandbox_id")
        return sb

    def _snapshot(self, snapshot_id: object) -> _Snapshot:
        snap = self._snapshots.get(check_id(snapshot_id, "snapshot_id"))
        if snap is None:
            raise NotFound(f"no snapshot {snapshot_id!r}", field="snapshot_id")
        return snap

    # ------------------------------------------------------------ uppers and layers

    def _release(self, stack: tuple[str, ...]) -> None:
        for layer in self.layers.release(stack):
            if layer.mount:
                self.mounter.background(roots.drop_mount, layer.mount)

    # ------------------------------------------------------------ lifecycle

    async def create(self, image: str = "host", *, limits: Limits | None = None, env: dict | None = None,
                     workdir: str = "/testbed", repo: str | None = None) -> str:
        """A new sandbox from an image (`host`, `dir:<path>`, `podman:<image>`); `repo`, a host
        directory, is copied to `workdir`. Returns the sandbox id."""
        limits = (limits or self.default_limits).validate()
        env = check_env(env)
        if not isinstance(workdir, str) or not workdir.startswith("/"):
            raise BadRequest("workdir must be an absolute path", field="workdir")
        workdir = "/" + files.sandbox_relpath(workdir, "/", field="workdir")
        if repo is not None and (not isinstance(repo, str) or not os.path.isdir(repo)):
            raise NotFound(f"repo {repo!r} is not a directory", field="repo")
        if self._closed:
            raise Internal("runtime is closed")
        img = await self.images.get(image)
        sb = await self._start(img, img.stack, limits, {**img.env, **env}, workdir)
        try:
            if await trio.to_thread.run_sync(self._fill_workdir, sb, repo):
                # "as created" (restore without a snapshot) includes the repository
                async with sb.lock:
                    stack = await self._freeze(sb)
                    self.layers.acquire(stack)
                    self._release(sb.origin)
                    sb.origin = stack
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.destroy(sb.id)
            raise
        return sb.id

    def _fill_workdir(self, sb: _Sandbox, repo: str | None) -> bool:
        """Make the workdir if the image lacks it and copy the repository in (every path resolved
        beneath the sandbox root: an image's symlinks cannot point the copy at the host); whether
        anything was written."""
        root_fd = os.open(sb.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if repo is not None:
                files.copy_in(root_fd, repo, sb.workdir)
                return True
            try:
                os.close(linux.openat2(root_fd, sb.workdir.lstrip("/") or ".", os.O_PATH | os.O_DIRECTORY, 0,
                                       linux.RESOLVE_BENEATH | linux.RESOLVE_NO_MAGICLINKS))
                return False
            except FileNotFoundError:
                files.make_dirs(root_fd, sb.workdir)
                return True
            except OSError as exc:
                raise BadRequest(f"workdir {sb.workdir!r} is not a directory of the image: {exc.strerror}",
                                 field="workdir") from exc
        finally:
            os.close(root_fd)

    async def fork(self, snapshot_id: str, *, limits: Limits | None = None) -> str:
        """A new sandbox whose root is the snapshot's layers (shared, not copied)."""
        snap = self._snapshot(snapshot_id)
        limits = (limits or snap.limits).validate()
        sb = await self._start(snap.image, snap.stack, limits, dict(snap.env), snap.workdir)
        return sb.id

    async def _start(self, img: Image, stack: tuple[str, ...], limits: Limits, env: dict, workdir: str) -> _Sandbox:
        if self._closed:
            raise Internal("runtime is closed")
        sid = "sb-" + secrets.token_hex(6)
        sb = _Sandbox(sid, img, limits, env, workdir, shell=f"s/{sid}")
        self.layers.acquire(stack)
        self.layers.acquire(stack)
        sb.stack = sb.origin = stack
        try:
            sb.cgroup = self.cgroups.create(sid, CgroupLimits(limits.memory_bytes, limits.pids))
            sb.upper, fresh = self.uppers.take(limits.disk_bytes)
            tree = await self.mounter.run(roots.prepare_root, sb.shell, "r0", self.layers.paths(stack),
                                          sb.upper, fresh, img.binds)
            sb.mounted = True
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sb.chan = InitChannel(ours)
            sb.chan.on_notice = lambda msg: self._on_notice(sb, msg)
            fds = [theirs.fileno(), tree]
            try:
                fds += sb.cgroup.open_dirs()
                cfg = {"root": "r0", **sb.cgroup.init_config()}
                sb.init_pid, sb.pidfd = await self.zygote.spawn(cfg, fds)
            finally:
                theirs.close()
                for fd in fds[1:]:
                    os.close(fd)
            self._nursery.start_soon(sb.chan.read_forever)
            with trio.fail_after(START_TIMEOUT_S):
                await sb.chan.ready()
            await self.zygote.replenish()
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await self.zygote.replenish()
                await self._teardown(sb)
            if isinstance(exc, trio.TooSlowError):
                raise Internal(f"sandbox init did not start within {START_TIMEOUT_S} s") from exc
            raise
        self._sandboxes[sid] = sb
        return sb

    def _on_notice(self, sb: _Sandbox, msg: dict) -> None:
        released = msg.get("released")
        if isinstance(released, str) and released.startswith("r") and sb.mounted:
            self.mounter.background(roots.drop_root, sb.shell, released)

    async def destroy(self, sandbox_id: str) -> None:
        """Kill every process of the sandbox and drop its mounts, upper and cgroup."""
        sb = self._sandbox(sandbox_id)
        del self._sandboxes[sb.id]
        with trio.CancelScope(shield=True):
            async with sb.lock:
                await self._teardown(sb)

    async def _teardown(self, sb: _Sandbox) -> None:
        if sb.chan is not None:
            sb.chan.close()
        if sb.pidfd >= 0:
            # pid 1 gone: the kernel kills the namespace, and init's exit (the pidfd readable)
            # comes only once every process in it has been reaped.
            linux.pidfd_send_signal(sb.pidfd, signal.SIGKILL)
            with trio.move_on_after(KILL_TIMEOUT_S):
                await trio.lowlevel.wait_readable(sb.pidfd)
            os.close(sb.pidfd)
            sb.pidfd = -1
        if sb.cgroup is not None:
            await trio.to_thread.run_sync(sb.cgroup.remove)
            sb.cgroup = None
        if sb.mounted:
            self.mounter.background(roots.unmount_sandbox, sb.shell)
            sb.mounted = False
        if sb.upper is not None:
            self.uppers.drop(sb.upper)
            sb.upper = None
        if sb.stack:
            self._release(sb.stack)
            sb.stack = ()
        if sb.origin:
            self._release(sb.origin)
            sb.origin = ()

    async def aclose(self) -> None:
        if self._closed:
            return
        with trio.CancelScope(shield=True):
            for sid in list(self._sandboxes):
                await self.destroy(sid)
            self._closed = True
            self.uppers.closed = True
            for snap in list(self._snapshots.values()):
                self.layers.release(snap.stack)
            self._snapshots.clear()
            self.zygote.close()
            self.mounter.close()  # the namespace, and every mount left in it, goes away
            await self.images.aclose()
            await trio.to_thread.run_sync(self.cgroups.remove_stale)
            self.cgroups.remove_parent()
            for sub in ("u", "s"):
                shutil.rmtree(os.path.join(self.state_dir, sub), ignore_errors=True)

    # ------------------------------------------------------------ snapshot / restore

    async def snapshot(self, sandbox_id: str) -> str:
        """Freeze the sandbox's files as a new read-only layer; returns the snapshot id. Ends the
        sandbox's processes (a running command would otherwise write into a shared layer)."""
        sb = self._sandbox(sandbox_id)
        async with sb.lock:
            stack = await self._freeze(sb)
            snap = _Snapshot("sn-" + secrets.token_hex(6), stack, sb.image, sb.limits, dict(sb.env), sb.workdir)
            self.layers.acquire(stack)
            self._snapshots[snap.id] = snap
            return snap.id

    async def _freeze(self, sb: _Sandbox) -> tuple[str, ...]:
        """Turn the upper into a layer on top of the stack, under a fresh upper; returns the new
        stack (call with sb.lock held)."""
        await self._settle(sb)
        # nothing may write into the layer-to-be; init lets go of the root, which goes first
        await sb.chan.request({"op": "kill_all", "wait": True, "unmount_proc": True})
        old_upper = sb.upper
        layer = Layer("L" + secrets.token_hex(4), f"{old_upper.mount}/u", mount=old_upper.mount)
        stack = (layer.id, *sb.stack)
        overlay_options(self.layers.paths(sb.stack) + [layer.path], "u", "w")  # fits? else limit
        self.layers.add(layer)
        self.layers.acquire(stack)
        upper, fresh = self.uppers.take(sb.limits.disk_bytes)
        generation = sb.generation + 1
        try:
            await self.mounter.run(roots.replace_root, sb.shell, f"r{sb.generation}", f"r{generation}",
                                   self.layers.paths(stack), upper, fresh, sb.image.binds)
        except BaseException:
            self._release(stack)
            self.uppers.drop(upper)
            raise
        self._release(sb.stack)
        sb.stack, sb.upper, sb.generation = stack, upper, generation
        await sb.chan.request({"op": "switch_root", "root": f"r{generation}"})
        return stack

    async def restore(self, sandbox_id: str, snapshot_id: str | None = None) -> None:
        """Kill every process of the sandbox and put its files back as they were at the snapshot
        (or at creation when snapshot_id is None)."""
        sb = self._sandbox(sandbox_id)
        stack = self._snapshot(snapshot_id).stack if snapshot_id is not None else sb.origin
        async with sb.lock:
            await self._settle(sb)
            # Pipelined: init kills while we mount the new root (the dying processes hold the
            # old one); it reads switch_root only once they are all reaped, and anything later on
            # the channel (every exec) after that. The next holder of the lock collects the
            # replies (and their errors, if any).
            await self._send_pending(sb, {"op": "kill_all", "wait": False})
            self.layers.acquire(stack)
            upper, fresh = self.uppers.take(sb.limits.disk_bytes)
            generation = sb.generation + 1
            try:
                await self.mounter.run(roots.mount_root, sb.shell, f"r{generation}", self.layers.paths(stack),
                                       upper, fresh, sb.image.binds)
            except BaseException:
                self._release(stack)
                self.uppers.drop(upper)
                raise
            self._release(sb.stack)
            self.uppers.drop(sb.upper)  # lazily: r<N> keeps using it until init releases r<N>
            sb.stack, sb.upper, sb.generation = stack, upper, generation
            await self._send_pending(sb, {"op": "switch_root", "root": f"r{generation}"})

    async def _send_pending(self, sb: _Sandbox, msg: dict) -> None:
        call = sb.chan.new_call()
        await sb.chan.send(call, msg)
        sb.pending.append(call)

    async def _settle(self, sb: _Sandbox) -> None:
        """Wait for a pipelined restore to finish inside the sandbox (call with sb.lock held)."""
        while sb.pending:
            call = sb.pending.pop(0)
            try:
                await call.reply()
            finally:
                sb.chan.forget(call)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        """Forget a snapshot; its layers go once no sandbox or snapshot uses them."""
        snap = self._snapshot(snapshot_id)
        del self._snapshots[snap.id]
        self._release(snap.stack)

    # ------------------------------------------------------------ exec

    async def exec(self, sandbox_id: str, argv: Sequence[str] | str, *, timeout_s: float = 600.0,
                   cwd: str | None = None, env: dict | None = None, stdin: bytes | None = None,
                   max_output_bytes: int = 1 << 20,
                   on_output: Callable[[bytes], Awaitable[None]] | None = None) -> ExecResult:
        """Run a command (argv list, or a string for /bin/sh -c) in the sandbox, in a new session.

        On timeout the command's whole process tree (its exec cgroup) is killed and the result
        says timed_out. Output (stdout + stderr) is capped while it streams: the head and the tail
        are kept. `on_output` gets chunks as they come, up to max_output_bytes in all.
        """
        sb = self._sandbox(sandbox_id)
        req = ExecRequest.check(argv, timeout_s=timeout_s, cwd=cwd, env=env, stdin=stdin,
                                max_output_bytes=max_output_bytes, workdir=sb.workdir, base_env=sb.env)
        async with sb.lock:
            await self._settle(sb)
            running = await start_exec(sb.chan, req)

        async def kill_group(group: str) -> None:
            await trio.to_thread.run_sync(sb.cgroup.kill_exec_group, group)

        return await running.finish(kill_group, on_output)

    # ------------------------------------------------------------ files

    async def _with_root(self, sb: _Sandbox, fn, *args):
        def run():
            try:
                root_fd = os.open(sb.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise Internal(f"sandbox root is not reachable: {exc}") from exc
            try:
                # /proc/<pid> named init when we opened it only if init is still alive now
                # (its pidfd cannot be fooled by a reused pid).
                if not linux.pidfd_send_signal(sb.pidfd, 0):
                    raise Internal("sandbox init is gone")
                return fn(root_fd, *args)
            finally:
                os.close(root_fd)

        async with sb.lock:
            await self._settle(sb)
            return await trio.to_thread.run_sync(run)


    async def sandbox_stats(self, sandbox_id: str) -> dict:
        sb = self._sandbox(sandbox_id)
        stats = await trio.to_thread.run_sync(sb.cgroup.stats)
        stats["disk_bytes"] = await self.mounter.run(roots.upper_usage, sb.upper.mount)
        stats["disk_limit_bytes"] = sb.limits.disk_bytes
        stats["layers"] = len(sb.stack)
        return stats

    def init_pid(self, sandbox_id: str) -> int:
        """The host pid of the sandbox's init (for nsenter and process accounting)."""
        return self._sandbox(sandbox_id).init_pid

    def stats(self) -> dict:
        """Node stats: counts of sandboxes, snapshots, layers and spare uppers."""
        return {"runtime": "ns", "cgroup_version": self.cgroups.version, "sandboxes": len(self._sandboxes),
                "snapshots": len(self._snapshots), "layers": len(self.layers),
                "spare_uppers": self.uppers.count(), "zygote_pid": self.zygote.pid,
                "zygote_embryos": self.zygote.ready,
                "background_errors": list(self.mounter.background_errors[-10:])}


@asynccontextmanager
async def open_ns_runtime(state_dir: str, *, cgroup_parent: str | None = None,
                          limits: Limits = Limits()) -> AsyncIterator[NsRuntime]:
    """The ns runtime, with the nursery that owns its per-sandbox reader tasks. On exit every
    sandbox is destroyed and every mount and cgroup removed."""
    async with trio.open_nursery() as nursery:
        rt = NsRuntime(state_dir, nursery, cgroup_parent=cgroup_parent, limits=limits)
        try:
            yield rt
        finally:
            await rt.aclose()
            nursery.cancel_scope.cancel()
