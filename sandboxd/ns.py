"""The `ns` sandbox runtime: overlayfs layers, Linux namespaces and cgroups, driven from trio.

    async with open_ns_runtime("/var/lib/sandboxd") as rt:
        sid = await rt.create("host", repo="/path/to/repo")
        snap = await rt.snapshot(sid)
        result = await rt.exec(sid, "pytest -x", timeout_s=60)
        await rt.restore(sid, snap)

Anatomy of a sandbox `S` (paths relative to the state directory, all mounts in the private
namespace of the mount thread, see mounter.py):

    s/S          the shell: a tiny tmpfs, shared, holding only the mount point `m`
    s/S/m        the root: overlay(lower = stack of layers, upper = u/U/u, work = u/U/w)
                 + the image's read-only binds (host: /usr, /etc)
    u/U          the upper: a tmpfs of `disk_bytes` (a sandbox that fills its disk gets ENOSPC,
                 and nobody else notices); freed by unmounting it, never by walking it
    init         pid 1 of S's pid namespace, in S's mount, net (lo only), ipc, uts and cgroup
                 namespaces; its root is the shell (pivot_root), and the daemon's mounts on
                 s/S/m propagate into it (it is a mount slave). It forks every command.

Restore = init kills every process (kill(-1) from pid 1) and unmounts /proc; the mount thread
detaches the old root and mounts the snapshot's layers over a spare, pre-made empty upper; init
mounts /proc. No process is spawned, nothing is deleted on the way: the old upper is unmounted
by the mount thread when it is idle.

Snapshot = the same, except that the old upper becomes a read-only layer on top of the stack.
A snapshot therefore ends the sandbox's processes too (they could otherwise keep writing into
what is now a shared lower layer).

Tmpfs pages are charged to the memory cgroup of whoever writes them: a sandbox's disk usage
counts against its memory limit (keep memory_bytes above disk_bytes).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Sequence

import trio

from sandboxd import files, linux
from sandboxd.cgroups import CgroupLimits, Cgroups, SandboxCgroup, detect
from sandboxd.errors import BadRequest, Internal, LimitExceeded, NotFound, SandboxError
from sandboxd.initchan import InitCall, InitChannel
from sandboxd.layers import (Layer, LayerStore, build_host_layer, build_sys_layer, overlay_options,
                             parse_image)
from sandboxd.mounter import MountThread
from sandboxd.output import OutputCap

__all__ = ["NsRuntime", "open_ns_runtime", "Limits", "ExecResult", "DirEntry"]

DirEntry = files.DirEntry

INIT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_init.py")
DEFAULT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
               "LANG": "C.UTF-8"}
MAX_TIMEOUT_S = 24 * 3600.0
MAX_OUTPUT_BYTES = 64 << 20
MAX_FILE_BYTES = 64 << 20  # one read_file / write_file / stdin
OUTPUT_DRAIN_S = 0.05  # after the command exits, how long background holders of its stdout may keep it open
START_TIMEOUT_S = 30.0
SPARE_UPPERS = 2  # empty uppers kept ready per disk size


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


@dataclass(frozen=True)
class ExecResult:
    exit_code: int  # negative: killed by that signal (-9 after a timeout)
    output: bytes  # stdout and stderr interleaved; head + marker + tail when truncated
    truncated: bool
    timed_out: bool
    duration_s: float
    output_bytes: int  # everything the command wrote, kept or not


@dataclass
class _Upper:
    mount: str  # "u/<id>", relative to the state directory
    size: int


@dataclass(frozen=True)
class _Image:
    name: str
    stack: tuple[str, ...]  # layer ids, topmost first
    binds: tuple[str, ...]  # host directories bound read-only at the same path


@dataclass
class _Snapshot:
    id: str
    stack: tuple[str, ...]
    image: _Image
    limits: Limits
    env: dict[str, str]
    workdir: str


@dataclass
class _Sandbox:
    id: str
    image: _Image
    limits: Limits
    env: dict[str, str]
    workdir: str
    shell: str
    stack: tuple[str, ...] = ()
    upper: _Upper | None = None
    cgroup: SandboxCgroup | None = None
    keeper: subprocess.Popen | None = None
    init_pid: int = 0
    chan: InitChannel | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)
    mounted: bool = False
    shell_made: bool = False
    pending: InitCall | None = None  # a restore's mount_proc, sent but not yet answered

    @property
    def root(self) -> str:
        """The sandbox root as the daemon reaches it: through init's root (any thread)."""
        return f"/proc/{self.init_pid}/root/m"


# ---------------------------------------------------------------- mount thread jobs
# These run on the mount thread, whose cwd is the state directory.

def _new_upper(mount: str, size: int) -> None:
    os.mkdir(mount)
    linux.mount("tmpfs", mount, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, f"size={size},mode=0755")
    os.mkdir(f"{mount}/u", 0o755)
    os.mkdir(f"{mount}/w", 0o700)


def _drop_mount(mount: str) -> None:
    linux.umount(mount, linux.MNT_DETACH)
    os.rmdir(mount)


def _make_shell(shell: str) -> None:
    os.mkdir(shell)
    linux.mount("tmpfs", shell, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "size=64k,mode=0755")
    os.mkdir(f"{shell}/m", 0o755)
    os.mkdir(f"{shell}/.old", 0o700)
    linux.mount(None, shell, None, linux.MS_SHARED)  # so that mounts on m propagate into the sandbox


def _mount_root(shell: str, lowers: list[str], upper: _Upper, fresh_upper: bool, binds: tuple[str, ...],
                replace_old: bool) -> None:
    """(Re)mount the sandbox root: detach the old one, mount overlay + read-only binds."""
    options = overlay_options(lowers, f"{upper.mount}/u", f"{upper.mount}/w")
    if fresh_upper:
        _new_upper(upper.mount, upper.size)
    target = f"{shell}/m"
    if replace_old:
        linux.umount(target, linux.MNT_DETACH)  # takes the binds below it along
    linux.mount("overlay", target, "overlay", 0, options)
    for host_dir in binds:
        sub = target + host_dir
        linux.mount(host_dir, sub, None, linux.MS_BIND)
        linux.mount(None, sub, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID
                    | linux.MS_NODEV)


def _unmount_sandbox(shell: str) -> None:
    for target in (f"{shell}/m", shell):
        try:
            linux.umount(target, linux.MNT_DETACH)
        except OSError:
            pass
    try:
        os.rmdir(shell)
    except OSError:
        pass


def _spawn_init(child_sock: socket.socket) -> subprocess.Popen:
    # From this thread, so that init starts in the private mount namespace.
    return subprocess.Popen([sys.executable, "-I", "-S", INIT_SCRIPT, str(child_sock.fileno())],
                            pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, start_new_session=True)


def _upper_usage(mount: str) -> int:
    st = os.statvfs(mount)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


# ---------------------------------------------------------------- validation

def _check_id(value: object, field_name: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{field_name} must be a non-empty string", field=field_name)
    return value


def _check_env(env: object, field_name: str = "env") -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise BadRequest("env must be a mapping of strings to strings", field=field_name)
    for k, v in env.items():
        if not isinstance(k, str) or not k or "=" in k or "\0" in k:
            raise BadRequest(f"bad environment variable name {k!r}", field=f"{field_name}.{k}")
        if not isinstance(v, str) or "\0" in v:
            raise BadRequest(f"environment variable {k} must be a string without NUL", field=f"{field_name}.{k}")
    return dict(env)


def _check_argv(argv: object) -> list[str]:
    if isinstance(argv, str):
        if not argv.strip() or "\0" in argv:
            raise BadRequest("command must be a non-empty string without NUL", field="argv")
        return ["/bin/sh", "-c", argv]
    if not isinstance(argv, (list, tuple)) or not argv:
        raise BadRequest("argv must be a non-empty list of strings or a shell command string", field="argv")
    for i, a in enumerate(argv):
        if not isinstance(a, str) or "\0" in a or (i == 0 and not a):
            raise BadRequest(f"argv[{i}] must be a string without NUL", field=f"argv[{i}]")
    return list(argv)


def _check_number(value: object, field_name: str, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise BadRequest(f"{field_name} must be a number", field=field_name)
    if value <= 0:
        raise BadRequest(f"{field_name} must be > 0, got {value}", field=field_name)
    if value > high:
        raise LimitExceeded(f"{field_name} must be <= {high}, got {value}", field=field_name)
    return float(value)


def _check_size(value: object, field_name: str, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"{field_name} must be an integer >= 0", field=field_name)
    if value > high:
        raise LimitExceeded(f"{field_name} must be <= {high}, got {value}", field=field_name)
    return value


# ---------------------------------------------------------------- the runtime

class NsRuntime:
    """Sandboxes on this machine. Use `open_ns_runtime()`; every method is a trio coroutine
    except `stats()`. Ids are strings: sandboxes `sb-...`, snapshots `sn-...`."""

    def __init__(self, state_dir: str, nursery: trio.Nursery, *, cgroup_parent: str | None = None,
                 limits: Limits = Limits()) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self._nursery = nursery
        self.default_limits = limits.validate("default_limits")
        self._closed = False
        for sub in ("l", "u", "s"):
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
        self._spares: dict[int, list[_Upper]] = {}
        self._images: dict[str, _Image] = {}
        sys_path = os.path.join(self.state_dir, "l", "sys")
        build_sys_layer(sys_path)
        self.layers.add(Layer("sys", "l/sys", pinned=True))
        host_binds = build_host_layer(os.path.join(self.state_dir, "l", "host"))
        self.layers.add(Layer("host", "l/host", pinned=True))
        self._images["host"] = _Image("host", ("host", "sys"), tuple(host_binds))
        self.mounter = MountThread(self.state_dir)

    # ------------------------------------------------------------ lookups

    def _sandbox(self, sandbox_id: object) -> _Sandbox:
        if self._closed:
            raise Internal("runtime is closed")
        sb = self._sandboxes.get(_check_id(sandbox_id, "sandbox_id"))
        if sb is None:
            raise NotFound(f"no sandbox {sandbox_id!r}", field="sandbox_id")
        return sb

    def _snapshot(self, snapshot_id: object) -> _Snapshot:
        snap = self._snapshots.get(_check_id(snapshot_id, "snapshot_id"))
        if snap is None:
            raise NotFound(f"no snapshot {snapshot_id!r}", field="snapshot_id")
        return snap

    def _image(self, name: object) -> _Image:
        ref = parse_image(name)
        if ref.kind == "host":
            return self._images["host"]
        if ref.kind == "podman":
            raise BadRequest(f"image {name!r}: podman images are not supported by the ns runtime yet",
                             field="image")
        key = f"dir:{ref.ref}"
        if key not in self._images:
            if not os.path.isdir(ref.ref):
                raise NotFound(f"image {name!r}: no such directory", field="image")
            layer_id = "d" + secrets.token_hex(4)
            self.layers.add(Layer(layer_id, ref.ref, pinned=True))
            self._images[key] = _Image(key, (layer_id, "sys"), ())
        return self._images[key]

    # ------------------------------------------------------------ uppers and layers

    def _take_upper(self, size: int) -> tuple[_Upper, bool]:
        """A spare (already mounted) upper if one is ready, else a new one to make (fresh=True)."""
        spares = self._spares.get(size)
        self._refill_spares(size)
        if spares:
            return spares.pop(), False
        return _Upper(f"u/{secrets.token_hex(5)}", size), True

    def _refill_spares(self, size: int) -> None:
        spares = self._spares.setdefault(size, [])

        def make() -> None:
            if len(spares) < SPARE_UPPERS and not self._closed:
                upper = _Upper(f"u/{secrets.token_hex(5)}", size)
                _new_upper(upper.mount, size)
                spares.append(upper)

        self.mounter.background(make)

    def _release(self, stack: tuple[str, ...]) -> None:
        for layer in self.layers.release(stack):
            if layer.mount:
                self.mounter.background(_drop_mount, layer.mount)

    def _drop_upper(self, upper: _Upper | None) -> None:
        if upper is not None:
            self.mounter.background(_drop_mount, upper.mount)

    # ------------------------------------------------------------ lifecycle

    async def create(self, image: str = "host", *, limits: Limits | None = None, env: dict | None = None,
                     workdir: str = "/testbed", repo: str | None = None) -> str:
        """A new sandbox from an image (`host`, `dir:<path>`); `repo`, a host directory, is copied
        to `workdir`. Returns the sandbox id."""
        img = self._image(image)
        limits = (limits or self.default_limits).validate()
        env = _check_env(env)
        if not isinstance(workdir, str) or not workdir.startswith("/"):
            raise BadRequest("workdir must be an absolute path", field="workdir")
        workdir = "/" + files.sandbox_relpath(workdir, "/", field="workdir")
        if repo is not None and (not isinstance(repo, str) or not os.path.isdir(repo)):
            raise NotFound(f"repo {repo!r} is not a directory", field="repo")
        sb = await self._start(img, img.stack, limits, env, workdir)
        if repo is not None:
            try:
                await trio.to_thread.run_sync(self._copy_in, sb, repo, workdir)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.destroy(sb.id)
                raise
        return sb.id

    def _copy_in(self, sb: _Sandbox, src: str, workdir: str) -> None:
        try:
            shutil.copytree(src, sb.root + workdir, symlinks=True, dirs_exist_ok=True)
        except shutil.Error as exc:
            if any("No space left" in str(e) for e in exc.args[0]):
                raise LimitExceeded("repo does not fit in the sandbox disk", field="repo") from exc
            raise Internal(f"copying repo: {exc}") from exc

    async def fork(self, snapshot_id: str, *, limits: Limits | None = None) -> str:
        """A new sandbox whose root is the snapshot's layers (shared, not copied)."""
        snap = self._snapshot(snapshot_id)
        limits = (limits or snap.limits).validate()
        sb = await self._start(snap.image, snap.stack, limits, dict(snap.env), snap.workdir)
        return sb.id

    async def _start(self, img: _Image, stack: tuple[str, ...], limits: Limits, env: dict, workdir: str) -> _Sandbox:
        if self._closed:
            raise Internal("runtime is closed")
        sid = "sb-" + secrets.token_hex(6)
        sb = _Sandbox(sid, img, limits, env, workdir, shell=f"s/{sid}")
        self.layers.acquire(stack)
        sb.stack = stack
        try:
            sb.cgroup = self.cgroups.create(sid, CgroupLimits(limits.memory_bytes, limits.pids))
            upper, fresh = self._take_upper(limits.disk_bytes)
            sb.upper = upper
            await self.mounter.run(_make_shell, sb.shell)
            sb.shell_made = True
            await self.mounter.run(_mount_root, sb.shell, self.layers.paths(stack), upper, fresh, img.binds, False)
            sb.mounted = True
            parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            cfg = {"shell": os.path.join(self.state_dir, sb.shell),
                   "cgroup_procs": sb.cgroup.init_procs_files, "exec_dirs": sb.cgroup.exec_dirs,
                   "exec_group_dir": sb.cgroup.exec_group_dir, "exec_join": sb.cgroup.exec_join,
                   "hostname": "sandbox", "parent_pid": os.getpid()}
            parent_sock.send(json.dumps(cfg).encode())
            try:
                sb.keeper = await self.mounter.run(_spawn_init, child_sock)
            finally:
                child_sock.close()
            sb.init_pid = await self._await_ready(parent_sock)
            sb.chan = InitChannel(parent_sock)
            self._nursery.start_soon(sb.chan.read_forever)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._teardown(sb)
            raise
        self._sandboxes[sid] = sb
        return sb

    async def _await_ready(self, sock: socket.socket) -> int:
        def wait() -> int:
            sock.settimeout(START_TIMEOUT_S)
            init_pid, ready = 0, False
            try:
                while not (init_pid and ready):
                    data = sock.recv(65536)
                    if not data:
                        raise Internal("sandbox init exited during start-up")
                    msg = json.loads(data)
                    if "fatal" in msg:
                        raise Internal(f"sandbox init failed: {msg['fatal']}")
                    init_pid = msg.get("init_pid", init_pid)
                    ready = ready or bool(msg.get("ready"))
            except socket.timeout as exc:
                raise Internal("sandbox init did not start in time") from exc
            sock.settimeout(None)
            return init_pid

        return await trio.to_thread.run_sync(wait)

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
        if sb.init_pid:
            try:
                os.kill(sb.init_pid, signal.SIGKILL)  # pid 1 gone: the kernel kills the namespace
            except ProcessLookupError:
                pass
        if sb.keeper is not None:
            keeper = sb.keeper
            await trio.to_thread.run_sync(keeper.wait)
        if sb.cgroup is not None:
            await trio.to_thread.run_sync(sb.cgroup.remove)
        if sb.shell_made:
            await self.mounter.run(_unmount_sandbox, sb.shell)
        if sb.mounted or sb.upper is not None:
            self._drop_upper(sb.upper)
        sb.upper = None
        if sb.stack:
            self._release(sb.stack)
            sb.stack = ()

    async def aclose(self) -> None:
        if self._closed:
            return
        with trio.CancelScope(shield=True):
            for sid in list(self._sandboxes):
                await self.destroy(sid)
            self._closed = True
            for snap in list(self._snapshots.values()):
                self.layers.release(snap.stack)
            self._snapshots.clear()
            self.mounter.close()  # the namespace, and every mount left in it, goes away
            await trio.to_thread.run_sync(self.cgroups.remove_stale)
            self.cgroups.remove_parent()
            for sub in ("u", "s"):
                shutil.rmtree(os.path.join(self.state_dir, sub), ignore_errors=True)

    # ------------------------------------------------------------ snapshot / restore

    async def _kill_all(self, sb: _Sandbox, *, wait: bool) -> None:
        await sb.chan.request({"op": "kill_all", "wait": wait})

    async def snapshot(self, sandbox_id: str) -> str:
        """Freeze the sandbox's files as a new read-only layer; returns the snapshot id. Ends the
        sandbox's processes (a running command would otherwise write into a shared layer)."""
        sb = self._sandbox(sandbox_id)
        async with sb.lock:
            await self._settle(sb)
            await self._kill_all(sb, wait=True)  # nothing may write into the upper once it is a layer
            old_upper = sb.upper
            layer = Layer("L" + secrets.token_hex(4), f"{old_upper.mount}/u", mount=old_upper.mount)
            stack = (layer.id, *sb.stack)
            overlay_options(self.layers.paths(sb.stack) + [layer.path], "u", "w")  # fits? else limit
            self.layers.add(layer)
            self.layers.acquire(stack)
            upper, fresh = self._take_upper(sb.limits.disk_bytes)
            try:
                await self.mounter.run(_mount_root, sb.shell, self.layers.paths(stack), upper, fresh,
                                       sb.image.binds, True)
            except BaseException:
                self._release(stack)
                self._drop_upper(upper)
                raise
            self._release(sb.stack)
            sb.stack, sb.upper = stack, upper
            await sb.chan.request({"op": "mount_proc"})
            snap = _Snapshot("sn-" + secrets.token_hex(6), stack, sb.image, sb.limits, dict(sb.env), sb.workdir)
            self.layers.acquire(stack)
            self._snapshots[snap.id] = snap
            return snap.id

    async def restore(self, sandbox_id: str, snapshot_id: str | None = None) -> None:
        """Kill every process of the sandbox and put its files back as they were at the snapshot
        (or at creation when snapshot_id is None)."""
        sb = self._sandbox(sandbox_id)
        stack = self._snapshot(snapshot_id).stack if snapshot_id is not None else sb.image.stack
        async with sb.lock:
            await self._settle(sb)
            await self._kill_all(sb, wait=False)  # init reaps them while we remount
            self.layers.acquire(stack)
            upper, fresh = self._take_upper(sb.limits.disk_bytes)
            try:
                await self.mounter.run(_mount_root, sb.shell, self.layers.paths(stack), upper, fresh,
                                       sb.image.binds, True)
            except BaseException:
                self._release(stack)
                self._drop_upper(upper)
                raise
            self._release(sb.stack)
            self._drop_upper(sb.upper)
            sb.stack, sb.upper = stack, upper
            # Pipelined: init reads this only once every killed process is reaped, and anything
            # later on the channel (every exec) comes after it; the next holder of the lock
            # collects the reply (and its error, if any).
            sb.pending = sb.chan.new_call()
            await sb.chan.send(sb.pending, {"op": "mount_proc"})

    async def _settle(self, sb: _Sandbox) -> None:
        """Wait for a pipelined restore to finish inside the sandbox (call with sb.lock held)."""
        if sb.pending is not None:
            call, sb.pending = sb.pending, None
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
        argv = _check_argv(argv)
        timeout_s = _check_number(timeout_s, "timeout_s", MAX_TIMEOUT_S)
        max_output_bytes = _check_size(max_output_bytes, "max_output_bytes", MAX_OUTPUT_BYTES)
        if stdin is not None and not isinstance(stdin, (bytes, bytearray, memoryview)):
            raise BadRequest("stdin must be bytes", field="stdin")
        if stdin is not None and len(stdin) > MAX_FILE_BYTES:
            raise LimitExceeded(f"stdin must be at most {MAX_FILE_BYTES} bytes", field="stdin")
        if cwd is None:
            cwd = sb.workdir
        elif not isinstance(cwd, str) or not cwd or "\0" in cwd:
            raise BadRequest("cwd must be a non-empty path", field="cwd")
        cwd = "/" + files.sandbox_relpath(cwd, sb.workdir, field="cwd")
        full_env = {**DEFAULT_ENV, **sb.env, **_check_env(env)}

        start = time.perf_counter()
        deadline = trio.current_time() + timeout_s
        stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        try:
            async with sb.lock:
                await self._settle(sb)
                call = sb.chan.new_call()
                try:
                    await sb.chan.send(call, {"op": "exec", "argv": argv, "env": full_env, "cwd": cwd},
                                       (stdin_r, out_w))
                finally:
                    os.close(stdin_r)
                    os.close(out_w)
                    stdin_r = out_w = -1
            try:
                reply = await call.reply()
            except SandboxError:
                sb.chan.forget(call)
                raise
        except BaseException:
            for fd in (stdin_r, out_w, stdin_w, out_r):
                if fd >= 0:
                    os.close(fd)
            raise
        return await self._run_exec(sb, call, reply["group"], stdin_w, out_r, stdin, deadline, start,
                                    max_output_bytes, on_output)

    async def _run_exec(self, sb, call, group, stdin_w, out_r, stdin, deadline, start, max_output_bytes,
                        on_output) -> ExecResult:
        cap = OutputCap(max_output_bytes)
        out_stream = trio.lowlevel.FdStream(out_r)
        in_stream = trio.lowlevel.FdStream(stdin_w)
        out_done = trio.Event()
        timed_out = False
        exit_code: int | None = None

        async def pump_out() -> None:
            streamed = 0
            try:
                while chunk := await out_stream.receive_some(65536):
                    cap.feed(chunk)
                    if on_output is not None and streamed < max_output_bytes:
                        piece = chunk[: max_output_bytes - streamed]
                        streamed += len(piece)
                        await on_output(piece)
            finally:
                out_done.set()

        async def pump_in() -> None:
            try:
                if stdin:
                    await in_stream.send_all(bytes(stdin))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the command closed its stdin; that is its business
            finally:
                await in_stream.aclose()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump_in)
                nursery.start_soon(pump_out)
                with trio.move_on_at(deadline):
                    exit_code = await call.exited()
                if exit_code is None:
                    timed_out = True
                    await trio.to_thread.run_sync(sb.cgroup.kill_exec_group, group)
                    with trio.move_on_after(5.0):
                        exit_code = await call.exited()
                with trio.move_on_after(OUTPUT_DRAIN_S):
                    await out_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if exit_code is None and not call.has_exited:
                    # cancelled by our caller: the command must not outlive the call
                    try:
                        await trio.to_thread.run_sync(sb.cgroup.kill_exec_group, group)
                    except OSError:
                        pass
                    sb.chan.forget(call)
                await out_stream.aclose()
        return ExecResult(exit_code if exit_code is not None else -signal.SIGKILL, cap.output(),
                          cap.truncated, timed_out, time.perf_counter() - start, cap.total_bytes)

    # ------------------------------------------------------------ files

    async def _with_root(self, sb: _Sandbox, fn, *args):
        def run():
            try:
                root_fd = os.open(sb.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise Internal(f"sandbox root is not reachable: {exc}") from exc
            try:
                return fn(root_fd, *args)
            finally:
                os.close(root_fd)

        async with sb.lock:
            await self._settle(sb)
            return await trio.to_thread.run_sync(run)

    async def read_file(self, sandbox_id: str, path: str, *, max_bytes: int = MAX_FILE_BYTES) -> bytes:
        sb = self._sandbox(sandbox_id)
        max_bytes = _check_size(max_bytes, "max_bytes", MAX_FILE_BYTES)
        return await self._with_root(sb, files.read_file, path, sb.workdir, max_bytes)

    async def write_file(self, sandbox_id: str, path: str, data: bytes, *, mode: int = 0o644,
                         parents: bool = True) -> None:
        sb = self._sandbox(sandbox_id)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise BadRequest("data must be bytes", field="data")
        if len(data) > MAX_FILE_BYTES:
            raise LimitExceeded(f"data must be at most {MAX_FILE_BYTES} bytes", field="data")
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise BadRequest("mode must be an integer permission mode, e.g. 0o644", field="mode")
        await self._with_root(sb, files.write_file, path, sb.workdir, bytes(data), mode, bool(parents))

    async def list_dir(self, sandbox_id: str, path: str = ".", *, max_entries: int = 10000
                       ) -> tuple[list[DirEntry], bool]:
        """Entries sorted by name, and whether there were more than max_entries."""
        sb = self._sandbox(sandbox_id)
        max_entries = _check_size(max_entries, "max_entries", 1_000_000)
        return await self._with_root(sb, files.list_dir, path, sb.workdir, max_entries)

    # ------------------------------------------------------------ diff, stats

    async def diff(self, sandbox_id: str, base_commit: str, *, timeout_s: float = 120.0) -> str:
        """`git diff` of the repository at workdir against base_commit, untracked files included
        (the model's patch). The repository's own index is left untouched."""
        sb = self._sandbox(sandbox_id)
        if not isinstance(base_commit, str) or not base_commit or base_commit.startswith("-") or any(
                c.isspace() or c == "\0" for c in base_commit):
            raise BadRequest("base_commit must be a commit-ish", field="base_commit")
        script = ('set -e; idx=$(mktemp); trap \'rm -f "$idx"\' EXIT; '
                  'cp "$(git rev-parse --git-dir)/index" "$idx" 2>/dev/null || true; '
                  'git rev-parse --verify --quiet "$1^{commit}" >/dev/null || { echo "unknown commit $1" >&2; exit 3; }; '
                  'GIT_INDEX_FILE="$idx" git add -A; '
                  'GIT_INDEX_FILE="$idx" git diff --cached --binary --no-color --no-ext-diff "$1"')
        argv = ["/bin/sh", "-c", script, "diff", base_commit]
        env = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.directory", "GIT_CONFIG_VALUE_0": "*"}
        res = await self.exec(sb.id, argv, timeout_s=timeout_s, env=env, max_output_bytes=MAX_OUTPUT_BYTES)
        if res.timed_out:
            raise LimitExceeded("git diff timed out", field="timeout_s")
        if res.exit_code == 3:
            raise NotFound(f"unknown commit {base_commit!r}", field="base_commit")
        if res.exit_code != 0:
            raise Internal(f"git diff failed ({res.exit_code}): {res.output[-2000:].decode(errors='replace')}")
        if res.truncated:
            raise LimitExceeded("diff larger than the output cap", field="base_commit")
        return res.output.decode(errors="surrogateescape")

    async def sandbox_stats(self, sandbox_id: str) -> dict:
        sb = self._sandbox(sandbox_id)
        stats = await trio.to_thread.run_sync(sb.cgroup.stats)
        stats["disk_bytes"] = await self.mounter.run(_upper_usage, sb.upper.mount)
        stats["disk_limit_bytes"] = sb.limits.disk_bytes
        stats["layers"] = len(sb.stack)
        return stats

    def stats(self) -> dict:
        """Node stats: counts of sandboxes, snapshots, layers and spare uppers."""
        return {"runtime": "ns", "cgroup_version": self.cgroups.version, "sandboxes": len(self._sandboxes),
                "snapshots": len(self._snapshots), "layers": len(self.layers),
                "spare_uppers": sum(len(v) for v in self._spares.values()),
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

