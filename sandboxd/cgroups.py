"""Cgroups for sandboxes: one interface, a cgroup v1 and a cgroup v2 implementation.

Layout (one sandbox `S`, per-exec child groups `x0, x1, ...` for killing one exec's whole tree):

    v2:  <mount>/<parent>/S/init     the sandbox's init
         <mount>/<parent>/S/cmd      memory.max, pids.max: every command of the sandbox
         <mount>/<parent>/S/cmd/xN   one exec's processes; killed with cgroup.kill
    v1:  memory:/<parent>/S, pids:/<parent>/S   limits: every command of the sandbox
         freezer:/<parent>/S         init;   freezer:/<parent>/S/xN   one exec's processes

Init stays outside the limited groups, so the OOM killer of a sandbox that runs out of memory
picks one of its commands, never its init (lowering oom_score_adj needs CAP_SYS_RESOURCE, which
build nodes may not grant). A command joins its groups itself, before dropping its capabilities,
through directory fds its init opened at start (`exec_dirs`; init's root has no /sys).

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

_MOUNT = "/sys/fs/cgroup"


@dataclass(frozen=True)
class CgroupLimits:
    memory_bytes: int  # hard limit on RAM (and tmpfs pages: a sandbox's disk is RAM, see ns.py)
    pids: int  # processes + threads, init included


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode()


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
            os.rmdir(path)
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

    init_procs_files  what init writes "0" into to join its own groups
    exec_dirs         directories init opens before pivot_root (its root has no /sys)
    exec_group_dir    (index into exec_dirs, path) of an exec group "{group}", to mkdir/rmdir
    exec_join         (index into exec_dirs, cgroup.procs path) a command writes "0" into
    exec_dir          where exec groups live, as the daemon sees it
    """

    version: int
    init_procs_files: list[str]
    exec_dirs: list[str]
    exec_group_dir: tuple[int, str]
    exec_join: list[tuple[int, str]]
    exec_dir: str

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
        self.exec_dirs = [self.exec_dir]
        self.exec_group_dir = (0, "{group}")
        self.exec_join = [(0, "{group}/cgroup.procs")]
        self.init_procs_files = [os.path.join(path, "init", "cgroup.procs")]
        if limits is None:  # an existing group (stale, from a crash)
            return
        os.mkdir(path)
        os.mkdir(os.path.join(path, "init"))
        try:
            _write(os.path.join(path, "cgroup.subtree_control"), "+memory +pids")
        except OSError:
            pass  # not delegated: limits are skipped where their files are missing
        os.mkdir(self.exec_dir)
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
        self.init_procs_files = [os.path.join(paths["freezer"], "cgroup.procs")]
        self.exec_dir = paths["freezer"]
        self.exec_dirs = [paths["memory"], paths["pids"], paths["freezer"]]
        self.exec_group_dir = (2, "{group}")
        self.exec_join = [(0, "cgroup.procs"), (1, "cgroup.procs"), (2, "{group}/cgroup.procs")]
        if limits is None:  # an existing group (stale, from a crash)
            return
        for p in paths.values():
            os.mkdir(p)
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

    def __init__(self, version: int, parent: str) -> None:
        self.version = version
        self.parent = parent.strip("/")
        if version == 2:
            self._ensure_v2_parent()
        else:
            for ctrl in self.V1_CONTROLLERS:
                os.makedirs(os.path.join(_MOUNT, ctrl, self.parent), exist_ok=True)

    def _ensure_v2_parent(self) -> None:
        # Controllers must be enabled in every ancestor's subtree_control for memory.max/pids.max
        # to appear in a sandbox's group; the parent itself then holds no process.
        path = _MOUNT
        for part in self.parent.split("/"):
            try:
                _write(os.path.join(path, "cgroup.subtree_control"), "+memory +pids")
            except OSError:
                pass  # not delegated: limits are skipped where their files are missing
            path = os.path.join(path, part)
            os.makedirs(path, exist_ok=True)
        try:
            _write(os.path.join(path, "cgroup.subtree_control"), "+memory +pids")
        except OSError:
            pass

    def create(self, sandbox_id: str, limits: CgroupLimits) -> SandboxCgroup:
        if self.version == 2:
            return _V2(os.path.join(_MOUNT, self.parent, sandbox_id), limits)
        return _V1({c: os.path.join(_MOUNT, c, self.parent, sandbox_id) for c in self.V1_CONTROLLERS}, limits)

    def remove_stale(self) -> list[str]:
        """Kill and remove every sandbox group under the parent (left by a crash). Returns their names."""
        names: set[str] = set()
        roots = ([os.path.join(_MOUNT, self.parent)] if self.version == 2
                 else [os.path.join(_MOUNT, c, self.parent) for c in self.V1_CONTROLLERS])
        for root in roots:
            try:
                names.update(e.name for e in os.scandir(root) if e.is_dir())
            except FileNotFoundError:
                pass
        for name in sorted(names):
            if self.version == 2:
                _V2(os.path.join(_MOUNT, self.parent, name), None).remove()
            else:
                _V1({c: os.path.join(_MOUNT, c, self.parent, name) for c in self.V1_CONTROLLERS}, None).remove()
        return sorted(names)

    def remove_parent(self) -> None:
        roots = ([os.path.join(_MOUNT, self.parent)] if self.version == 2
                 else [os.path.join(_MOUNT, c, self.parent) for c in self.V1_CONTROLLERS])
        for root in roots:
            try:
                os.rmdir(root)
            except OSError:
                pass


def detect() -> int:
    """2 on a pure cgroup v2 host, 1 where v1 memory, pids and freezer hierarchies are mounted."""
    if os.path.exists(os.path.join(_MOUNT, "cgroup.controllers")):
        return 2
    if all(os.path.isdir(os.path.join(_MOUNT, c)) for c in Cgroups.V1_CONTROLLERS):
        return 1
    raise OSError(errno.ENOENT, "no usable cgroup hierarchy (need v2, or v1 memory+pids+freezer)", _MOUNT)
