"""Layers: read-only directories stacked under a sandbox's writable upper, and who uses them.

A *stack* is a tuple of layer ids, topmost first (overlayfs `lowerdir` order). Image layers are
directories built once per runtime (`sys`, the `host` skeleton) or given (`dir:<path>`); snapshot
layers are former uppers: a tmpfs mount (`u/<id>`) whose `u/` directory became read-only when its
sandbox was snapshotted. Sandboxes and snapshots hold references on every layer of their stack;
a layer nobody references is collected (its tmpfs unmounted) by the caller of `release()`.

Also here, pure: image-name parsing and the overlay mount option string (with its one-page limit).
"""

from __future__ import annotations

import os
import posixpath
import stat
from dataclasses import dataclass, field

from sandboxd.errors import BadRequest, LimitExceeded

__all__ = ["Layer", "LayerStore", "ImageRef", "parse_image", "overlay_options", "build_sys_layer",
           "build_host_layer", "HOST_RO_BINDS"]

# mount(2) copies at most one page of options; overlayfs itself stacks at most 500 layers.
MAX_OPTIONS_BYTES = 4095
MAX_STACK_DEPTH = 500


@dataclass
class Layer:
    id: str
    path: str  # as overlayfs gets it: relative to the state directory, or absolute for dir: images
    mount: str | None = None  # tmpfs mount point to unmount when collected (snapshot layers)
    pinned: bool = False  # image layers live as long as the runtime
    refs: int = 0


@dataclass
class LayerStore:
    layers: dict[str, Layer] = field(default_factory=dict)

    def add(self, layer: Layer) -> Layer:
        if layer.id in self.layers:
            raise ValueError(f"layer {layer.id} exists")
        self.layers[layer.id] = layer
        return layer

    def paths(self, stack: tuple[str, ...]) -> list[str]:
        return [self.layers[i].path for i in stack]

    def acquire(self, stack: tuple[str, ...]) -> None:
        for i in stack:
            self.layers[i].refs += 1

    def release(self, stack: tuple[str, ...]) -> list[Layer]:
        """Drop one reference on each layer; returns (and forgets) the layers now unused."""
        dead = []
        for i in stack:
            layer = self.layers[i]
            layer.refs -= 1
            assert layer.refs >= 0, f"layer {i} released more than acquired"
            if layer.refs == 0 and not layer.pinned:
                dead.append(self.layers.pop(i))
        return dead

    def __len__(self) -> int:
        return len(self.layers)


@dataclass(frozen=True)
class ImageRef:
    kind: str  # "host" | "dir" | "podman"
    ref: str  # "" for host, the absolute path for dir, the image name for podman


_OPTION_UNSAFE = set(",:\\\n")


def parse_image(name: object) -> ImageRef:
    """`host`, `dir:<absolute path>` or `podman:<image>`; anything else is BadRequest(field=image)."""
    if not isinstance(name, str) or not name:
        raise BadRequest("image must be a non-empty string: host, dir:<path> or podman:<image>", field="image")
    if name == "host":
        return ImageRef("host", "")
    kind, sep, ref = name.partition(":")
    if not sep or kind not in ("dir", "podman") or not ref:
        raise BadRequest(f"unknown image {name!r}: expected host, dir:<path> or podman:<image>", field="image")
    if kind == "dir":
        if not ref.startswith("/"):
            raise BadRequest(f"image {name!r}: dir: needs an absolute path", field="image")
        if _OPTION_UNSAFE & set(ref):
            raise BadRequest(f"image {name!r}: path may not contain ',', ':', '\\' or newlines", field="image")
        ref = posixpath.normpath(ref)
    return ImageRef(kind, ref)


def overlay_options(lowers: list[str], upper: str, work: str) -> str:
    """The overlayfs option string; LimitExceeded(field=snapshot) when the stack no longer fits.

    index=off: layers are moved between stacks (a snapshot's upper becomes a lower), which the
    inode index would refuse. redirect_dir=on: renaming a directory from a lower layer works, and
    the redirect is still followed once that upper is itself a lower of the same stack.
    """
    if not lowers:
        raise ValueError("overlayfs needs at least one lower layer")
    if len(lowers) > MAX_STACK_DEPTH:
        raise LimitExceeded(f"layer stack of {len(lowers)} exceeds {MAX_STACK_DEPTH}", field="snapshot")
    opts = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work},index=off,redirect_dir=on,metacopy=off"
    if len(opts.encode()) > MAX_OPTIONS_BYTES:
        raise LimitExceeded(f"layer stack of {len(lowers)} layers exceeds the mount option page",
                            field="snapshot")
    return opts


# Directories every sandbox root has; device nodes any program may expect (major, minor).
_SYS_DIRS = {"proc": 0o555, "dev": 0o755, "dev/shm": 0o1777, "dev/pts": 0o755, "tmp": 0o1777,
             "testbed": 0o755, "root": 0o700, "etc": 0o755, "run": 0o755, "var": 0o755, "var/tmp": 0o1777}
_SYS_DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9),
                "tty": (5, 0)}
_SYS_LINKS = {"dev/fd": "/proc/self/fd", "dev/stdin": "/proc/self/fd/0", "dev/stdout": "/proc/self/fd/1",
              "dev/stderr": "/proc/self/fd/2", "dev/ptmx": "pts/ptmx"}


def build_sys_layer(path: str) -> None:
    """The bottom layer of every stack: mount points, /tmp, /testbed and the /dev nodes."""
    os.makedirs(path, exist_ok=True)
    for rel, mode in _SYS_DIRS.items():
        p = os.path.join(path, rel)
        os.makedirs(p, exist_ok=True)
        os.chmod(p, mode)
    for name, (major, minor) in _SYS_DEVICES.items():
        p = os.path.join(path, "dev", name)
        if not os.path.exists(p):
            os.mknod(p, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    for rel, target in _SYS_LINKS.items():
        p = os.path.join(path, rel)
        if not os.path.lexists(p):
            os.symlink(target, p)


# The host image: these host directories, read-only, at the same place (DESIGN.md, "Sandboxes").
HOST_RO_BINDS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def build_host_layer(path: str) -> list[str]:
    """The host image's skeleton: a symlink where the host has one (merged /usr: /bin -> usr/bin),
    an empty mount point where it has a directory. Returns the directories to bind read-only."""
    os.makedirs(path, exist_ok=True)
    binds = []
    for host_dir in HOST_RO_BINDS:
        p = os.path.join(path, host_dir.lstrip("/"))
        if os.path.islink(host_dir):
            if not os.path.lexists(p):
                os.symlink(os.readlink(host_dir), p)
        elif os.path.isdir(host_dir):
            os.makedirs(p, exist_ok=True)
            binds.append(host_dir)
    return binds
