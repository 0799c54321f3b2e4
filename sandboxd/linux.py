"""ctypes wrappers for the Linux syscalls sandboxd needs and Python 3.11 lacks.

mount(2), umount2(2), unshare(2), setns(2), pivot_root(2), prctl(2), capset(2), openat2(2),
open_tree(2), move_mount(2), pidfd_open(2), pidfd_send_signal(2) and posix_spawn(3), each raising OSError with the errno, a message and the path it was about. No compiled extension:
everything goes through libc (and `syscall(2)` where glibc has no wrapper).

This module is imported by the in-sandbox init (`sandboxd/_init.py`) as well, so it imports
nothing but the standard library's lightest modules.
"""

from __future__ import annotations

import ctypes
import os
import struct

__all__ = [
    "mount",
    "umount",
    "unshare",
    "setns",
    "pivot_root",
    "prctl",
    "openat2",
    "open_tree",
    "move_mount",
    "pidfd_open",
    "pidfd_send_signal",
    "spawn",
    "prepare_drop_capabilities",
    "drop_capabilities",
    "clear_inheritable_capabilities",
    "set_loopback_up",
    "set_process_name",
]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# <linux/sched.h>
CLONE_FS = 0x00000200
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# <linux/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 2

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# <linux/securebits.h>: root gets no capabilities from execve, and that is locked.
SECBIT_NOROOT_ALL_LOCKED = 0x01 | 0x02 | 0x04 | 0x08 | 0x20

# <linux/openat2.h>
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# <linux/mount.h>, new mount API
OPEN_TREE_CLONE = 1
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
AT_FDCWD = -100
MOVE_MOUNT_F_EMPTY_PATH = 0x04

# Syscalls glibc 2.36 has no wrapper for, by machine. Those numbered 424 and up are the same on
# every architecture.
_COMMON = {"pidfd_send_signal": 424, "open_tree": 428, "move_mount": 429, "pidfd_open": 434, "openat2": 437}
_SYSCALLS = {
    "x86_64": {"pivot_root": 155, **_COMMON},
    "aarch64": {"pivot_root": 41, **_COMMON},
}
_NR = _SYSCALLS.get(os.uname().machine, _SYSCALLS["x86_64"])


def _raise(what: str, path: str | None = None) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}", path)


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    """mount(2). `data` is the comma-separated option string (at most one page)."""
    if _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)) != 0:
        _raise(f"mount {fstype or 'bind/propagation'} on {target}", target)


def umount(target: str, flags: int = MNT_DETACH) -> None:
    """umount2(2); lazy (MNT_DETACH) by default: the mount leaves the tree now, is freed when unused."""
    if _libc.umount2(_b(target), ctypes.c_int(flags)) != 0:
        _raise(f"umount {target}", target)


def unshare(flags: int) -> None:
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        _raise(f"unshare {flags:#x}")


def setns(fd: int, nstype: int = 0) -> None:
    if _libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)) != 0:
        _raise(f"setns {nstype:#x}")


def pivot_root(new_root: str, put_old: str) -> None:
    if _libc.syscall(ctypes.c_long(_NR["pivot_root"]), _b(new_root), _b(put_old)) != 0:
        _raise(f"pivot_root {new_root}", new_root)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    ret = _libc.prctl(
        ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)
    )
    if ret < 0:
        _raise(f"prctl {option}")
    return ret


def sethostname(name: str) -> None:
    raw = name.encode()
    if _libc.sethostname(raw, ctypes.c_size_t(len(raw))) != 0:
        _raise("sethostname")


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """openat2(2): open `path` relative to `dirfd` under the `resolve` restrictions. Returns an fd."""
    how = ctypes.create_string_buffer(struct.pack("QQQ", flags | os.O_CLOEXEC, mode, resolve), 24)
    fd = _libc.syscall(
        ctypes.c_long(_NR["openat2"]), ctypes.c_long(dirfd), _b(path), how, ctypes.c_size_t(24)
    )
    if fd < 0:
        _raise(f"open {path}", path)
    return int(fd)


def open_tree(path: str, flags: int = OPEN_TREE_CLONE | AT_RECURSIVE, dirfd: int = AT_FDCWD) -> int:
    """open_tree(2); by default a detached recursive copy of the mount tree at `path` (a bind
    mount not yet attached anywhere; closing the fd dissolves it). Returns an fd (close-on-exec)."""
    fd = _libc.syscall(ctypes.c_long(_NR["open_tree"]), ctypes.c_int(dirfd), _b(path),
                       ctypes.c_uint(flags | os.O_CLOEXEC))
    if fd < 0:
        _raise(f"open_tree {path}", path)
    return int(fd)


def move_mount(from_fd: int, to_path: str, from_path: str = "", flags: int = MOVE_MOUNT_F_EMPTY_PATH,
               to_dirfd: int = AT_FDCWD) -> None:
    """move_mount(2); by default attaches the detached tree `from_fd` (from open_tree) at `to_path`."""
    ret = _libc.syscall(ctypes.c_long(_NR["move_mount"]), ctypes.c_int(from_fd), _b(from_path),
                        ctypes.c_int(to_dirfd), _b(to_path), ctypes.c_uint(flags))
    if ret != 0:
        _raise(f"move_mount to {to_path}", to_path)


def pidfd_open(pid: int) -> int:
    """pidfd_open(2): an fd that names this process for good (no pid reuse); it polls readable
    once the process has exited. Close-on-exec."""
    fd = _libc.syscall(ctypes.c_long(_NR["pidfd_open"]), ctypes.c_int(pid), ctypes.c_uint(0))
    if fd < 0:
        _raise(f"pidfd_open {pid}")
    return int(fd)


def pidfd_send_signal(pidfd: int, sig: int) -> bool:
    """pidfd_send_signal(2); False when the process has already exited (ESRCH)."""
    ret = _libc.syscall(ctypes.c_long(_NR["pidfd_send_signal"]), ctypes.c_int(pidfd), ctypes.c_int(sig),
                        None, ctypes.c_uint(0))
    if ret != 0:
        if ctypes.get_errno() == 3:  # ESRCH
            return False
        _raise(f"pidfd_send_signal {sig}")
    return True


# <spawn.h> (glibc): attribute flags. posix_spawn_file_actions_t is 80 bytes and
# posix_spawnattr_t 336 on 64-bit glibc; the buffers below are larger.
POSIX_SPAWN_SETSIGDEF = 0x04
POSIX_SPAWN_SETSIGMASK = 0x08
POSIX_SPAWN_SETSID = 0x80
_SIGSET_BYTES = 128


def _check_rc(rc: int, what: str) -> None:
    if rc != 0:
        raise OSError(rc, f"{what}: {os.strerror(rc)}")


def spawn(path: str, argv: list[str], env: dict[str, str], *, stdin: int, stdout: int, stderr: int,
          cwd_fd: int) -> int:
    """posix_spawn(3) `path` in a new session, with default signal dispositions and an empty
    signal mask, stdio from the given fds, the directory `cwd_fd` as cwd, every other fd closed.
    Returns the pid; OSError with the errno of a failed exec (ENOENT, EACCES, ENOEXEC...).

    glibc spawns with clone(CLONE_VM | CLONE_VFORK): the child shares our memory until it
    execs, so nothing is copied and nothing torn down (a fork + exec of a Python process costs
    milliseconds; this, a tenth of one). The child inherits our root, cgroups, credentials and
    capability bounding set: the caller arranges those around the call.
    """
    actions = ctypes.create_string_buffer(256)
    attr = ctypes.create_string_buffer(1024)
    _check_rc(_libc.posix_spawn_file_actions_init(actions), "posix_spawn_file_actions_init")
    _check_rc(_libc.posix_spawnattr_init(attr), "posix_spawnattr_init")
    try:
        all_signals = ctypes.create_string_buffer(_SIGSET_BYTES)
        no_signals = ctypes.create_string_buffer(_SIGSET_BYTES)
        _libc.sigfillset(all_signals)
        _libc.sigemptyset(no_signals)
        _check_rc(_libc.posix_spawnattr_setsigdefault(attr, all_signals), "posix_spawnattr_setsigdefault")
        _check_rc(_libc.posix_spawnattr_setsigmask(attr, no_signals), "posix_spawnattr_setsigmask")
        flags = POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSID
        _check_rc(_libc.posix_spawnattr_setflags(attr, ctypes.c_short(flags)), "posix_spawnattr_setflags")
        for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
            _check_rc(_libc.posix_spawn_file_actions_adddup2(actions, fd, target), "adddup2")
        _check_rc(_libc.posix_spawn_file_actions_addfchdir_np(actions, cwd_fd), "addfchdir_np")
        _check_rc(_libc.posix_spawn_file_actions_addclosefrom_np(actions, 3), "addclosefrom_np")
        c_argv = (ctypes.c_char_p * (len(argv) + 1))(*[os.fsencode(a) for a in argv], None)
        c_env = (ctypes.c_char_p * (len(env) + 1))(*[os.fsencode(f"{k}={v}") for k, v in env.items()], None)
        pid = ctypes.c_int(0)
        rc = _libc.posix_spawn(ctypes.byref(pid), os.fsencode(path), actions, attr, c_argv, c_env)
        if rc != 0:
            raise OSError(rc, f"{path}: {os.strerror(rc)}", path)
        return pid.value
    finally:
        _libc.posix_spawn_file_actions_destroy(actions)
        _libc.posix_spawnattr_destroy(attr)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def prepare_drop_capabilities() -> None:
    """First half of drop_capabilities(), which leaves the current capabilities usable (chroot
    still works): no_new_privs, empty bounding and ambient sets, and securebits that give root
    nothing on execve (locked)."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_SECUREBITS, SECBIT_NOROOT_ALL_LOCKED)
    for cap in range(64):
        if _libc.prctl(ctypes.c_int(PR_CAPBSET_DROP), ctypes.c_ulong(cap), 0, 0, 0) != 0:
            break  # EINVAL: past the last capability this kernel knows
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def clear_inheritable_capabilities() -> None:
    """capset() with the inheritable set emptied, effective and permitted kept."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        _raise("capget")
    for d in data:
        d.inheritable = 0
    if _libc.capset(ctypes.byref(header), data) != 0:
        _raise("capset")


def drop_capabilities() -> None:
    """Drop every capability for good: prepare_drop_capabilities() (if not done yet), then
    capset() to all-zero effective, permitted and inheritable sets.

    After this a uid-0 process is an ordinary process that happens to own root's files: it cannot
    mount, chroot, ptrace, load modules, change its cgroup or regain capabilities by execve.
    """
    if prctl(PR_GET_NO_NEW_PRIVS) != 1:
        prepare_drop_capabilities()
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capset(ctypes.byref(header), data) != 0:
        _raise("capset")


def set_loopback_up() -> None:
    """`ip link set lo up` in the current network namespace (SIOCGIFFLAGS / SIOCSIFFLAGS)."""
    import fcntl
    import socket

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(s.fileno(), siocgifflags, req))[1]
        fcntl.ioctl(s.fileno(), siocsifflags, struct.pack("16sh14x", b"lo", flags | iff_up))


_arg_area: tuple[int, int] | None = None  # (arg_start, arg_end) of this process


def set_process_name(name: str) -> None:
    """What /proc/<pid>/comm and /proc/<pid>/cmdline show, instead of the interpreter's argv and
    its host paths: the name is written over the argument area (the rest zeroed; moving the area
    instead would need CAP_SYS_RESOURCE). Forked children inherit it and may rename again."""
    global _arg_area
    prctl(PR_SET_NAME, ctypes.cast(ctypes.c_char_p(name.encode()[:15]), ctypes.c_void_p).value or 0)
    if _arg_area is None:  # a child without /proc (an init) uses its parent's: the same addresses
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        _arg_area = int(fields[45]), int(fields[46])  # fields 48 and 49 of proc(5)
    arg_start, arg_end = _arg_area
    size = arg_end - arg_start
    raw = name.encode()[: max(size - 1, 0)]
    ctypes.memset(arg_start, 0, size)
    ctypes.memmove(arg_start, raw, len(raw))
