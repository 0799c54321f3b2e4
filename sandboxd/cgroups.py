"""Cgroups for sandboxes: one interface, a cgroup v1 and a cgroup v2 implementation.

Layout (one sandbox `S`, per-exec child groups `x0, x1, ...` for killing one exec's whole tree):

    v2:  <mount>/<parent>/S/init     the sandbox's init
         <mount>/<parent>/S/cmd      memory.max, pids.max: every command of the sandbox
         <mount>/<parent>/S/cmd/xN   one exec's processes; killed with cgroup.kill
    v1:  memory:/<parent>/S, pids:/<parent>/S   limits: every command of the sandbox
         memory:/<parent>, pids:/<parent>       the inits of all sandboxes
         freezer:/<parent>/S         init;   freezer:/<parent>/S/xN   one exec's processes

Init stays outside the limited groups, so the OOM killer of a sandbox that runs out of memory
picks one of its commands, never its init (lowering oom_score_adj needs CAP_SYS_RESOURCE, which
build nodes may not grant). Init joins its groups itself, through directory fds the daemon hands
to it (`dirs`; init's root has no /sys). To start a command, init joins the command's exec groups
(`exec_join`), posix_spawn()s (the child inherits them) and goes back to its own (`init_join`).
On v1 a single-threaded process moves by writing "0" to `tasks`, not `cgroup.procs`: moving one
thread skips the global threadgroup lock, whose write side waits for an RCU grace period
(milliseconds). v2 has no such file for a domain group: there each move may take that wait,
unless the hierarchy is mounted with `favordynmods`.

Killing a group: v2 writes cgroup.kill (5.14+); v1 freezes the group, SIGKILLs every task it lists
and thaws it, so that a fork bomb or a double fork cannot outrun the kill.

All calls are small synchronous file writes (tens of microseconds), made from whatever thread
the caller is on.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass

__all__ = ["CgroupLimits", "Cgroups", "SandboxCgroup", "detect"]

MOUNT = "/sys/fs/cgroup"


@dataclass(frozen=True)
class CgroupLimits:
    memory_bytes: int  # hard limit on RAM (and tmpfs pages: a sandbox's disk is RAM, see ns.py)
    pids: int  # processes + threads, init included


def _write(path: str, value: str) -> None:
    # O_TRUNC as a shell's `echo > file`: cgroupfs ignores it; a plain file (tests) needs it
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode()


def _mkdir(path: str) -> None:
    os.mkdir(path)


def _rmdir(path: str) -> None:
    os.rmdir(path)


def _pids(procs_file: str) -> list[int]:
    try:
        return [int(x) for x in _read(procs_file).split()]
    except FileNotFoundError:
        return []


def _rmdir_when_empty(path: str, deadline_s: float = 5.0) -> None:
    """rmdir a cgroup, retrying while its last tasks finish exiting (EBUSY)."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            _rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > end:
                raise
            time.sleep(0.001)


def _kill_listed(procs_file: str) -> int:
    n = 0
    for pid in _pids(procs_file):
        try:
            os.kill(pid, signal.SIGKILL)
            n += 1
        except ProcessLookupError:
            pass
    return n


class SandboxCgroup:
    """The cgroups of one sandbox, as its init sees them (it creates and removes exec groups):

    dirs            directories the daemon opens (O_PATH) and hands to init, in this order;
                    the entries below are (index into dirs, path relative to it)
    init_join       what init writes "0" into to join its own groups
    exec_group_dir  where an exec group "{group}" is made and removed
    exec_join       what a command writes "0" into, before dropping its capabilities
    exec_dir        where exec groups live, as the daemon sees it
    """

    version: int
    dirs: list[str]
    init_join: list[tuple[int, str]]
    exec_group_dir: tuple[int, str]
    exec_join: list[tuple[int, str]]
    exec_dir: str

    def open_dirs(self) -> list[int]:
        """O_PATH fds of `dirs`, for init; the caller closes them."""
        fds: list[int] = []
        try:
            for d in self.dirs:
                fds.append(os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def init_config(self) -> dict:
        """The part of init's configuration that says where its groups are."""
        return {"init_join": self.init_join, "exec_group_dir": self.exec_group_dir,
                "exec_join": self.exec_join}

    def exec_group_pids(self, name: str) -> list[int]:
        return _pids(os.path.join(self.exec_dir, name, "cgroup.procs"))

    def kill_exec_group(self, name: str) -> None:
        raise NotImplementedError

    def kill_all(self) -> None:
        raise NotImplementedError

    def stats(self) -> dict:
        raise NotImplementedError

    def remove(self) -> None:
        """Kill whatever is left and remove every directory of this sandbox."""
        raise NotImplementedError

    def _exec_groups(self) -> list[str]:
        try:
            return [e.path for e in os.scandir(self.exec_dir) if e.is_dir()]
        except FileNotFoundError:
            return []


class _V2(SandboxCgroup):
    version = 2

    def __init__(self, path: str, limits: CgroupLimits | None) -> None:
        self.path = path
        self.exec_dir = os.path.join(path, "cmd")
        self.dirs = [path]
        self.init_join = [(0, "init/cgroup.procs")]
        self.exec_group_dir = (0, "cmd/{group}")
        self.exec_join = [(0, "cmd/{group}/cgroup.procs")]
        if limits is None:  # an existing group (stale, from a crash)
            return
        _mkdir(path)
        _mkdir(os.path.join(path, "init"))
        try:
            _write(os.path.join(path, "cgroup.subtree_control"), "+memory +pids")
        except OSError:
            pass  # not delegated: limits are skipped where their files are missing
        _mkdir(self.exec_dir)
        for name, value in (("memory.max", limits.memory_bytes), ("pids.max", limits.pids),
                            ("memory.swap.max", 0)):
            if os.path.exists(os.path.join(self.exec_dir, name)):
                _write(os.path.join(self.exec_dir, name), str(value))


    def _kill(self, path: str) -> None:
        kill_file = os.path.join(path, "cgroup.kill")
        if os.path.exists(kill_file):
            _write(kill_file, "1")
            return
        # Before 5.14: freeze, kill what is listed, thaw.
        _write(os.path.join(path, "cgroup.freeze"), "1")
        try:
            _kill_listed(os.path.join(path, "cgroup.procs"))
        finally:
            _write(os.path.join(path, "cgroup.freeze"), "0")

    def kill_exec_group(self, name: str) -> None:
        try:
            self._kill(os.path.join(self.exec_dir, name))
        except FileNotFoundError:
            pass  # init removed it: its processes are gone

    def kill_all(self) -> None:
        self._kill(self.path)

    def stats(self) -> dict:
        def num(name: str) -> int:
            try:
                return int(_read(os.path.join(self.exec_dir, name)).split()[0])
            except (FileNotFoundError, ValueError, IndexError):
                return 0

        oom = 0
        try:
            for line in _read(os.path.join(self.exec_dir, "memory.events")).splitlines():
                if line.startswith("oom_kill "):
                    oom = int(line.split()[1])
        except FileNotFoundError:
            pass
        return {"memory_bytes": num("memory.current"), "memory_peak_bytes": num("memory.peak"),
                "pids": num("pids.current"), "oom_kills": oom}

    def remove(self) -> None:
        if not os.path.isdir(self.path):
            return
        self.kill_all()
        for sub in self._exec_groups():
            _rmdir_when_empty(sub)
        for sub in (self.exec_dir, os.path.join(self.path, "init"), self.path):
            _rmdir_when_empty(sub)


class _V1(SandboxCgroup):
    version = 1

    def __init__(self, paths: dict[str, str], limits: CgroupLimits | None) -> None:
        self.paths = paths  # controller -> directory
        self.exec_dir = paths["freezer"]
        # init lives in the runtime's memory and pids groups (outside the sandbox's limits) and in
        # the sandbox's freezer group, whose children are the exec groups
        self.dirs = [paths["memory"], paths["pids"], paths["freezer"], os.path.dirname(paths["memory"]),
                     os.path.dirname(paths["pids"])]
        self.init_join = [(3, "tasks"), (4, "tasks"), (2, "tasks")]
        self.exec_group_dir = (2, "{group}")
        self.exec_join = [(0, "tasks"), (1, "tasks"), (2, "{group}/tasks")]
        if limits is None:  # an existing group (stale, from a crash)
            return
        for p in paths.values():
            _mkdir(p)
        mem = paths["memory"]
        _write(os.path.join(mem, "memory.limit_in_bytes"), str(limits.memory_bytes))
        if os.path.exists(os.path.join(mem, "memory.memsw.limit_in_bytes")):
            _write(os.path.join(mem, "memory.memsw.limit_in_bytes"), str(limits.memory_bytes))
        _write(os.path.join(paths["pids"], "pids.max"), str(limits.pids))

    def _freeze_kill_thaw(self, path: str) -> None:
        state = os.path.join(path, "freezer.state")
        _write(state, "FROZEN")
        try:
            end = time.monotonic() + 1.0
            while _read(state).strip() != "FROZEN" and time.monotonic() < end:
                time.sleep(0)
            _kill_listed(os.path.join(path, "cgroup.procs"))
            for sub in ([] if path != self.exec_dir else self._exec_groups()):
                _kill_listed(os.path.join(sub, "cgroup.procs"))
        finally:
            _write(state, "THAWED")

    def kill_exec_group(self, name: str) -> None:
        try:
            self._freeze_kill_thaw(os.path.join(self.exec_dir, name))
        except FileNotFoundError:
            pass  # init removed it: its processes are gone

    def kill_all(self) -> None:
        self._freeze_kill_thaw(self.exec_dir)  # freezing a v1 freezer group freezes its children

    def stats(self) -> dict:
        mem = self.paths["memory"]

        def num(path: str) -> int:
            try:
                return int(_read(path).split()[0])
            except (FileNotFoundError, ValueError, IndexError):
                return 0

        oom = 0
        try:
            for line in _read(os.path.join(mem, "memory.oom_control")).splitlines():
                if line.startswith("oom_kill "):
                    oom = int(line.split()[1])
        except FileNotFoundError:
            pass
        return {"memory_bytes": num(os.path.join(mem, "memory.usage_in_bytes")),
                "memory_peak_bytes": num(os.path.join(mem, "memory.max_usage_in_bytes")),
                "pids": num(os.path.join(self.paths["pids"], "pids.current")), "oom_kills": oom}

    def remove(self) -> None:
        if os.path.isdir(self.exec_dir):
            self.kill_all()
            for sub in self._exec_groups():
                _rmdir_when_empty(sub)
        for p in self.paths.values():
            _kill_listed(os.path.join(p, "cgroup.procs"))
            _rmdir_when_empty(p)


class Cgroups:
    """Where this runtime's sandbox cgroups go: `<mount>/<parent>` (v2) or `<ctrl>/<parent>` (v1)."""

    V1_CONTROLLERS = ("memory", "pids", "freezer")

    def __init__(self, version: int, parent: str, mount: str = MOUNT) -> None:
        self.version = version
        self.parent = parent.strip("/")
        self.mount = mount
        if version == 2:
            self._ensure_v2_parent()
        else:
            for ctrl in self.V1_CONTROLLERS:
                self._makedirs(os.path.join(mount, ctrl), self.parent)

    @staticmethod
    def _makedirs(base: str, rel: str) -> None:
        path = base
        for part in rel.split("/"):
            path = os.path.join(path, part)
            if not os.path.isdir(path):
                _mkdir(path)

    def _ensure_v2_parent(self) -> None:
        # Controllers must be enabled in every ancestor's subtree_control for memory.max/pids.max
        # to appear in a sandbox's group; the parent itself then holds no process.
        path = self.mount
        for part in self.parent.split("/"):
            try:
                _write(os.path.join(path, "cgroup.subtree_control"), "+memory +pids")
            except OSError:
                pass  # not delegated: limits are skipped where their files are missing
            path = os.path.join(path, part)
            if not os.path.isdir(path):
                _mkdir(path)
        try:
            _write(os.path.join(path, "cgroup.subtree_control"), "+memory +pids")
        except OSError:
            pass

    def create(self, sandbox_id: str, limits: CgroupLimits) -> SandboxCgroup:
        if self.version == 2:
            return _V2(os.path.join(self.mount, self.parent, sandbox_id), limits)
        return _V1({c: os.path.join(self.mount, c, self.parent, sandbox_id) for c in self.V1_CONTROLLERS},
                   limits)

    def _roots(self) -> list[str]:
        if self.version == 2:
            return [os.path.join(self.mount, self.parent)]
        return [os.path.join(self.mount, c, self.parent) for c in self.V1_CONTROLLERS]

    def remove_stale(self) -> list[str]:
        """Kill and remove every sandbox group under the parent (left by a crash). Returns their names."""
        names: set[str] = set()
        for root in self._roots():
            try:
                names.update(e.name for e in os.scandir(root) if e.is_dir())
            except FileNotFoundError:
                pass
        for name in sorted(names):
            if self.version == 2:
                _V2(os.path.join(self.mount, self.parent, name), None).remove()
            else:
                _V1({c: os.path.join(self.mount, c, self.parent, name) for c in self.V1_CONTROLLERS},
                    None).remove()
        return sorted(names)

    def count(self) -> int:
        """How many sandbox groups exist under the parent (all controllers together)."""
        n = 0
        for root in self._roots():
            try:
                n += sum(1 for e in os.scandir(root) if e.is_dir())
            except FileNotFoundError:
                pass
        return n

    def remove_parent(self) -> None:
        for root in self._roots():
            try:
                _rmdir(root)
            except OSError:
                pass


def detect(mount: str = MOUNT) -> int:
    """2 on a pure cgroup v2 host, 1 where v1 memory, pids and freezer hierarchies are mounted."""
    if os.path.exists(os.path.join(mount, "cgroup.controllers")):
        return 2
    if all(os.path.isdir(os.path.join(mount, c)) for c in Cgroups.V1_CONTROLLERS):
        return 1
    raise OSError(errno.ENOENT, "no usable cgroup hierarchy (need v2, or v1 memory+pids+freezer)", mount)
