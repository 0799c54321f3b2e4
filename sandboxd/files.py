"""File operations inside a sandbox's root, safe against `..`, absolute and symlink escapes.

Two layers of defence:
1. `sandbox_relpath` (pure): the requested path is normalised lexically; a `..` that climbs above
   the root, a NUL byte, or an empty path is a `BadRequest` naming the field.
2. Every open goes through openat2(2) relative to an fd of the sandbox root with
   RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS: the kernel refuses (EXDEV) any resolution that leaves
   the root, including through a symlink the sandbox planted (absolute, or relative with `..`),
   and /proc magic links. There is no check-then-use window: the check is the open.

Symlinks that stay inside the root are followed; an absolute symlink is refused even when it names
a path inside the sandbox (resolving it against the sandbox root is what `exec` is for).

Functions here are blocking; ns.py runs them in a worker thread.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from dataclasses import dataclass

from sandboxd import linux
from sandboxd.errors import BadRequest, Internal, LimitExceeded, NotFound, SandboxError

__all__ = ["DirEntry", "sandbox_relpath", "read_file", "write_file", "list_dir", "make_dirs", "copy_in"]

_RESOLVE = linux.RESOLVE_BENEATH | linux.RESOLVE_NO_MAGICLINKS


@dataclass(frozen=True)
class DirEntry:
    name: str
    kind: str  # "file" | "dir" | "symlink" | "other"
    size: int  # bytes (of the link itself for a symlink)
    mode: int  # permission bits, e.g. 0o644


def sandbox_relpath(path: str, workdir: str = "/testbed", *, field: str = "path") -> str:
    """The path relative to the sandbox root ("" for the root itself); relative paths start at
    `workdir`. Raises BadRequest for an empty path, a NUL byte, or `..` above the root."""
    if not isinstance(path, str) or not path:
        raise BadRequest("path must be a non-empty string", field=field)
    if "\0" in path:
        raise BadRequest("path contains a NUL byte", field=field)
    full = path if path.startswith("/") else posixpath.join(workdir, path)
    parts: list[str] = []
    for part in full.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise BadRequest(f"path {path!r} escapes the sandbox root", field=field)
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def _translate(exc: OSError, path: str, field: str) -> SandboxError:
    e = exc.errno
    if e == errno.EXDEV:
        return BadRequest(f"path {path!r} escapes the sandbox root (through '..' or a symlink)", field=field)
    if e == errno.ELOOP:
        return BadRequest(f"path {path!r}: too many levels of symlinks, or a symlink where none is allowed",
                          field=field)
    if e == errno.ENOENT:
        return NotFound(f"no such file or directory: {path!r}", field=field)
    if e in (errno.ENOTDIR, errno.EISDIR, errno.EINVAL, errno.ENAMETOOLONG, errno.EEXIST):
        return BadRequest(f"path {path!r}: {os.strerror(e)}", field=field)
    if e in (errno.EROFS, errno.EACCES, errno.EPERM):
        return BadRequest(f"path {path!r} is not writable here: {os.strerror(e)}", field=field)
    if e in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return LimitExceeded(f"sandbox disk is full writing {path!r}", field="data")
    return Internal(f"{path!r}: {exc}")


def _open(root_fd: int, rel: str, flags: int, mode: int = 0) -> int:
    return linux.openat2(root_fd, rel or ".", flags, mode, _RESOLVE)


def read_file(root_fd: int, path: str, workdir: str, max_bytes: int) -> bytes:
    rel = sandbox_relpath(path, workdir)
    try:
        fd = _open(root_fd, rel, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise _translate(exc, path, "path") from exc
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise BadRequest(f"{path!r} is a directory", field="path")
        if not stat.S_ISREG(st.st_mode):
            raise BadRequest(f"{path!r} is not a regular file", field="path")
        if st.st_size > max_bytes:
            raise LimitExceeded(f"{path!r} has {st.st_size} bytes, more than max_bytes={max_bytes}",
                                field="max_bytes")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise LimitExceeded(f"{path!r} grew past max_bytes={max_bytes}", field="max_bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _mkdirs(root_fd: int, rel_dir: str, path: str) -> None:
    done = ""
    for part in rel_dir.split("/") if rel_dir else []:
        target = f"{done}/{part}" if done else part
        try:
            os.close(_open(root_fd, target, os.O_PATH | os.O_DIRECTORY))
        except FileNotFoundError:
            parent = _open(root_fd, done, os.O_PATH | os.O_DIRECTORY)
            try:
                os.mkdir(part, 0o755, dir_fd=parent)
            except FileExistsError:
                pass
            finally:
                os.close(parent)
        done = target


def make_dirs(root_fd: int, path: str, workdir: str = "/") -> None:
    """mkdir -p under the root (mode 0755)."""
    rel = sandbox_relpath(path, workdir)
    try:
        _mkdirs(root_fd, rel, path)
    except OSError as exc:
        raise _translate(exc, path, "path") from exc


def copy_in(root_fd: int, src: str, path: str) -> None:
    """Copy the host directory `src` to `path` under the root, as `cp -a` would (modes, mtimes,
    symlinks as they are; owners not kept). Every target is reached from the root without
    following a symlink the image planted: such a symlink is refused (a directory) or replaced
    (a file). LimitExceeded(field=repo) when the sandbox disk fills."""
    rel = sandbox_relpath(path, "/")
    try:
        _mkdirs(root_fd, rel, path)
        top = _open(root_fd, rel, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _copy_dir(src, top)
        finally:
            os.close(top)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise LimitExceeded("repo does not fit in the sandbox disk", field="repo") from exc
        raise _translate(exc, path, "repo") from exc


def _create_nofollow(name: str, dir_fd: int) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        os.unlink(name, dir_fd=dir_fd)  # a symlink where the file goes: replace it
        return os.open(name, flags, 0o600, dir_fd=dir_fd)


def _copy_dir(src: str, dst_fd: int) -> None:
    with os.scandir(src) as entries:
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                try:
                    os.unlink(entry.name, dir_fd=dst_fd)
                except FileNotFoundError:
                    pass
                os.symlink(os.readlink(entry.path), entry.name, dir_fd=dst_fd)
            elif stat.S_ISDIR(st.st_mode):
                try:
                    os.mkdir(entry.name, 0o700, dir_fd=dst_fd)
                except FileExistsError:
                    pass
                sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dst_fd)
                try:
                    _copy_dir(entry.path, sub)
                    os.fchmod(sub, stat.S_IMODE(st.st_mode))
                    os.utime(sub, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    os.close(sub)
            elif stat.S_ISREG(st.st_mode):
                out = _create_nofollow(entry.name, dst_fd)
                try:
                    with open(entry.path, "rb") as f:
                        offset = 0
                        while offset < st.st_size:
                            sent = os.sendfile(out, f.fileno(), offset, st.st_size - offset)
                            if sent == 0:
                                break
                            offset += sent
                    os.fchmod(out, stat.S_IMODE(st.st_mode))
                    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    os.close(out)
            # sockets, fifos and devices of a work tree are not copied


def write_file(root_fd: int, path: str, workdir: str, data: bytes, mode: int, parents: bool) -> None:
    rel = sandbox_relpath(path, workdir)
    if not rel:
        raise BadRequest("cannot write the sandbox root", field="path")
    try:
        if parents:
            _mkdirs(root_fd, posixpath.dirname(rel), path)
        fd = _open(root_fd, rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOCTTY | os.O_NONBLOCK, mode)
    except OSError as exc:
        raise _translate(exc, path, "path") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadRequest(f"{path!r} is not a regular file", field="path")
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:
        raise _translate(exc, path, "data") from exc
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def list_dir(root_fd: int, path: str, workdir: str, max_entries: int) -> tuple[list[DirEntry], bool]:
    """Entries sorted by name (at most `max_entries`) and whether the listing was cut."""
    rel = sandbox_relpath(path, workdir)
    try:
        fd = _open(root_fd, rel, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise _translate(exc, path, "path") from exc
    try:
        names = sorted(os.listdir(fd))
        out = []
        for name in names[:max_entries]:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            out.append(DirEntry(name, _kind(st.st_mode), st.st_size, stat.S_IMODE(st.st_mode)))
        return out, len(names) > max_entries
    finally:
        os.close(fd)
