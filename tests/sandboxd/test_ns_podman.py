"""The ns runtime on `podman:<image>` images: the image's root filesystem (its layers, read-only)
under the sandbox, its environment, no host binds. Images are made here with `podman import`
and `podman build` (no registry)."""

import hashlib
import json
import os
import shutil
import subprocess

import pytest

from sandboxd import NotFound

from .conftest import needs_root

pytestmark = needs_root

TEST_REPO = "localhost/sandboxd-ns-test"
IMAGE_PATH = "/opt/tools:/usr/bin:/bin"


def _podman(*args, **kwargs):
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120, **kwargs)


def _mini_rootfs(dst) -> None:
    """sh, cat, env, ls, rm and their libraries, from the host (merged /usr symlinks kept)."""
    for name in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink(f"/{name}"):
            os.makedirs(dst / os.readlink(f"/{name}"), exist_ok=True)
            os.symlink(os.readlink(f"/{name}"), dst / name)
    wanted = {shutil.which(b) for b in ("sh", "cat", "env", "ls", "rm")}
    for binary in list(wanted):
        out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
        wanted.update(tok for tok in out.split() if tok.startswith("/"))
    for path in sorted(wanted):
        target = f"{dst}{path}"
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            shutil.copy2(os.path.realpath(path), target)
    (dst / "etc").mkdir(exist_ok=True)
    (dst / "etc" / "marker").write_text("from the image\n")


@pytest.fixture(scope="module")
def podman_image(tmp_path_factory):
    """A two-layer image: an imported root filesystem, then a COPY on top. Tagged by content,
    kept in podman's store (made once per machine)."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    probe = _podman("info", "--format", "{{.Store.GraphDriverName}}")
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run here: {probe.stderr.strip()[-300:]}")
    work = tmp_path_factory.mktemp("podman-image")
    rootfs = work / "rootfs"
    rootfs.mkdir()
    _mini_rootfs(rootfs)
    digest = hashlib.sha256(subprocess.run(["tar", "-C", str(rootfs), "--sort=name", "--mtime=@0", "-cf", "-", "."],
                                           capture_output=True, check=True).stdout).hexdigest()[:12]
    name = f"{TEST_REPO}:{digest}"
    if _podman("image", "exists", name).returncode != 0:
        base = f"{TEST_REPO}:{digest}-base"
        tar = work / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
        res = _podman("import", "--change", f"ENV PATH={IMAGE_PATH}", "--change", "ENV IMAGE_VAR=yes", str(tar), base)
        if res.returncode != 0:
            pytest.skip(f"podman import failed: {res.stderr.strip()[-300:]}")
        ctx = work / "ctx"
        ctx.mkdir()
        (ctx / "second").write_text("from the second layer\n")
        (ctx / "Containerfile").write_text(f"FROM {base}\nCOPY second /etc/second\n")
        res = _podman("build", "--pull=never", "-t", name, str(ctx))
        if res.returncode != 0:
            pytest.skip(f"podman build failed: {res.stderr.strip()[-300:]}")
        _podman("rmi", base)  # the tag only; its layer stays under the new image
    return name


def _mounted_images() -> str:
    return _podman("image", "mount").stdout


async def test_podman_image_is_the_root_with_its_env_and_no_host_binds(rt, podman_image):
    sid = await rt.create(f"podman:{podman_image}", env={"WHO": "me"})
    res = await rt.exec(sid, "cat /etc/marker /etc/second; echo $PATH $IMAGE_VAR $WHO; pwd")
    assert res.output == (b"from the image\nfrom the second layer\n" + f"{IMAGE_PATH} yes me\n".encode()
                          + b"/testbed\n"), res.output
    # nothing of the host: no python, no /work, no host /etc
    res = await rt.exec(sid, "ls /usr/bin/python3 /work /etc/hostname 2>&1; echo rc=$?")
    assert res.output.count(b"No such file") == 3
    # the image's layers are read-only lowers: writes land in the sandbox only
    inspect = json.loads(_podman("image", "inspect", podman_image).stdout)[0]
    upper_dir = inspect["GraphDriver"]["Data"]["UpperDir"]
    await rt.exec(sid, "echo changed > /etc/second; rm /etc/marker")
    assert open(f"{upper_dir}/etc/second").read() == "from the second layer\n"
    snap = await rt.snapshot(sid)
    child = await rt.fork(snap)
    assert (await rt.exec(child, "cat /etc/second; test -e /etc/marker || echo gone")).output == b"changed\ngone\n"
    await rt.restore(sid)
    assert (await rt.exec(sid, "cat /etc/marker")).output == b"from the image\n"
    assert podman_image in _mounted_images()  # pinned while the runtime uses it
    await rt.aclose()
    assert podman_image not in _mounted_images()  # and given back


async def test_podman_image_through_its_mount(rt, podman_image):
    """The path for storage drivers other than overlay: a copy of `podman image mount`'s mount."""
    rt.images.use_layer_dirs = False
    sid = await rt.create(f"podman:{podman_image}")
    assert (await rt.exec(sid, "cat /etc/marker /etc/second")).output == b"from the image\nfrom the second layer\n"
    await rt.write_file(sid, "/etc/marker", b"changed")
    await rt.restore(sid)
    assert await rt.read_file(sid, "/etc/marker") == b"from the image\n"


async def test_unknown_podman_image_is_not_found(rt, podman_image):
    with pytest.raises(NotFound) as info:
        await rt.create(f"{podman_image}-no-such-tag".replace(TEST_REPO, "podman:" + TEST_REPO))
    assert info.value.field == "image"
