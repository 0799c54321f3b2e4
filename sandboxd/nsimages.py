"""Images of the ns runtime: the read-only layers at the bottom of a sandbox, by name (DESIGN.md, "Sandboxes").

    host            read-only binds of the node's /usr, /etc (and /bin, /lib... where they are
                    directories) over a skeleton of mount points and symlinks
    dir:<path>      a host directory, as one read-only lower layer
    podman:<image>  the root filesystem of a podman image: `podman image mount` pins it (and its
                    path is the layer for storage drivers other than overlay); with the overlay
                    driver the image's own layer directories (`podman image inspect`,
                    GraphDriver.Data) are the lowers, so that the sandbox overlay is not stacked
                    on podman's (the kernel stacks at most two overlays). No host binds; the
                    image's Env (PATH...) is the sandbox's base environment.

Every stack ends with the `sys` layer (mount points, /tmp, /testbed, /dev nodes). Layer paths
given to overlayfs are short, relative to the state directory: podman layer directories are
reached through symlinks `l/p<n>` (the options of one mount fit in a page).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field

import trio

from sandboxd import linux, roots
from sandboxd.errors import BadRequest, Internal, NotFound
from sandboxd.layers import Layer, LayerStore, build_host_layer, build_sys_layer, parse_image
from sandboxd.mounter import MountThread

__all__ = ["Image", "ImageStore", "podman_lowers", "PODMAN_TIMEOUT_S"]

PODMAN_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Image:
    name: str
    stack: tuple[str, ...]  # layer ids, topmost first
    binds: tuple[str, ...] = ()  # host directories bound read-only at the same path
    env: dict[str, str] = field(default_factory=dict)  # the image's environment


def podman_lowers(inspect: dict, mount_path: str, use_layer_dirs: bool = True) -> list[str]:
    """The lower directories of a podman image, topmost first (pure: from `podman image inspect`
    and `podman image mount`)."""
    driver = inspect.get("GraphDriver") or {}
    data = driver.get("Data") or {}
    if use_layer_dirs and driver.get("Name") == "overlay" and data.get("UpperDir"):
        lowers = [data["UpperDir"]]
        if data.get("LowerDir"):
            lowers += data["LowerDir"].split(":")
        return lowers
    return [mount_path]


def podman_env(inspect: dict) -> dict[str, str]:
    env = {}
    for item in (inspect.get("Config") or {}).get("Env") or []:
        key, sep, value = item.partition("=")
        if sep and key and "\0" not in item:
            env[key] = value
    return env


async def _podman(*args: str) -> str:
    """Run `podman ARGS`; its stdout. NotFound for an unknown image, Internal otherwise."""
    if shutil.which("podman") is None:
        raise BadRequest("podman images need podman, which is not installed on this node", field="image")
    try:
        with trio.fail_after(PODMAN_TIMEOUT_S):
            proc = await trio.run_process(["podman", *args], capture_stdout=True, capture_stderr=True,
                                          check=False, stdin=subprocess.DEVNULL)
    except trio.TooSlowError as exc:
        raise Internal(f"podman {args[0]} {args[1]} took more than {PODMAN_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        if "image not known" in err or "no such image" in err.lower():
            raise NotFound(f"no podman image {args[-1]!r}", field="image")
        raise Internal(f"podman {' '.join(args)} failed ({proc.returncode}): {err[-500:]}")
    return proc.stdout.decode()


class ImageStore:
    """The images of one runtime: built or resolved once, kept until the runtime closes."""

    def __init__(self, state_dir: str, layers: LayerStore, mounter: MountThread) -> None:
        self.state_dir = state_dir
        self.layers = layers
        self.mounter = mounter
        self._images: dict[str, Image] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._podman_mounted: list[str] = []  # image ids to `podman image unmount` at close
        self.use_layer_dirs = True  # overlay driver: its layer directories, not its mount (tests)
        layer_dir = os.path.join(state_dir, "l")
        for entry in os.scandir(layer_dir):  # symlinks and mount points of a previous run
            if entry.name.startswith("p"):
                if entry.is_symlink():
                    os.unlink(entry.path)
                else:
                    shutil.rmtree(entry.path, ignore_errors=True)
        build_sys_layer(os.path.join(layer_dir, "sys"))
        self.layers.add(Layer("sys", "l/sys", pinned=True))
        host_binds = build_host_layer(os.path.join(layer_dir, "host"))
        self.layers.add(Layer("host", "l/host", pinned=True))
        self._images["host"] = Image("host", ("host", "sys"), tuple(host_binds))

    async def get(self, name: object) -> Image:
        ref = parse_image(name)
        if ref.kind == "podman" and ref.ref.startswith("-"):
            raise BadRequest(f"image {name!r}: a podman image name cannot start with '-'", field="image")
        key = "host" if ref.kind == "host" else f"{ref.kind}:{ref.ref}"
        if key in self._images:
            return self._images[key]
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            if key not in self._images:
                if ref.kind == "dir":
                    self._images[key] = self._dir_image(key, ref.ref, name)
                else:
                    self._images[key] = await self._podman_image(key, ref.ref)
        return self._images[key]

    def _dir_image(self, key: str, path: str, name: object) -> Image:
        if not os.path.isdir(path):
            raise NotFound(f"image {name!r}: no such directory", field="image")
        layer = self.layers.add(Layer("d" + secrets.token_hex(4), path, pinned=True))
        return Image(key, (layer.id, "sys"))

    async def _podman_image(self, key: str, ref: str) -> Image:
        inspect = json.loads(await _podman("image", "inspect", "--format", "json", ref))
        if not inspect:
            raise NotFound(f"no podman image {ref!r}", field="image")
        info = inspect[0]
        image_id = info.get("Id") or ref
        mount_path = (await _podman("image", "mount", image_id)).strip()
        self._podman_mounted.append(image_id)
        lowers = podman_lowers(info, mount_path, self.use_layer_dirs)
        ids = []
        for path in lowers:
            if not os.path.isabs(path):
                raise Internal(f"podman image {ref!r}: layer path {path!r} is not absolute")
            link = f"l/p{secrets.token_hex(4)}"
            if path == mount_path:
                # podman mounted it in the host's mount namespace, which the mount thread left
                # before: take a copy of the mount over here.
                tree = await trio.to_thread.run_sync(linux.open_tree, path)
                try:
                    await self.mounter.run(roots.attach_tree, tree, link)
                finally:
                    os.close(tree)
                layer = Layer(link.replace("/", ""), link, mount=link, pinned=True)
            else:
                os.symlink(path, os.path.join(self.state_dir, link))
                layer = Layer(link.replace("/", ""), link, pinned=True)
            ids.append(self.layers.add(layer).id)
        return Image(key, (*ids, "sys"), (), podman_env(info))

    async def aclose(self) -> None:
        """Give podman its images back (their copies here go with the mount namespace)."""
        for image_id in self._podman_mounted:
            try:
                await _podman("image", "unmount", image_id)
            except (Internal, NotFound, BadRequest):
                pass  # podman's bookkeeping: nothing of ours is left either way
        self._podman_mounted.clear()
