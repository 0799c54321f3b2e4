"""The ns runtime end to end: every operation's round trip, restore fidelity, bad input."""

import os
import signal

import pytest
import trio

from sandboxd import BadRequest, LimitExceeded, NotFound
from sandboxd.ns import MAX_FILE_BYTES

from .conftest import needs_root

pytestmark = needs_root

TREE = "cd / && find /testbed -xdev -printf '%p %m %s %l\\n' | sort && find /testbed -xdev -type f -exec md5sum {} + | sort"


async def test_exec_round_trip(rt):
    sid = await rt.create("host")
    res = await rt.exec(sid, ["/bin/sh", "-c", "echo out; echo err >&2; pwd; echo $FOO; cat; exit 3"],
                        env={"FOO": "bar"}, stdin=b"from stdin", cwd="/tmp")
    assert res.exit_code == 3
    assert res.output == b"out\nerr\n/tmp\nbar\nfrom stdin"
    assert not res.truncated and not res.timed_out
    res = await rt.exec(sid, "id -u; hostname; echo $HOME")
    assert res.output == b"0\nsandbox\n/root\n"


async def test_exec_streams_output(rt):
    sid = await rt.create("host")
    chunks = []

    async def on_output(chunk):
        chunks.append(chunk)

    res = await rt.exec(sid, "for i in 1 2 3; do echo $i; done", on_output=on_output)
    assert b"".join(chunks) == res.output == b"1\n2\n3\n"


async def test_exec_timeout_kills_the_whole_tree(rt):
    sid = await rt.create("host")
    script = "sleep 100 & (setsid sh -c 'trap \"\" TERM; sleep 101' &); trap '' TERM; sleep 102"
    res = await rt.exec(sid, script, timeout_s=0.5)
    assert res.timed_out and res.exit_code < 0
    assert 0.4 < res.duration_s < 5
    ps = await rt.exec(sid, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
    assert b"sleep" not in ps.output


async def test_output_is_capped_head_and_tail(rt):
    sid = await rt.create("host")
    res = await rt.exec(sid, "echo START; head -c 5000000 /dev/zero | tr '\\0' x; echo; echo END",
                        max_output_bytes=1000)
    assert res.truncated and res.exit_code == 0
    assert res.output.startswith(b"START\n") and res.output.endswith(b"END\n")
    assert len(res.output) < 1100 and res.output_bytes > 5_000_000


async def test_files_round_trip(rt):
    sid = await rt.create("host")
    await rt.write_file(sid, "pkg/a.py", b"print('hi')\n", mode=0o755)
    assert await rt.read_file(sid, "/testbed/pkg/a.py") == b"print('hi')\n"
    entries, more = await rt.list_dir(sid, "pkg")
    assert [(e.name, e.kind, e.size, e.mode) for e in entries] == [("a.py", "file", 12, 0o755)]
    assert not more
    res = await rt.exec(sid, "./pkg/a.py 2>&1 || python3 pkg/a.py")
    assert b"hi" in res.output
    with pytest.raises(NotFound) as info:
        await rt.read_file(sid, "missing.txt")
    assert info.value.field == "path"


async def test_snapshot_restore_is_byte_identical(rt):
    sid = await rt.create("host")
    await rt.exec(sid, "mkdir -p d/e && echo one > d/e/f && echo two > g && chmod 600 g && "
                       "ln -s d/e/f link && printf 'bin\\0ary' > b && chmod 4755 b")
    before = (await rt.exec(sid, TREE)).output
    snap = await rt.snapshot(sid)
    await rt.exec(sid, "rm -rf d g && echo changed > b && chmod 644 b && rm link && echo new > n && "
                       "echo more >> /root/x")
    assert (await rt.exec(sid, TREE)).output != before
    await rt.restore(sid, snap)
    assert (await rt.exec(sid, TREE)).output == before
    assert (await rt.exec(sid, "test -e /root/x")).exit_code == 1
    # and again: restoring twice is the same
    await rt.exec(sid, "rm -rf /testbed/*")
    await rt.restore(sid, snap)
    assert (await rt.exec(sid, TREE)).output == before
    # without a snapshot: back to the image
    await rt.restore(sid)
    assert (await rt.exec(sid, "ls -A /testbed")).output == b""


async def test_restore_kills_everything_even_double_forked_sigterm_ignorers(rt):
    sid = await rt.create("host")
    snap = await rt.snapshot(sid)
    res = await rt.exec(sid, "(setsid sh -c 'trap \"\" TERM HUP; while :; do sleep 1; done' </dev/null >/dev/null 2>&1 &) ;"
                             "nohup sh -c 'trap \"\" TERM; sleep 1000' >/dev/null 2>&1 & echo started")
    assert res.output == b"started\n" and not res.timed_out
    await rt.restore(sid, snap)
    ps = await rt.exec(sid, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
    assert b"sleep" not in ps.output and b"while" not in ps.output


async def test_restores_and_snapshots_leave_no_mounts_behind(rt):
    def mounts() -> int:  # in the mount thread's namespace, the spare uppers kept ready not counted
        rt.mounter.drain_background()
        with open(f"/proc/{rt.mounter.tid}/mountinfo") as f:
            return len(f.readlines()) - rt.stats()["spare_uppers"]

    sid = await rt.create("host")
    snap = await rt.snapshot(sid)
    await rt.restore(sid, snap)
    await rt.exec(sid, "true")  # the previous root is released once init has switched
    before = mounts()
    for i in range(10):
        await rt.exec(sid, f"echo {i} > /tmp/x; (sleep 100 &)")
        await rt.restore(sid, snap)
    for _ in range(3):
        await rt.restore(sid)
    await rt.exec(sid, "true")
    await trio.sleep(0.05)  # init's last release notice
    assert mounts() == before
    shell_roots = await trio.to_thread.run_sync(os.listdir, f"/proc/{rt.init_pid(sid)}/root")
    assert len([r for r in shell_roots if r.startswith("r")]) == 1


async def test_create_skips_embryos_that_died_waiting(rt):
    await rt.create("host")  # the zygote has delivered its embryos
    await trio.sleep(0.5)  # ... and replaced the one taken: kill them all (regression: that hung)
    embryos = list(rt.zygote._embryos)
    assert embryos
    for pid, _, _ in embryos:
        os.kill(pid, signal.SIGKILL)
    await trio.sleep(0.1)
    sids = [await rt.create("host") for _ in range(len(embryos) + 1)]
    for sid in sids:
        assert (await rt.exec(sid, "echo $$")).output == b"2\n"  # each its own pid namespace


async def test_fork_shares_layers_and_diverges(rt):
    sid = await rt.create("host")
    await rt.write_file(sid, "shared.txt", b"base")
    snap = await rt.snapshot(sid)
    a, b = await rt.fork(snap), await rt.fork(snap)
    await rt.write_file(a, "shared.txt", b"changed in a")
    assert await rt.read_file(b, "shared.txt") == b"base"
    assert await rt.read_file(sid, "shared.txt") == b"base"
    assert await rt.read_file(a, "shared.txt") == b"changed in a"
    layers = rt.stats()["layers"]
    await rt.destroy(a)
    await rt.destroy(b)
    await rt.destroy(sid)
    assert rt.stats()["layers"] == layers  # the snapshot still holds its layer
    await rt.delete_snapshot(snap)
    assert rt.stats()["layers"] == layers - 1  # nobody uses it: collected
    assert rt.stats()["sandboxes"] == 0


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
    await rt.restore(sid)  # as created: the repository as copied in, unchanged
    assert await rt.diff(sid, commit) == ""
    assert await rt.read_file(sid, "pkg/mod.py") == b"def f():\n    return 1\n"


async def test_workdir_missing_from_the_image_is_made_and_kept(rt, tmp_path):
    root = tmp_path / "img"
    (root / "bin").mkdir(parents=True)
    sid = await rt.create(f"dir:{root}", workdir="/work/here")
    assert (await rt.list_dir(sid, "/work"))[0][0].name == "here"
    await rt.restore(sid)
    assert (await rt.list_dir(sid, "."))[0] == []  # still there, empty


async def test_dir_image(rt, tmp_path):
    root = tmp_path / "img"
    (root / "data").mkdir(parents=True)
    (root / "data" / "x").write_text("from the image")
    sid = await rt.create(f"dir:{root}")
    assert await rt.read_file(sid, "/data/x") == b"from the image"
    entries, _ = await rt.list_dir(sid, "/")
    assert {"data", "dev", "proc", "tmp", "testbed"} <= {e.name for e in entries}
    await rt.write_file(sid, "/data/x", b"changed")
    assert (root / "data" / "x").read_text() == "from the image"  # the image is a read-only lower


async def test_bad_input_gets_typed_errors_naming_the_field(rt):
    sid = await rt.create("host")
    cases = [
        (rt.exec("sb-nope", ["true"]), NotFound, "sandbox_id"),
        (rt.restore(sid, "sn-nope"), NotFound, "snapshot_id"),
        (rt.fork("sn-nope"), NotFound, "snapshot_id"),
        (rt.create("docker:ubuntu"), BadRequest, "image"),
        (rt.create("dir:relative/path"), BadRequest, "image"),
        (rt.create("dir:/nonexistent/dir"), NotFound, "image"),
        (rt.exec(sid, ["true"], timeout_s=-1), BadRequest, "timeout_s"),
        (rt.exec(sid, ["true"], timeout_s=float("nan")), BadRequest, "timeout_s"),
        (rt.exec(sid, []), BadRequest, "argv"),
        (rt.exec(sid, ["no-such-command-xyz"]), NotFound, "argv"),
        (rt.exec(sid, ["true"], cwd="/no/such/dir"), NotFound, "cwd"),
        (rt.exec(sid, ["true"], env={"A=B": "x"}), BadRequest, "env.A=B"),
        (rt.exec(sid, ["true"], max_output_bytes=-5), BadRequest, "max_output_bytes"),
        (rt.write_file(sid, "big", b"x" * (MAX_FILE_BYTES + 1)), LimitExceeded, "data"),
        (rt.write_file(sid, "/usr/evil", b"x"), BadRequest, "path"),
        (rt.read_file(sid, "/testbed"), BadRequest, "path"),
        (rt.list_dir(sid, "/etc/passwd"), BadRequest, "path"),
    ]
    for coro, exc_type, field in cases:
        with pytest.raises(exc_type) as info:
            await coro
        assert info.value.field == field, (info.value, field)
    # the sandbox is still fine
    assert (await rt.exec(sid, "echo ok")).output == b"ok\n"


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
    with trio.move_on_after(0.3):
        await rt.exec(sid, "sleep 50")
    ps = await rt.exec(sid, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
    assert b"sleep 50" not in ps.output


async def test_stats(rt):
    sid = await rt.create("host")
    await rt.exec(sid, "head -c 1000000 /dev/zero > /tmp/f; (sleep 30 >/dev/null 2>&1 &)")
    st = await rt.sandbox_stats(sid)
    assert st["disk_bytes"] >= 1_000_000 and st["pids"] == 1 and st["memory_bytes"] > 0
    node = rt.stats()
    assert node["sandboxes"] == 1 and node["runtime"] == "ns"
