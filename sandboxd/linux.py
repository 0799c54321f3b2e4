"""ctypes wrappers for the Linux syscalls sandboxd needs and Python 3.11 lacks.

mount(2), umount2(2), unshare(2), setns(2), pivot_root(2), prctl(2), capset(2) and openat2(2),
each raising OSError with the errno, a message and the path it was about. No compiled extension:
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
    "prepare_drop_capabilities",
    "drop_capabilities",
    "set_loopback_up",
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

# Syscalls glibc has no wrapper for, by machine. openat2 has the same number everywhere.
_SYSCALLS = {
    "x86_64": {"pivot_root": 155, "openat2": 437},
    "aarch64": {"pivot_root": 41, "openat2": 437},
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
