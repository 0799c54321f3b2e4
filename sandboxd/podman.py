"""The `podman` sandbox runtime: one podman container per sandbox, through podman-py.

    async with open_podman_runtime("/var/lib/sandboxd-podman") as rt:
        sid = await rt.create("podman:localhost/swe:django", repo="/path/to/repo")
        result = await rt.exec(sid, "pytest -x", timeout_s=60)

The compatibility baseline, and the fallback where `ns` cannot run. Same interface, ids, errors
and result types as NsRuntime (sandboxd/ns.py).

The runtime starts its own API service, `podman system service --time=0 unix://<state>/podman.sock`,
with CONTAINERS_CONF pointing to a containers.conf it writes in the state directory (OCI runtime
`runc`: crun fails on hybrid cgroups v1), and stops it on exit (or uses one given by URL). Images
come from podman's own store, never a registry: `podman:<name>` (loaded or imported beforehand,
see podman_setup.import_rootfs) and `host`, a skeleton image whose containers bind the host's
/usr, /etc, ... read-only (podman_setup.ensure_host_image).

A sandbox is a container running `sleep` under podman's init (catatonit), with no network
(loopback only), memory (swap included) and pids limits, and the lowered ulimits podman needs here
(nofile 1024, nproc 4096). Every container and image the runtime makes carries the label
sandboxd.state=<state key>; on start, those left by a crash are removed.

    exec      podman exec through the API, output demultiplexed and capped while it streams.
              Every command carries SANDBOXD_EXEC=<state>.<sandbox>.<exec> in its environment; on
              timeout the exec's process, its descendants and everything carrying its marker are
              killed from the host (dirrt.kill_process_tree): setsid and double forks do not escape.
    snapshot  kill the sandbox's processes (as ns does), `podman commit` (paused) to a new image.
    restore   kill the container and start a new one from the snapshot's image (or the sandbox's
              origin: its image right after create); the old one is removed in the background.
    fork      a new container from the snapshot's image (image layers are shared, not copied).
    files     openat2(RESOLVE_BENEATH) under /proc/<container init>/root with sandboxd.files: the
              same checks and errors as ns, no API round trip. This needs the daemon on the
              container's host, as root (or as the rootless podman user).
    wrapper   every command runs under /bin/sh (the image needs one): stderr joined to stdout,
              stdin read from a file staged on a small tmpfs at /run/sandboxd.

Snapshot images are reference counted (snapshots, origins, running containers) and removed when
unused. disk_bytes is not enforced (overlay on ext4 has no quota); sandbox_stats reports the usage.
Exit codes of commands killed by a signal are 128 + signal (podman reports no signal), except
after a timeout (-9, as ns).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import AsyncIterator, Awaitable, Callable, Sequence

import podman as podman_py
import podman.errors as podman_errors
import requests
import trio
from podman.api import stream_frames

from sandboxd import files, linux, podman_setup
from sandboxd.checks import check_argv, check_env, check_id, check_number, check_size
from sandboxd.dirrt import MARKER_VAR, Reaper, kill_process_tree, state_key
from sandboxd.errors import BadRequest, Internal, LimitExceeded, NotFound, SandboxError
from sandboxd.fileapi import FileCalls
from sandboxd.layers import parse_image
from sandboxd.ns import (DEFAULT_ENV, MAX_FILE_BYTES, MAX_OUTPUT_BYTES, MAX_TIMEOUT_S, ExecResult,
                         Limits)
from sandboxd.output import OutputCap

__all__ = ["PodmanRuntime", "open_podman_runtime", "LABEL", "SNAPSHOT_REPO", "ULIMITS"]

log = logging.getLogger("sandboxd.podman")

LABEL = "sandboxd.state"  # = state key, on every container and image this runtime makes
SNAPSHOT_REPO = "localhost/sandboxd-snap"
KEEPER = ["sleep", "2147483647"]  # the container's main process (under catatonit); busybox has it too
ULIMITS = [{"Name": "nofile", "Soft": 1024, "Hard": 1024}, {"Name": "nproc", "Soft": 4096, "Hard": 4096}]
STDIN_DIR = "/run/sandboxd"
STDIN_DIR_BYTES = MAX_FILE_BYTES + (1 << 20)
START_TIMEOUT_S = 30.0  # for the API service to answer
KILL_WAIT_S = 5.0  # after killing an exec's processes, how long its stream may take to end
_RESOLVE_IN_ROOT = linux.RESOLVE_IN_ROOT | linux.RESOLVE_NO_MAGICLINKS
# Every command runs under this: stderr into stdout (one stream, interleaved as written, as in ns;
# podman would carry two), stdin from its staged file, a command that is not there told apart.
_WRAPPER = ('exec 2>&1; '
            'if [ -n "$SANDBOXD_STDIN" ]; then exec 0<"$SANDBOXD_STDIN" || exit 126; fi; '
            'unset SANDBOXD_STDIN; '
            'command -v "$1" >/dev/null || { printf "\\0sandboxd: command not found\\n"; exit 127; }; '
            'exec "$@"')
_NOT_FOUND = b"\0sandboxd: command not found\n"


@dataclass(frozen=True)
class _Image:
    name: str  # as the caller wrote it: host, podman:<name>
    ref: str  # podman image id
    binds: tuple[str, ...]  # host directories bound read-only at the same path
    env: dict[str, str]  # the container's environment: DEFAULT_ENV under the image's own ENV


@dataclass
class _Snapshot:
    id: str
    ref: str  # podman image id (ours)
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
    marker: str  # MARKER_VAR=<state>.<id>. : prefix of every exec marker of this sandbox
    origin: str = ""  # image id that restore() with no snapshot goes back to
    container: str = ""  # container id; "" once broken (a restore could not start a new one)
    container_ref: str = ""  # image id the container was made from
    pid: int = 0  # host pid of the container's init: /proc/<pid>/root is the sandbox root
    generation: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)


class _ExecCall:
    """One running podman exec: what its streaming thread and the trio side share."""

    def __init__(self, cap: OutputCap, send: trio.MemorySendChannel, stream_bytes: int) -> None:
        self.cap = cap
        self.send = send
        self.stream_left = stream_bytes  # bytes still to hand to on_output
        self.exec_id = ""
        self.response = None
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self.done = False  # the streaming thread has returned
        self.aborted = False

    def feed(self, chunk: bytes) -> None:  # in the streaming thread
        self.cap.feed(chunk)
        if self.stream_left > 0:
            piece = chunk[: self.stream_left]
            self.stream_left -= len(piece)
            try:
                trio.from_thread.run_sync(self.send.send_nowait, piece)
            except (trio.RunFinishedError, trio.BrokenResourceError, trio.ClosedResourceError):
                self.stream_left = 0

    def abort(self) -> None:
        """Unblock the streaming thread: shut its socket down (a close from another thread would
        not wake a blocked read)."""
        self.aborted = True
        conn = getattr(getattr(self.response, "raw", None), "_connection", None)
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _api_error(exc: Exception, what: str) -> SandboxError:
    return Internal(f"podman: {what}: {getattr(exc, 'explanation', None) or exc}")


class PodmanRuntime(FileCalls):
    """Sandboxes as podman containers. Use `open_podman_runtime()`; every method is a trio
    coroutine except `stats()`. Ids: sandboxes `sb-...`, snapshots `sn-...`."""

    def __init__(self, state_dir: str, client: podman_py.PodmanClient, reaper: Reaper, *,
                 limits: Limits = Limits(), podman_env: dict[str, str] | None = None,
                 podman_bin: str = "podman") -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.key = state_key(self.state_dir)
        self.default_limits = limits.validate("default_limits")
        self._client = client
        self._api = client.api
        self._reaper = reaper
        self._podman_env = podman_env
        self._podman_bin = podman_bin
        self._closed = False
        self._sandboxes: dict[str, _Sandbox] = {}
        self._snapshots: dict[str, _Snapshot] = {}
        self._images: dict[str, _Image] = {}
        self._image_lock = trio.Lock()
        self._refs: dict[str, int] = {}  # our images (snapshots, origins) -> users
        self.version = ""

    # ------------------------------------------------------------ start-up

    def clean_stale(self) -> tuple[int, int]:
        """Remove the containers and images a previous run of this state directory left (a
        crash). Blocking; returns how many of each."""
        self.version = self._api.get("/_ping").headers.get("Libpod-Api-Version", "")  # version() takes 0.5 s
        label = {"label": f"{LABEL}={self.key}"}
        containers = self._client.containers.list(all=True, filters=label)
        for ct in containers:
            self._remove_container(ct.id)
        removed = 0
        for _ in range(10):  # a parent image is only untagged while a child exists: go round again
            found = self._client.images.list(all=True, filters=label)
            if not found:
                break
            for im in found:
                try:
                    self._client.images.remove(im.id, force=True)
                    removed += 1
                except podman_errors.ImageNotFound:
                    pass
        return len(containers), removed

    # ------------------------------------------------------------ lookups

    def _sandbox(self, sandbox_id: object) -> _Sandbox:
        if self._closed:
            raise Internal("runtime is closed")
        sb = self._sandboxes.get(check_id(sandbox_id, "sandbox_id"))
        if sb is None:
            raise NotFound(f"no sandbox {sandbox_id!r}", field="sandbox_id")
        if not sb.container:
            raise Internal(f"sandbox {sb.id} has no container (a restore failed); destroy it")
        return sb

    def _snapshot(self, snapshot_id: object) -> _Snapshot:
        snap = self._snapshots.get(check_id(snapshot_id, "snapshot_id"))
        if snap is None:
            raise NotFound(f"no snapshot {snapshot_id!r}", field="snapshot_id")
        return snap

    async def _image(self, name: object) -> _Image:
        ref = parse_image(name)
        if ref.kind == "dir":
            raise BadRequest(f"image {name!r}: the podman runtime takes host or podman:<image> "
                             "(import a directory with sandboxd.podman_setup.import_rootfs)", field="image")
        async with self._image_lock:
            if name not in self._images:
                self._images[name] = await trio.to_thread.run_sync(self._load_image, name, ref.kind, ref.ref)
        return self._images[name]

    def _load_image(self, name: str, kind: str, ref: str) -> _Image:
        binds: list[str] = []
        if kind == "host":
            ref, binds = podman_setup.ensure_host_image(podman=self._podman_bin, env=self._podman_env)
        try:
            image = self._client.images.get(ref)
        except podman_errors.ImageNotFound as exc:
            raise NotFound(f"image {name!r}: no such image in podman's store (no registry is used)",
                           field="image") from exc
        image_env = dict(e.partition("=")[::2] for e in (image.attrs.get("Config") or {}).get("Env") or [])
        return _Image(name, image.id, tuple(binds), {**DEFAULT_ENV, **image_env})

    # ------------------------------------------------------------ image references

    def _acquire(self, ref: str) -> None:
        if ref in self._refs:
            self._refs[ref] += 1

    def _release(self, ref: str) -> None:
        if ref not in self._refs:
            return  # a base image: not ours
        self._refs[ref] -= 1
        if self._refs[ref] == 0:
            del self._refs[ref]
            self._reaper.submit(self._remove_image, ref)  # after any container removal queued before

    def _remove_image(self, ref: str) -> None:
        try:
            self._client.images.remove(ref, force=False)
        except podman_errors.ImageNotFound:
            pass

    # ------------------------------------------------------------ containers (blocking)

    def _start_container(self, sb: _Sandbox, ref: str, name: str) -> tuple[str, int]:
        mounts = [{"type": "bind", "source": d, "target": d, "read_only": True} for d in sb.image.binds]
        mounts.append({"type": "tmpfs", "source": "tmpfs", "target": STDIN_DIR, "size": str(STDIN_DIR_BYTES),
                       "mode": "1777"})
        try:
            ct = self._client.containers.create(
                ref, KEEPER[1:], entrypoint=KEEPER[:1], name=name, hostname="sandbox", network_mode="none",
                init=True, ulimits=ULIMITS, mem_limit=sb.limits.memory_bytes, memswap_limit=sb.limits.memory_bytes,
                pids_limit=sb.limits.pids, environment={**sb.image.env, **sb.env}, mounts=mounts,
                labels={LABEL: self.key, "sandboxd.sandbox": sb.id})
        except podman_errors.APIError as exc:
            raise _api_error(exc, "creating the container") from exc
        try:
            ct.start()
            ct.reload()
            return ct.id, int(ct.attrs["State"]["Pid"])
        except BaseException as exc:
            self._remove_container(ct.id)
            if isinstance(exc, podman_errors.APIError):
                raise _api_error(exc, "starting the container") from exc
            raise

    def _kill_container(self, cid: str) -> None:
        # Killed first: a forced remove of a running container waits out the 10 s stop timeout.
        self._api.post(f"/containers/{cid}/kill", params={"signal": "KILL"})

    def _remove_container(self, cid: str) -> None:
        self._kill_container(cid)
        resp = self._api.delete(f"/containers/{cid}", params={"force": True, "v": True})
        if not resp.ok and resp.status_code != 404:
            raise Internal(f"podman: removing container {cid[:12]}: {resp.text[:500]}")

    def _commit(self, cid: str, tag: str) -> str:
        resp = self._api.post("/commit", params={"container": cid, "repo": SNAPSHOT_REPO, "tag": tag,
                                                 "pause": True, "changes": [f"LABEL {LABEL}={self.key}"]})
        resp.raise_for_status()
        return resp.json()["Id"]

    def _copy_in(self, cid: str, repo: str | None, workdir: str) -> None:
        """Put the repo (or just an empty workdir) at workdir: one tar through the archive API,
        owned by root as in ns (copytree as root)."""
        def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            return info

        tmp_dir = os.path.join(self.state_dir, "tmp")
        os.makedirs(tmp_dir, exist_ok=True)
        path = os.path.join(tmp_dir, f"copy-{secrets.token_hex(6)}.tar")
        try:
            with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
                if repo is not None:
                    tar.add(repo, arcname=workdir.lstrip("/") or ".", filter=as_root)
                else:
                    info = tarfile.TarInfo(workdir.lstrip("/"))
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
                    tar.addfile(info)
            with open(path, "rb") as f:
                resp = self._api.put(f"/containers/{cid}/archive", params={"path": "/"}, data=f)
            if not resp.ok:
                if "no space" in resp.text.lower():
                    raise LimitExceeded("repo does not fit in the sandbox disk", field="repo")
                raise Internal(f"podman: copying the repo in: {resp.text[:500]}")
        finally:
            os.unlink(path)

    # ------------------------------------------------------------ create, fork, destroy

    async def create(self, image: str = "host", *, limits: Limits | None = None, env: dict | None = None,
                     workdir: str = "/testbed", repo: str | None = None) -> str:
        """A new sandbox from an image (`host`, `podman:<name>`); `repo`, a host directory, is
        copied to `workdir`. Returns the sandbox id."""
        if self._closed:
            raise Internal("runtime is closed")
        img = await self._image(image)
        limits = (limits or self.default_limits).validate()
        env = check_env(env)
        if not isinstance(workdir, str) or not workdir.startswith("/"):
            raise BadRequest("workdir must be an absolute path", field="workdir")
        workdir = "/" + files.sandbox_relpath(workdir, "/", field="workdir")
        if repo is not None and (not isinstance(repo, str) or not os.path.isdir(repo)):
            raise NotFound(f"repo {repo!r} is not a directory", field="repo")
        sb = self._new_sandbox(img, limits, env, workdir)
        sb.origin = img.ref
        await self._run(sb, img.ref)
        try:
            if repo is not None or not await self._with_root(sb, _is_dir, workdir, lock=False):
                await trio.to_thread.run_sync(self._copy_in, sb.container, repo, workdir)
                # restore() with no snapshot goes back to here, repository included
                sb.origin = await trio.to_thread.run_sync(self._commit, sb.container, f"{self.key}-{sb.id}-origin")
                self._refs[sb.origin] = 1
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._teardown(sb)
            raise
        self._sandboxes[sb.id] = sb
        return sb.id

    async def fork(self, snapshot_id: str, *, limits: Limits | None = None) -> str:
        """A new sandbox (container) from the snapshot's image."""
        if self._closed:
            raise Internal("runtime is closed")
        snap = self._snapshot(snapshot_id)
        limits = (limits or snap.limits).validate()
        sb = self._new_sandbox(snap.image, limits, dict(snap.env), snap.workdir)
        sb.origin = snap.ref
        self._acquire(snap.ref)
        try:
            await self._run(sb, snap.ref)
        except BaseException:
            self._release(snap.ref)
            raise
        self._sandboxes[sb.id] = sb
        return sb.id

    def _new_sandbox(self, img: _Image, limits: Limits, env: dict, workdir: str) -> _Sandbox:
        sid = "sb-" + secrets.token_hex(6)
        return _Sandbox(sid, img, limits, env, workdir, f"{MARKER_VAR}={self.key}.{sid}.")

    async def _run(self, sb: _Sandbox, ref: str) -> None:
        """Start the sandbox's container from image `ref` (holding a reference on it)."""
        sb.generation += 1
        name = f"sandboxd-{self.key}-{sb.id}-{sb.generation}"
        self._acquire(ref)
        try:
            sb.container, sb.pid = await trio.to_thread.run_sync(self._start_container, sb, ref, name)
        except BaseException:
            self._release(ref)
            raise
        sb.container_ref = ref

    async def destroy(self, sandbox_id: str) -> None:
        """Kill the sandbox's container and remove it (in the background)."""
        sb = self._sandboxes.get(check_id(sandbox_id, "sandbox_id"))
        if sb is None:
            raise NotFound(f"no sandbox {sandbox_id!r}", field="sandbox_id")
        del self._sandboxes[sb.id]
        with trio.CancelScope(shield=True):
            async with sb.lock:
                await self._teardown(sb)

    async def _teardown(self, sb: _Sandbox) -> None:
        if sb.container:
            await trio.to_thread.run_sync(self._kill_container, sb.container)
            self._reaper.submit(self._remove_container, sb.container)
            sb.container = ""
            self._release(sb.container_ref)
        if sb.origin:
            self._release(sb.origin)
            sb.origin = ""

    async def aclose(self) -> None:
        if self._closed:
            return
        with trio.CancelScope(shield=True):
            for sid in list(self._sandboxes):
                await self.destroy(sid)
            self._closed = True
            for snap in list(self._snapshots.values()):
                self._release(snap.ref)
            self._snapshots.clear()

    # ------------------------------------------------------------ snapshot / restore

    async def snapshot(self, sandbox_id: str) -> str:
        """Commit the sandbox's container to a new image; returns the snapshot id. Ends the
        sandbox's processes first, as ns does."""
        sb = self._sandbox(sandbox_id)
        async with sb.lock:
            await trio.to_thread.run_sync(kill_process_tree, (), sb.marker)
            snap = _Snapshot("sn-" + secrets.token_hex(6), "", sb.image, sb.limits, dict(sb.env), sb.workdir)
            try:
                snap.ref = await trio.to_thread.run_sync(self._commit, sb.container, f"{self.key}-{snap.id}")
            except podman_errors.APIError as exc:
                raise _api_error(exc, "commit") from exc
        self._refs[snap.ref] = self._refs.get(snap.ref, 0) + 1
        self._snapshots[snap.id] = snap
        return snap.id

    async def restore(self, sandbox_id: str, snapshot_id: str | None = None) -> None:
        """Kill every process of the sandbox and put its files back as they were at the snapshot
        (or right after create / fork when snapshot_id is None): a new container."""
        sb = self._sandbox(sandbox_id)
        ref = self._snapshot(snapshot_id).ref if snapshot_id is not None else sb.origin
        async with sb.lock:
            old, old_ref = sb.container, sb.container_ref
            try:
                async with trio.open_nursery() as nursery:  # kill the old, start the new, at once
                    nursery.start_soon(trio.to_thread.run_sync, self._kill_container, old)
                    await self._run(sb, ref)
            except BaseException:
                if sb.container == old:
                    sb.container = ""  # no new container: the sandbox is broken, destroy is all it takes
                raise
            finally:
                self._reaper.submit(self._remove_container, old)
                self._release(old_ref)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        """Forget a snapshot; its image goes once no sandbox uses it."""
        snap = self._snapshot(snapshot_id)
        del self._snapshots[snap.id]
        self._release(snap.ref)

    # ------------------------------------------------------------ exec

    async def exec(self, sandbox_id: str, argv: Sequence[str] | str, *, timeout_s: float = 600.0,
                   cwd: str | None = None, env: dict | None = None, stdin: bytes | None = None,
                   max_output_bytes: int = 1 << 20,
                   on_output: Callable[[bytes], Awaitable[None]] | None = None) -> ExecResult:
        """Run a command (argv list, or a string for /bin/sh -c) in the sandbox (podman exec).

        On timeout the command's whole process tree is killed and the result says timed_out.
        Output (stdout + stderr) is capped while it streams: the head and the tail are kept.
        `on_output` gets chunks as they come, up to max_output_bytes in all.
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
        cwd = "/" + files.sandbox_relpath(cwd, sb.workdir, field="cwd")
        marker = sb.marker + secrets.token_hex(6)
        exec_env = {**check_env(env), MARKER_VAR: marker.partition("=")[2]}

        start = time.perf_counter()
        deadline = trio.current_time() + timeout_s
        send, recv = trio.open_memory_channel(math.inf)  # bounded in bytes: max_output_bytes in all
        call = _ExecCall(OutputCap(max_output_bytes), send, max_output_bytes if on_output else 0)
        async with sb.lock:
            if not await self._with_root(sb, _is_dir, cwd, lock=False):
                raise NotFound(f"cwd {cwd!r}: no such directory", field="cwd")
            if stdin:
                path = f"{STDIN_DIR}/{marker.rpartition('.')[2]}"
                await self._with_root(sb, files.write_file, path, "/", bytes(stdin), 0o644, False, lock=False)
                exec_env["SANDBOXD_STDIN"] = path
            body = {"AttachStdout": True, "AttachStderr": True, "Cmd": ["/bin/sh", "-c", _WRAPPER, "sandboxd", *argv],
                    "WorkingDir": cwd, "Env": [f"{k}={v}" for k, v in exec_env.items()]}
            await trio.to_thread.run_sync(self._exec_start, sb.container, body, call)
        try:
            res = await self._run_exec(call, recv, marker, deadline, start, on_output)
        finally:
            if stdin:
                with trio.CancelScope(shield=True):
                    await self._drop_staged(sb, exec_env["SANDBOXD_STDIN"])
        if res.exit_code == 127 and res.output == _NOT_FOUND:
            raise NotFound(f"command not found: {argv[0]!r}", field="argv")
        if res.exit_code in (126, 127) and res.output.startswith(b"Error: ") and b"OCI runtime" in res.output:
            raise Internal(f"the sandbox's image cannot run commands (it needs /bin/sh): {res.output[:500]!r}")
        return res

    async def _drop_staged(self, sb: _Sandbox, path: str) -> None:
        def unlink(root_fd: int) -> None:
            parent = linux.openat2(root_fd, STDIN_DIR.lstrip("/"), os.O_PATH | os.O_DIRECTORY, 0, _RESOLVE_IN_ROOT)
            try:
                os.unlink(os.path.basename(path), dir_fd=parent)
            finally:
                os.close(parent)

        try:
            await self._with_root(sb, unlink, lock=False)
        except (OSError, SandboxError):
            pass  # the container is gone (restored, destroyed), and its tmpfs with it

    def _exec_start(self, cid: str, body: dict, call: _ExecCall) -> None:
        resp = self._api.post(f"/containers/{cid}/exec", data=json.dumps(body))
        if not resp.ok:
            raise Internal(f"podman: exec in container {cid[:12]}: {resp.text[:500]}")
        call.exec_id = resp.json()["Id"]
        call.response = self._api.post(f"/exec/{call.exec_id}/start", data=json.dumps({"Detach": False, "Tty": False}),
                                       stream=True)
        if not call.response.ok:
            raise Internal(f"podman: starting exec: {call.response.text[:500]}")

    def _exec_stream(self, call: _ExecCall) -> None:
        """In a worker thread: read the exec's frames to the end, then its exit code."""
        try:
            for out, err in stream_frames(call.response, demux=True):
                call.feed(out or err or b"")
            call.response.close()
            info = self._api.get(f"/exec/{call.exec_id}/json")
            if info.ok:
                call.exit_code = info.json().get("ExitCode")
        except (OSError, requests.RequestException, podman_errors.APIError) as exc:
            if not call.aborted:
                call.error = exc
        finally:
            call.done = True

    def _kill_exec(self, call: _ExecCall, marker: str) -> None:
        roots = []
        try:
            info = self._api.get(f"/exec/{call.exec_id}/json")
            if info.ok and info.json().get("Pid"):
                roots.append(int(info.json()["Pid"]))  # host pid of the exec's process
        except (requests.RequestException, podman_errors.APIError):
            pass
        kill_process_tree(roots, marker)

    async def _run_exec(self, call: _ExecCall, recv: trio.MemoryReceiveChannel, marker: str, deadline: float,
                        start: float, on_output) -> ExecResult:
        finished = trio.Event()
        timed_out = False

        async def stream() -> None:
            try:
                await trio.to_thread.run_sync(self._exec_stream, call, abandon_on_cancel=True)
            finally:
                call.send.close()
                finished.set()

        async def forward() -> None:
            async for piece in recv:
                await on_output(piece)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream)
                if on_output is not None:
                    nursery.start_soon(forward)
                with trio.move_on_at(deadline):
                    await finished.wait()
                if not finished.is_set():
                    timed_out = True
                    await trio.to_thread.run_sync(self._kill_exec, call, marker)
                    with trio.move_on_after(KILL_WAIT_S):
                        await finished.wait()
                    if not finished.is_set():
                        call.abort()  # something outside the tree holds the stream open
                        with trio.move_on_after(KILL_WAIT_S):
                            await finished.wait()
        finally:
            if not call.done:  # cancelled by our caller: the command must not outlive the call
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._kill_exec, call, marker)
                call.abort()
        if call.error is not None:
            raise _api_error(call.error, "exec") from call.error
        code = call.exit_code if call.exit_code is not None and not timed_out else -signal.SIGKILL
        return ExecResult(code, call.cap.output(), call.cap.truncated, timed_out, time.perf_counter() - start,
                          call.cap.total_bytes)

    # ------------------------------------------------------------ files

    async def _with_root(self, sb: _Sandbox, fn, *args, lock: bool = True):
        pid = sb.pid

        def run():
            try:
                root_fd = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise Internal(f"the container's root is not reachable from this process ({exc}): the podman "
                               "runtime needs to run on the container's host as root or the podman user") from exc
            try:
                return fn(root_fd, *args)
            finally:
                os.close(root_fd)

        if not lock:
            return await trio.to_thread.run_sync(run)
        async with sb.lock:
            return await trio.to_thread.run_sync(run)


    async def sandbox_stats(self, sandbox_id: str) -> dict:
        sb = self._sandbox(sandbox_id)

        def query() -> dict:
            st = self._api.get("/containers/stats", params={"containers": [sb.container], "stream": False})
            info = self._api.get(f"/containers/{sb.container}/json", params={"size": True})
            st.raise_for_status()
            info.raise_for_status()
            usage = (st.json().get("Stats") or [{}])[0]
            attrs = info.json()
            return {"memory_bytes": int(usage.get("MemUsage") or 0), "memory_peak_bytes": 0,
                    "pids": int(usage.get("PIDs") or 0), "oom_kills": int(bool(attrs["State"].get("OOMKilled"))),
                    "disk_bytes": int(attrs.get("SizeRw") or 0)}

        try:
            stats = await trio.to_thread.run_sync(query)
        except podman_errors.APIError as exc:
            raise _api_error(exc, "stats") from exc
        stats.update(disk_limit_bytes=sb.limits.disk_bytes, disk_limit_enforced=False, container=sb.container[:12])
        return stats

    def stats(self) -> dict:
        """Node stats: counts of sandboxes, snapshots and images of ours."""
        return {"runtime": "podman", "podman_version": self.version, "sandboxes": len(self._sandboxes),
                "snapshots": len(self._snapshots), "images": len(self._refs),
                "pending_removals": self._reaper.pending, "background_errors": list(self._reaper.errors[-10:])}


def _is_dir(root_fd: int, path: str) -> bool:
    """Whether path is a directory as the container sees it (absolute symlinks resolve in its root)."""
    try:
        os.close(linux.openat2(root_fd, path.lstrip("/") or ".", os.O_PATH | os.O_DIRECTORY, 0, _RESOLVE_IN_ROOT))
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- the runtime's context

@asynccontextmanager
async def _runtime(state_dir: str, client: podman_py.PodmanClient, limits: Limits, env: dict, podman: str
                   ) -> AsyncIterator[PodmanRuntime]:
    async with trio.open_nursery() as nursery:
        reaper = Reaper()
        await nursery.start(reaper.run)
        rt = PodmanRuntime(state_dir, client, reaper, limits=limits, podman_env=env, podman_bin=podman)
        try:
            containers, imgs = await trio.to_thread.run_sync(rt.clean_stale)
            if containers or imgs:
                log.warning("removed %d containers and %d images left by a previous run of %s",
                            containers, imgs, state_dir)
            yield rt
        finally:
            with trio.CancelScope(shield=True):
                await rt.aclose()
                await reaper.aclose()
                client.close()


@asynccontextmanager
async def open_podman_runtime(state_dir: str, *, limits: Limits = Limits(), service_url: str | None = None,
                              podman: str = "podman", oci_runtime: str = "runc") -> AsyncIterator[PodmanRuntime]:
    """The podman runtime and the nursery that owns its background removals and, unless
    `service_url` names an API service already running (e.g. unix:///run/podman/podman.sock, which
    must then be configured for runc and the lowered ulimits itself), its own API service.

    On start, containers, images and a service left by a crashed run of the same state directory
    are removed; on exit every sandbox and snapshot is, and the service we started stops."""
    if shutil.which(podman) is None:
        raise Internal(f"{podman!r} is not installed (apt-get install podman runc)")
    state_dir = os.path.abspath(state_dir)
    os.makedirs(state_dir, exist_ok=True)
    env = podman_setup.podman_env(podman_setup.write_containers_conf(state_dir, oci_runtime))
    try:
        if service_url is not None:
            client = await trio.to_thread.run_sync(podman_setup.connect, service_url, None, START_TIMEOUT_S)
            async with _runtime(state_dir, client, limits, env, podman) as rt:
                yield rt
            return
        sock = os.path.join(state_dir, "podman.sock")
        if len(sock.encode()) > 100:
            raise BadRequest(f"state directory path too long for a unix socket: {state_dir}", field="state_dir")
        pid_file = os.path.join(state_dir, "podman-service.pid")
        await trio.to_thread.run_sync(podman_setup.stop_stale_service, pid_file, sock)
        if os.path.lexists(sock):
            os.unlink(sock)
        try:
            with open(os.path.join(state_dir, "podman-service.log"), "ab") as service_log:
                async with trio.open_nursery() as nursery:
                    service = await nursery.start(partial(
                        trio.run_process, [podman, "system", "service", "--time=0", f"unix://{sock}"], check=False,
                        stdin=subprocess.DEVNULL, stdout=service_log, stderr=service_log, env=env,
                        # conmon writes files such as "oom" into its working directory: keep them ours.
                        cwd=state_dir))
                    with open(pid_file, "w") as f:
                        f.write(str(service.pid))
                    try:
                        client = await trio.to_thread.run_sync(podman_setup.connect, f"unix://{sock}", service,
                                                               START_TIMEOUT_S)
                        async with _runtime(state_dir, client, limits, env, podman) as rt:
                            yield rt
                    finally:
                        nursery.cancel_scope.cancel()  # run_process: SIGTERM the service, SIGKILL after 5 s
        finally:
            for path in (pid_file, sock):
                if os.path.lexists(path):
                    os.unlink(path)
    finally:
        shutil.rmtree(os.path.join(state_dir, "tmp"), ignore_errors=True)
