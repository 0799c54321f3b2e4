"""Podman plumbing for the podman runtime: its API service and its images, made without a registry.

    env = podman_env(write_containers_conf(state_dir))      # CONTAINERS_CONF for podman and its service
    client = connect("unix:///run/x.sock", None, 30.0)      # once the service answers
    name, binds = ensure_host_image(env=env)                # the `host` image
    import_rootfs("/srv/rootfs.tar", "localhost/swe:django")  # a tar (or a directory) -> image

The `host` image is a skeleton of a few kilobytes: the host's top-level layout (merged-/usr
symlinks such as /bin -> usr/bin, empty mount points for the host directories it binds read-only,
the list of the ns runtime's host image), /tmp, /testbed, /root. Its containers bind the host's
/usr, /etc, ... read-only, so they run the host's python, git and sh. Its tag is a hash of its
content: imported once per machine layout, kept in podman's store (sandboxd never removes it).

Blocking functions (podman commands, HTTP); callers in trio run them in a worker thread.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import tarfile
import time

import podman as podman_py
import podman.errors as podman_errors
import requests

from sandboxd.errors import Internal, NotFound
from sandboxd.layers import HOST_RO_BINDS

__all__ = ["CONTAINERS_CONF", "write_containers_conf", "podman_env", "stop_stale_service", "connect",
           "HOST_IMAGE_REPO", "host_skeleton", "ensure_host_image", "import_rootfs", "image_exists", "remove_image"]

CONTAINERS_CONF = """\
# Written by sandboxd (podman runtime); used through CONTAINERS_CONF by its podman service.
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
runtime = "{runtime}"
events_logger = "file"
# Each exec's conmon lingers this long after the exec ends (300 s by default, as Docker keeps exit
# codes): the runtime reads the exit code at once, and a busy sandbox would otherwise keep
# hundreds of conmon processes around.
exit_command_delay = {exit_delay_s}
"""
EXIT_DELAY_S = 10


def write_containers_conf(state_dir: str, oci_runtime: str = "runc") -> str:
    """containers.conf for the runtime's podman service (OCI runtime runc: crun fails on hybrid
    cgroups v1; the ulimits without which containers do not start here). Returns its path."""
    path = os.path.join(state_dir, "containers.conf")
    with open(path, "w") as f:
        f.write(CONTAINERS_CONF.format(runtime=oci_runtime, exit_delay_s=EXIT_DELAY_S))
    return path


def podman_env(conf: str) -> dict[str, str]:
    """The environment for podman and its service: CONTAINERS_CONF, not /etc, is ours."""
    return {**os.environ, "CONTAINERS_CONF": conf}


def stop_stale_service(pid_file: str, sock: str) -> None:
    """A podman service left by a crashed run of this state directory still listens on sock."""
    try:
        pid = int(open(pid_file).read())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if f"unix://{sock}".encode() not in f.read():
                return
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not _alive(pid):
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except OSError:
        return False


def connect(url: str, service, timeout_s: float) -> podman_py.PodmanClient:
    """A client of the API service at url, once it answers (the service we started, a process
    with `returncode`, or None, may still be creating its socket)."""
    deadline = time.monotonic() + timeout_s
    path = url.removeprefix("unix://") if url.startswith("unix://") else None
    while True:
        if service is not None and service.returncode is not None:
            raise Internal(f"podman system service exited with status {service.returncode}")
        if path is None or os.path.exists(path):
            client = podman_py.PodmanClient(base_url=url, max_pool_size=64)
            try:
                if client.ping():
                    return client
            except (podman_errors.APIError, requests.RequestException):
                pass
            client.close()
        if time.monotonic() > deadline:
            raise Internal(f"the podman API service did not answer on {url} within {timeout_s} s")
        time.sleep(0.02)


# ---------------------------------------------------------------- images

HOST_IMAGE_REPO = "localhost/sandboxd-host"
_SKELETON_DIRS = {"tmp": 0o1777, "var": 0o755, "var/tmp": 0o1777, "root": 0o700, "testbed": 0o755,
                  "proc": 0o555, "sys": 0o555, "dev": 0o755, "run": 0o755, "home": 0o755}


def host_skeleton() -> tuple[bytes, list[str]]:
    """The host image's root filesystem as a tar (deterministic: same layout, same bytes) and the
    host directories its containers bind read-only."""
    dirs = dict(_SKELETON_DIRS)
    links = {}
    binds = []
    for host_dir in HOST_RO_BINDS:
        rel = host_dir.lstrip("/")
        if os.path.islink(host_dir):
            links[rel] = os.readlink(host_dir)
        elif os.path.isdir(host_dir):
            dirs[rel] = 0o755
            binds.append(host_dir)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for rel in sorted(dirs):
            info = tarfile.TarInfo(rel)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, dirs[rel], 0
            tar.addfile(info)
        for rel in sorted(links):
            info = tarfile.TarInfo(rel)
            info.type, info.mode, info.linkname, info.mtime = tarfile.SYMTYPE, 0o777, links[rel], 0
            tar.addfile(info)
    return buf.getvalue(), binds


def _podman(args: list[str], *, podman: str, env: dict | None, stdin=None, input: bytes | None = None
            ) -> subprocess.CompletedProcess:
    return subprocess.run([podman, *args], env=env, stdin=stdin, input=input, capture_output=True)


def image_exists(name: str, *, podman: str = "podman", env: dict | None = None) -> bool:
    return _podman(["image", "exists", name], podman=podman, env=env).returncode == 0


def ensure_host_image(*, podman: str = "podman", env: dict | None = None) -> tuple[str, list[str]]:
    """The `host` image's name (imported now if this machine does not have it yet) and its binds."""
    skeleton, binds = host_skeleton()
    name = f"{HOST_IMAGE_REPO}:{hashlib.sha256(skeleton).hexdigest()[:12]}"
    if not image_exists(name, podman=podman, env=env):
        res = _podman(["import", "--quiet", "--message", "sandboxd host skeleton", "-", name], podman=podman,
                      env=env, input=skeleton)
        if res.returncode != 0:
            raise Internal(f"podman import of the host image failed: {res.stderr.decode(errors='replace')[-2000:]}")
    return name, binds


def import_rootfs(source: str, name: str, *, podman: str = "podman", env: dict | None = None,
                  changes: tuple[str, ...] = ()) -> str:
    """Import a root filesystem, a tar file (plain or compressed) or a directory, as image `name`
    (e.g. localhost/swe:django-11099); `changes` are Containerfile instructions (ENV, WORKDIR).
    Returns the image id."""
    args = ["import", "--quiet"]
    for change in changes:
        args += ["--change", change]
    if os.path.isdir(source):
        tar = subprocess.Popen(["tar", "-C", source, "--numeric-owner", "-cf", "-", "."], stdout=subprocess.PIPE)
        try:
            res = _podman([*args, "-", name], podman=podman, env=env, stdin=tar.stdout)
        finally:
            tar.stdout.close()
            tar_rc = tar.wait()
        if tar_rc != 0:
            raise Internal(f"tar of {source} failed with status {tar_rc}")
    elif os.path.isfile(source):
        res = _podman([*args, source, name], podman=podman, env=env)
    else:
        raise NotFound(f"no root filesystem at {source!r}", field="source")
    if res.returncode != 0:
        raise Internal(f"podman import {source} failed: {res.stderr.decode(errors='replace')[-2000:]}")
    return res.stdout.decode().strip().rpartition(":")[2]


def remove_image(name: str, *, podman: str = "podman", env: dict | None = None) -> None:
    res = _podman(["rmi", "--force", name], podman=podman, env=env)
    if res.returncode != 0 and image_exists(name, podman=podman, env=env):
        raise Internal(f"podman rmi {name} failed: {res.stderr.decode(errors='replace')[-2000:]}")
