"""Sandbox roots: the mounts of one sandbox, made and unmade on the mount thread.

Every function here runs on the mount thread (see mounter.py), whose cwd is the state directory,
so paths are short and relative: `s/S` a sandbox's shell, `u/U` an upper, `l/...` image layers.

    s/S          the shell: a tiny tmpfs, shared, holding the sandbox's roots (and `.old` for
                 init's pivot_root)
    s/S/rN       root generation N: overlay(lower = stack of layers, upper = u/U/u, work = u/U/w)
                 + the image's read-only binds (host: /usr, /etc)
    u/U          an upper: a tmpfs of `disk_bytes`, freed by unmounting it, never by walking it

A restore mounts generation N+1 next to N instead of replacing N in place, so that nothing waits
for the sandbox's processes to die or for init to unmount N's /proc: N is unmounted later, once
init says it has let go of it (its /proc gone; a propagated unmount skips a mount that still has
children in the sandbox's namespace).

Init gets the shell as a detached copy (open_tree(2)) that is a peer of `s/S`, so every later
mount under `s/S` propagates into the sandbox.
"""

from __future__ import annotations

import errno
import os
import secrets
from dataclasses import dataclass

from sandboxd import linux
from sandboxd.layers import overlay_options
from sandboxd.mounter import MountThread

__all__ = ["Upper", "SpareUppers", "new_upper", "drop_mount", "prepare_root", "mount_root", "replace_root", "drop_root",
           "unmount_sandbox", "upper_usage", "attach_tree"]


@dataclass
class Upper:
    mount: str  # "u/<id>", relative to the state directory
    size: int  # bytes


class SpareUppers:
    """Empty uppers, mounted ahead of time by the mount thread when it is idle, so that a restore
    or a create only takes one (a tmpfs mount off the critical path). Kept per size."""

    def __init__(self, mounter: MountThread, per_size: int) -> None:
        self.mounter = mounter
        self.per_size = per_size
        self.closed = False
        self._spares: dict[int, list[Upper]] = {}

    def take(self, size: int) -> tuple[Upper, bool]:
        """A spare upper if one is ready, else a new one for the caller to make (fresh=True)."""
        spares = self._spares.setdefault(size, [])
        self.mounter.background(self._refill, size)
        if spares:
            return spares.pop(), False
        return Upper(f"u/{secrets.token_hex(5)}", size), True

    def drop(self, upper: Upper) -> None:
        self.mounter.background(drop_mount, upper.mount)

    def count(self) -> int:
        return sum(len(v) for v in self._spares.values())

    def _refill(self, size: int) -> None:  # on the mount thread
        spares = self._spares[size]
        if len(spares) < self.per_size and not self.closed:
            upper = Upper(f"u/{secrets.token_hex(5)}", size)
            new_upper(upper)
            spares.append(upper)


def new_upper(upper: Upper) -> None:
    os.mkdir(upper.mount)
    linux.mount("tmpfs", upper.mount, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, f"size={upper.size},mode=0755")
    os.mkdir(f"{upper.mount}/u", 0o755)
    os.mkdir(f"{upper.mount}/w", 0o700)


def drop_mount(mount: str) -> None:
    """Unmount (lazily) and remove a mount point; a mount point that is already gone is fine."""
    try:
        linux.umount(mount, linux.MNT_DETACH)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):
            raise
    try:
        os.rmdir(mount)
    except FileNotFoundError:
        pass


def _make_shell(shell: str) -> None:
    os.mkdir(shell)
    linux.mount("tmpfs", shell, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "size=64k,mode=0755")
    os.mkdir(f"{shell}/.old", 0o700)
    linux.mount(None, shell, None, linux.MS_SHARED)  # so that mounts in it propagate into the sandbox


def mount_root(shell: str, root: str, lowers: list[str], upper: Upper, fresh_upper: bool,
               binds: tuple[str, ...]) -> None:
    """Mount a root generation `root` in the shell: overlay + read-only binds."""
    options = overlay_options(lowers, f"{upper.mount}/u", f"{upper.mount}/w")
    if fresh_upper:
        new_upper(upper)
    target = f"{shell}/{root}"
    os.mkdir(target, 0o755)
    try:
        linux.mount("overlay", target, "overlay", 0, options)
        for host_dir in binds:
            sub = target + host_dir
            linux.mount(host_dir, sub, None, linux.MS_BIND)
            linux.mount(None, sub, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID
                        | linux.MS_NODEV)
    except BaseException:
        drop_root(shell, root)
        raise


def drop_root(shell: str, root: str) -> None:
    """Unmount a root generation (and the binds under it)."""
    drop_mount(f"{shell}/{root}")


def replace_root(shell: str, old_root: str, root: str, lowers: list[str], upper: Upper, fresh_upper: bool,
                 binds: tuple[str, ...]) -> None:
    """drop_root(old_root), then mount_root(root): a snapshot, whose old upper becomes a lower
    (overlayfs warns about a layer that is still another mount's upper)."""
    drop_root(shell, old_root)
    mount_root(shell, root, lowers, upper, fresh_upper, binds)


def prepare_root(shell: str, root: str, lowers: list[str], upper: Upper, fresh_upper: bool,
                 binds: tuple[str, ...]) -> int:
    """A new sandbox's shell and first root; returns a detached copy of the shell tree for its
    init. On failure nothing of the shell is left (the upper is the caller's)."""
    try:
        _make_shell(shell)
        mount_root(shell, root, lowers, upper, fresh_upper, binds)
        return linux.open_tree(shell)
    except BaseException:
        unmount_sandbox(shell)
        raise


def unmount_sandbox(shell: str) -> None:
    """Unmount the shell and every root in it."""
    try:
        linux.umount(shell, linux.MNT_DETACH)
    except OSError:
        pass
    try:
        for entry in os.scandir(shell):
            os.rmdir(entry.path)
        os.rmdir(shell)
    except OSError:
        pass


def attach_tree(tree_fd: int, mount_point: str) -> None:
    """Attach a detached mount tree (open_tree(2) in another mount namespace) at mount_point."""
    os.mkdir(mount_point, 0o755)
    try:
        linux.move_mount(tree_fd, mount_point)
    except BaseException:
        os.rmdir(mount_point)
        raise


def upper_usage(mount: str) -> int:
    st = os.statvfs(mount)
    return (st.f_blocks - st.f_bfree) * st.f_frsize
