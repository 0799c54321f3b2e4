"""The podman runtime end to end: every operation's round trip, restore fidelity, kills, bad input,
crash clean-up. One podman API service for the module; a runtime (own state directory, own label)
per test, which must leave no container or image behind."""

import os
import shutil
import subprocess
import time

import pytest
import trio

from sandboxd import BadRequest, LimitExceeded, Limits, NotFound
from sandboxd.ns import MAX_FILE_BYTES

podman_py = pytest.importorskip("podman", reason="podman-py is not installed (pip install podman)")

from sandboxd import podman_setup  # noqa: E402
from sandboxd.dirrt import state_key  # noqa: E402
from sandboxd.podman import LABEL, ULIMITS, open_podman_runtime  # noqa: E402

pytestmark = pytest.mark.skipif(
    shutil.which("podman") is None or shutil.which("runc") is None or os.geteuid() != 0,
    reason="the podman runtime tests need podman and runc (apt-get install podman runc) and root",
)

LIMITS = Limits(memory_bytes=512 << 20, pids=256, disk_bytes=64 << 20)
TREE = ("cd / && find /testbed /root -xdev -printf '%p %m %s %l\\n' | sort && "
        "find /testbed /root -xdev -type f -exec md5sum {} + | sort")
PS = "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"


def _podman_env(tmp_path_factory) -> dict:
    conf = podman_setup.write_containers_conf(str(tmp_path_factory.mktemp("podman-conf")))
    return podman_setup.podman_env(conf)


@pytest.fixture(scope="module")
def podman_service(tmp_path_factory):
    """One `podman system service` for the module's runtimes; (url, client). Stopped at the end."""
    sock = tmp_path_factory.mktemp("podman") / "api.sock"
    proc = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"],
                            env=_podman_env(tmp_path_factory), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=sock.parent)  # conmon writes files like "oom" into its working directory
    try:
        client = podman_py.PodmanClient(base_url=f"unix://{sock}")
        deadline = time.monotonic() + 30
        while not (sock.exists() and _pings(client)):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"podman system service does not start: {proc.stderr.read().decode()[-500:]}")
            time.sleep(0.05)
        yield f"unix://{sock}", client
        client.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _pings(client) -> bool:
    try:
        return client.ping()
    except Exception:  # noqa: BLE001  not up yet
        return False


def _ours(client, key: str) -> tuple[list, list]:
    label = {"label": f"{LABEL}={key}"}
    return client.containers.list(all=True, filters=label), client.images.list(all=True, filters=label)


@pytest.fixture
async def rt(tmp_path, podman_service):
    url, client = podman_service
    async with open_podman_runtime(str(tmp_path / "state"), service_url=url, limits=LIMITS) as runtime:
        yield runtime
    containers, images = _ours(client, runtime.key)
    assert not containers and not images, f"left behind: {containers} {images}"


async def test_exec_round_trip(rt):
    sid = await rt.create("host")
    res = await rt.exec(sid, ["/bin/sh", "-c", "echo out; echo err >&2; pwd; echo $FOO; cat; exit 3"],
                        env={"FOO": "bar"}, stdin=b"from stdin", cwd="/tmp")
    assert res.exit_code == 3
    assert res.output == b"out\nerr\n/tmp\nbar\nfrom stdin"
    assert not res.truncated and not res.timed_out
    res = await rt.exec(sid, "id -u; hostname; echo $HOME; pwd; ls /run/sandboxd")
    assert res.output == b"0\nsandbox\n/root\n/testbed\n"  # the stdin file is gone too
    res = await rt.exec(sid, "cat", stdin=b"x" * 300_000)
    assert res.output == b"x" * 300_000


async def test_exec_streams_output_as_it_comes(rt):
    sid = await rt.create("host")
    chunks = []

    async def on_output(chunk):
        chunks.append((trio.current_time(), chunk))

    start = trio.current_time()
    res = await rt.exec(sid, "echo 1; sleep 0.5; echo 2", on_output=on_output)
    assert b"".join(c for _, c in chunks) == res.output == b"1\n2\n"
    assert chunks[0][0] - start < 0.4  # before the command ended


async def test_exec_timeout_kills_the_whole_tree(rt):
    sid = await rt.create("host")
    script = "sleep 100 & (setsid sh -c 'trap \"\" TERM; sleep 101' &); trap '' TERM; sleep 102"
    res = await rt.exec(sid, script, timeout_s=0.5)
    assert res.timed_out and res.exit_code == -9
    assert 0.4 < res.duration_s < 5
    assert b"sleep 10" not in (await rt.exec(sid, PS)).output


async def test_output_is_capped_head_and_tail(rt):
    sid = await rt.create("host")
    res = await rt.exec(sid, "echo START; head -c 5000000 /dev/zero | tr '\\0' x; echo; echo END",
                        max_output_bytes=1000)
    assert res.truncated and res.exit_code == 0
    assert res.output.startswith(b"START\n") and res.output.endswith(b"END\n")
    assert len(res.output) < 1100 and res.output_bytes > 5_000_000


async def test_files_round_trip_and_escapes(rt):
    sid = await rt.create("host")
    await rt.write_file(sid, "pkg/a.py", b"print('hi')\n", mode=0o755)
    assert await rt.read_file(sid, "/testbed/pkg/a.py") == b"print('hi')\n"
    entries, more = await rt.list_dir(sid, "pkg")
    assert [(e.name, e.kind, e.size, e.mode) for e in entries] == [("a.py", "file", 12, 0o755)] and not more
    assert (await rt.exec(sid, "python3 pkg/a.py")).output == b"hi\n"
    await rt.exec(sid, "ln -s /etc/hostname abs && ln -s ../../../../../etc/hostname rel && ln -s pkg/a.py ok")
    assert await rt.read_file(sid, "ok") == b"print('hi')\n"  # a symlink that stays inside is fine
    for call in (rt.read_file(sid, "../../etc/passwd"), rt.read_file(sid, "/testbed/../../x"),
                 rt.read_file(sid, "abs"), rt.read_file(sid, "rel"), rt.write_file(sid, "rel", b"x"),
                 rt.list_dir(sid, "../.."), rt.write_file(sid, "/usr/evil", b"x")):
        with pytest.raises(BadRequest) as info:
            await call
        assert info.value.field == "path"
    with pytest.raises(NotFound) as info:
        await rt.read_file(sid, "missing.txt")
    assert info.value.field == "path"


async def test_snapshot_restore_is_byte_identical(rt):
    sid = await rt.create("host")
    await rt.exec(sid, "mkdir -p d/e && echo one > d/e/f && echo two > g && chmod 600 g && "
                       "ln -s d/e/f link && printf 'bin\\0ary' > b && chmod 4755 b && echo r > /root/r")
    before = (await rt.exec(sid, TREE)).output
    snap = await rt.snapshot(sid)
    await rt.exec(sid, "rm -rf d g /root/r && echo changed > b && chmod 644 b && rm link && echo new > n && "
                       "echo more >> /root/x")
    assert (await rt.exec(sid, TREE)).output != before
    await rt.restore(sid, snap)
    assert (await rt.exec(sid, TREE)).output == before
    assert (await rt.exec(sid, "test -e /root/x")).exit_code == 1
    await rt.exec(sid, "rm -rf /testbed/*")
    await rt.restore(sid, snap)  # twice: the same
    assert (await rt.exec(sid, TREE)).output == before
    await rt.restore(sid)  # no snapshot: as created
    assert (await rt.exec(sid, "ls -A /testbed /root")).output == b"/root:\n\n/testbed:\n"


async def test_restore_kills_everything_even_double_forked_sigterm_ignorers(rt):
    sid = await rt.create("host")
    snap = await rt.snapshot(sid)
    detached = "(setsid sh -c 'trap \"\" TERM HUP; while :; do sleep 1; done' </dev/null >/dev/null 2>&1 &)"
    res = await rt.exec(sid, f"{detached}; nohup sh -c 'trap \"\" TERM; sleep 1000' >/dev/null 2>&1 & echo started")
    assert res.output == b"started\n"
    await rt.restore(sid, snap)
    ps = (await rt.exec(sid, PS)).output
    assert b"sleep 1" not in ps and b"while" not in ps


async def test_fork_diverges_and_images_are_collected(rt):
    sid = await rt.create("host")
    await rt.write_file(sid, "shared.txt", b"base")
    snap = await rt.snapshot(sid)
    a, b = await rt.fork(snap), await rt.fork(snap)
    await rt.write_file(a, "shared.txt", b"changed in a")
    assert await rt.read_file(b, "shared.txt") == b"base"
    assert await rt.read_file(sid, "shared.txt") == b"base"
    assert await rt.read_file(a, "shared.txt") == b"changed in a"
    snap_a = await rt.snapshot(a)  # a snapshot of a fork: an image on top of the first one
    await rt.delete_snapshot(snap)  # the forks still use its image
    await rt.restore(b)  # a fork's origin is the snapshot it came from
    assert await rt.read_file(b, "shared.txt") == b"base"
    c = await rt.fork(snap_a)
    assert await rt.read_file(c, "shared.txt") == b"changed in a"
    assert rt.stats()["images"] == 2
    for s in (a, b, c, sid):
        await rt.destroy(s)
    await rt.delete_snapshot(snap_a)
    assert rt.stats()["images"] == 0 and rt.stats()["sandboxes"] == 0
    with pytest.raises(NotFound):
        await rt.fork(snap)


async def test_repo_copy_and_diff(rt, git_repo):
    path, commit = git_repo
    sid = await rt.create("host", repo=path)
    assert await rt.read_file(sid, "pkg/mod.py") == b"def f():\n    return 1\n"
    assert await rt.diff(sid, commit) == ""
    await rt.write_file(sid, "pkg/mod.py", b"def f():\n    return 2\n")
    await rt.write_file(sid, "new.txt", b"new file\n")
    patch = await rt.diff(sid, commit)
    assert "-    return 1\n+    return 2" in patch and "+++ b/new.txt" in patch
    status = await rt.exec(sid, "git -c safe.directory='*' status --porcelain")
    assert status.output == b" M pkg/mod.py\n?? new.txt\n"  # the repository's own index is untouched
    with pytest.raises(NotFound) as info:
        await rt.diff(sid, "0" * 40)
    assert info.value.field == "base_commit"
    await rt.restore(sid)  # as created: the repository, unchanged
    assert await rt.diff(sid, commit) == ""


def _mini_rootfs(dst) -> None:
    """A root filesystem of a few host binaries (sh, sleep, cat, ls) and their libraries."""
    for name in ("bin", "lib", "lib64", "sbin"):  # merged /usr: the same symlinks as the host
        if os.path.islink(f"/{name}"):
            os.makedirs(dst / os.readlink(f"/{name}"), exist_ok=True)
            os.symlink(os.readlink(f"/{name}"), dst / name)
    wanted = {shutil.which(b) for b in ("sh", "sleep", "cat", "ls")}
    for binary in list(wanted):
        out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
        wanted.update(tok for tok in out.split() if tok.startswith("/"))
    for path in wanted:
        target = f"{dst}{path}"
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.realpath(path), target)
    (dst / "tmp").mkdir(mode=0o1777)


async def test_podman_image_from_an_imported_root_filesystem(rt, tmp_path):
    name = f"localhost/sandboxd-test-mini:{os.getpid()}"
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    _mini_rootfs(rootfs)
    await trio.to_thread.run_sync(lambda: podman_setup.import_rootfs(
        str(rootfs), name, changes=("ENV GREETING=hello", "ENV PATH=/usr/bin:/bin")))
    try:
        sid = await rt.create(f"podman:{name}", workdir="/work", env={"WHO": "me"})
        res = await rt.exec(sid, "echo $GREETING $WHO; pwd; cat > f; ls", stdin=b"data")
        assert res.output == b"hello me\n/work\nf\n"
        snap = await rt.snapshot(sid)
        await rt.restore(sid)  # as created: an empty /work, made by the runtime
        assert (await rt.exec(sid, "ls -A")).output == b""
        await rt.restore(sid, snap)
        assert await rt.read_file(sid, "f") == b"data"
        await rt.destroy(sid)
        await rt.delete_snapshot(snap)
    finally:
        with trio.CancelScope(shield=True):
            await rt.aclose()  # its containers and images go before the image they are made from
            await trio.to_thread.run_sync(lambda: podman_setup.remove_image(name))


async def test_bad_input_gets_typed_errors_naming_the_field(rt):
    sid = await rt.create("host")
    cases = [
        (rt.exec("sb-nope", ["true"]), NotFound, "sandbox_id"),
        (rt.read_file("sb-nope", "x"), NotFound, "sandbox_id"),
        (rt.destroy("sb-nope"), NotFound, "sandbox_id"),
        (rt.snapshot("sb-nope"), NotFound, "sandbox_id"),
        (rt.restore(sid, "sn-nope"), NotFound, "snapshot_id"),
        (rt.fork("sn-nope"), NotFound, "snapshot_id"),
        (rt.delete_snapshot("sn-nope"), NotFound, "snapshot_id"),
        (rt.create("docker:ubuntu"), BadRequest, "image"),
        (rt.create("dir:/tmp"), BadRequest, "image"),
        (rt.create("podman:localhost/no-such-image:1"), NotFound, "image"),
        (rt.create("host", workdir="rel"), BadRequest, "workdir"),
        (rt.create("host", repo="/no/such/repo"), NotFound, "repo"),
        (rt.create("host", limits=Limits(pids=0)), BadRequest, "limits.pids"),
        (rt.exec(sid, ["true"], timeout_s=-1), BadRequest, "timeout_s"),
        (rt.exec(sid, ["true"], timeout_s=float("nan")), BadRequest, "timeout_s"),
        (rt.exec(sid, []), BadRequest, "argv"),
        (rt.exec(sid, ["no-such-command-xyz"]), NotFound, "argv"),
        (rt.exec(sid, ["true"], cwd="/no/such/dir"), NotFound, "cwd"),
        (rt.exec(sid, ["true"], cwd="../../.."), BadRequest, "cwd"),
        (rt.exec(sid, ["true"], env={"A=B": "x"}), BadRequest, "env.A=B"),
        (rt.exec(sid, ["true"], max_output_bytes=-5), BadRequest, "max_output_bytes"),
        (rt.write_file(sid, "big", b"x" * (MAX_FILE_BYTES + 1)), LimitExceeded, "data"),
        (rt.read_file(sid, "/testbed"), BadRequest, "path"),
        (rt.list_dir(sid, "/etc/passwd"), BadRequest, "path"),
    ]
    for coro, exc_type, field in cases:
        with pytest.raises(exc_type) as info:
            await coro
        assert info.value.field == field, (info.value, field)
    assert (await rt.exec(sid, "echo ok")).output == b"ok\n"  # the sandbox is still fine


async def test_concurrent_execs_in_one_sandbox(rt):
    sid = await rt.create("host")
    results = {}

    async def run(i):
        results[i] = await rt.exec(sid, f"sleep 0.2; echo {i}")

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(run, i)
    assert {i: r.output for i, r in results.items()} == {i: f"{i}\n".encode() for i in range(5)}


async def test_cancelled_exec_leaves_nothing_running(rt):
    sid = await rt.create("host")
    with trio.move_on_after(0.5):
        await rt.exec(sid, "sleep 50")
    assert b"sleep 50" not in (await rt.exec(sid, PS)).output


async def test_limits_and_stats(rt):
    sid = await rt.create("host", limits=Limits(memory_bytes=64 << 20, pids=32, disk_bytes=64 << 20))
    res = await rt.exec(sid, "for i in $(seq 64); do sleep 30 & done; wait", timeout_s=2)
    assert b"fork" in res.output.lower()  # the pids limit
    await rt.restore(sid)  # and the sleeps that did start are gone
    res = await rt.exec(sid, "python3 -c 'b = bytearray(200 << 20); print(len(b))'")
    assert res.exit_code != 0  # memory limit: OOM-killed or MemoryError
    await rt.exec(sid, "head -c 1000000 /dev/zero > /tmp/f")
    st = await rt.sandbox_stats(sid)
    assert st["disk_bytes"] >= 1_000_000 and st["pids"] >= 1 and st["memory_bytes"] > 0
    node = rt.stats()
    assert node["sandboxes"] == 1 and node["runtime"] == "podman"


async def test_crash_leftovers_are_removed_on_start(tmp_path, podman_service):
    """Containers, images and the API service of a crashed run of the same state directory go;
    the runtime's own service stops on exit."""
    _, client = podman_service
    state = tmp_path / "state"
    state.mkdir()
    key = state_key(str(state))
    host, _ = podman_setup.ensure_host_image()
    ct = client.containers.create(host, ["/usr/bin/sleep", "1000"], labels={LABEL: key}, ulimits=ULIMITS,
                                  mounts=[{"type": "bind", "source": "/usr", "target": "/usr", "read_only": True}])
    try:
        ct.start()
    except Exception:
        ct.remove(force=True)
        raise
    client.images.get(ct.commit(repository="localhost/sandboxd-snap", tag=f"{key}-stale",
                                changes=[f"LABEL {LABEL}={key}"]).id)
    stale_sock = state / "podman.sock"
    stale = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{stale_sock}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (state / "podman-service.pid").write_text(str(stale.pid))
    try:
        containers, images = _ours(client, key)
        assert len(containers) == 1 and len(images) == 1
        async with open_podman_runtime(str(state), limits=LIMITS) as rt:
            assert _ours(client, key) == ([], [])
            assert stale.poll() is not None  # the stale service was stopped
            sid = await rt.create("host")
            assert (await rt.exec(sid, "echo alive")).output == b"alive\n"
            service_pid = int((state / "podman-service.pid").read_text())
        assert _ours(client, key) == ([], [])
        assert not os.path.exists(f"/proc/{service_pid}") or _zombie(service_pid)
        assert not stale_sock.exists()
    finally:
        if stale.poll() is None:
            stale.kill()
        stale.wait()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True
