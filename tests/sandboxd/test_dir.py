"""The dir runtime (plain copies, no isolation) end to end: every operation's round trip, restore
fidelity, kills, bad input, crash clean-up, and the loud warning."""

import logging
import os
import subprocess

import pytest
import trio

from sandboxd import BadRequest, LimitExceeded, Limits, NotFound
from sandboxd.dirrt import MARKER_VAR, kill_process_tree, marked_processes, open_dir_runtime, state_key
from sandboxd.ns import MAX_FILE_BYTES

LIMITS = Limits(memory_bytes=512 << 20, pids=256, disk_bytes=64 << 20)
# From the sandbox directory (cwd "/"): every path, mode, size, link target and content.
TREE = "find . -printf '%p %m %s %l\\n' | sort && find . -type f -exec md5sum {} + | sort"


@pytest.fixture
async def rt(tmp_path):
    state = tmp_path / "state"
    async with open_dir_runtime(str(state), limits=LIMITS) as runtime:
        yield runtime
    assert sorted(os.listdir(state)) == [], "sandbox or snapshot directories left behind"
    assert marked_processes(f"{MARKER_VAR}={runtime.key}.") == []


def _ps() -> bytes:
    """Command lines of the host's processes (the dir runtime has no pid namespace)."""
    out = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                out.append(f.read().replace(b"\0", b" "))
        except OSError:  # not a process, or gone
            pass
    return b"\n".join(out)


async def test_start_warns_loudly_about_no_isolation(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sandboxd.dir"):
        async with open_dir_runtime(str(tmp_path / "state")):
            pass
    assert any(r.levelno == logging.WARNING and "NO ISOLATION" in r.getMessage() for r in caplog.records)


async def test_exec_round_trip(rt):
    sid = await rt.create("host")
    res = await rt.exec(sid, ["/bin/sh", "-c", "echo out; echo err >&2; pwd; echo $FOO; cat; exit 3"],
                        env={"FOO": "bar"}, stdin=b"from stdin", cwd="/tmp")
    root = os.path.join(rt.state_dir, "s", sid)
    assert res.exit_code == 3
    assert res.output == f"out\nerr\n{root}/tmp\nbar\nfrom stdin".encode()
    assert not res.truncated and not res.timed_out
    res = await rt.exec(sid, "pwd; echo $HOME; echo $TMPDIR")
    assert res.output == f"{root}/testbed\n{root}/root\n{root}/tmp\n".encode()
    assert (await rt.exec(sid, "cat", stdin=b"x" * 300_000)).output == b"x" * 300_000


async def test_exec_streams_output_as_it_comes(rt):
    sid = await rt.create("host")
    chunks = []

    async def on_output(chunk):
        chunks.append((trio.current_time(), chunk))

    start = trio.current_time()
    res = await rt.exec(sid, "echo 1; sleep 0.5; echo 2", on_output=on_output)
    assert b"".join(c for _, c in chunks) == res.output == b"1\n2\n"
    assert chunks[0][0] - start < 0.4


async def test_exec_timeout_kills_the_whole_tree(rt):
    sid = await rt.create("host")
    tag = f"sleep 10{os.getpid() % 10}"  # distinct from any other test run on this host
    script = f"{tag}1 & (setsid sh -c 'trap \"\" TERM; {tag}2' &); trap '' TERM; {tag}3"
    res = await rt.exec(sid, script, timeout_s=0.5)
    assert res.timed_out and res.exit_code == -9
    assert 0.4 < res.duration_s < 5
    assert tag.encode() not in _ps()


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
    await rt.exec(sid, "ln -s /etc/hostname abs && ln -s ../../../../../../etc/hostname rel && ln -s pkg/a.py ok")
    assert await rt.read_file(sid, "ok") == b"print('hi')\n"
    for call in (rt.read_file(sid, "../../etc/passwd"), rt.read_file(sid, "/testbed/../../x"),
                 rt.read_file(sid, "abs"), rt.read_file(sid, "rel"), rt.write_file(sid, "rel", b"x"),
                 rt.list_dir(sid, "../.."), rt.write_file(sid, "/../../evil", b"x")):
        with pytest.raises(BadRequest) as info:
            await call
        assert info.value.field == "path"
    with pytest.raises(NotFound) as info:
        await rt.read_file(sid, "missing.txt")
    assert info.value.field == "path"


async def test_snapshot_restore_is_byte_identical(rt):
    sid = await rt.create("host")
    await rt.exec(sid, "mkdir -p d/e && echo one > d/e/f && echo two > g && chmod 600 g && "
                       "ln -s d/e/f link && printf 'bin\\0ary' > b && chmod 4755 b && echo r > $HOME/r")
    before = (await rt.exec(sid, TREE, cwd="/")).output
    snap = await rt.snapshot(sid)
    await rt.exec(sid, "rm -rf d g $HOME/r && echo changed > b && chmod 644 b && rm link && echo new > n && "
                       "echo more >> $TMPDIR/x")
    assert (await rt.exec(sid, TREE, cwd="/")).output != before
    await rt.restore(sid, snap)
    assert (await rt.exec(sid, TREE, cwd="/")).output == before
    await rt.exec(sid, "rm -rf ./*")
    await rt.restore(sid, snap)  # twice: the same
    assert (await rt.exec(sid, TREE, cwd="/")).output == before
    await rt.restore(sid)  # no snapshot: as created
    assert (await rt.exec(sid, "ls -A . $HOME $TMPDIR")).output.count(b"\n") == 5  # three empty listings


async def test_restore_and_snapshot_kill_everything_even_double_forked_sigterm_ignorers(rt):
    sid = await rt.create("host")
    snap = await rt.snapshot(sid)
    tag = f"sleep 20{os.getpid() % 10}"
    detached = f"(setsid sh -c 'trap \"\" TERM HUP; while :; do {tag}1; done' </dev/null >/dev/null 2>&1 &)"
    res = await rt.exec(sid, f"{detached}; nohup sh -c 'trap \"\" TERM; {tag}2' >/dev/null 2>&1 & echo started")
    assert res.output == b"started\n"
    assert tag.encode() in _ps()
    await rt.restore(sid, snap)
    assert tag.encode() not in _ps()
    await rt.exec(sid, f"(setsid {tag}3 </dev/null >/dev/null 2>&1 &)")
    await rt.snapshot(sid)
    assert tag.encode() not in _ps()


async def test_fork_diverges_and_copies_are_collected(rt):
    sid = await rt.create("host")
    await rt.write_file(sid, "shared.txt", b"base")
    snap = await rt.snapshot(sid)
    a, b = await rt.fork(snap), await rt.fork(snap)
    await rt.write_file(a, "shared.txt", b"changed in a")
    assert await rt.read_file(b, "shared.txt") == b"base"
    assert await rt.read_file(sid, "shared.txt") == b"base"
    await rt.delete_snapshot(snap)  # the forks still need it: their origin
    await rt.write_file(b, "shared.txt", b"changed in b")
    await rt.restore(b)
    assert await rt.read_file(b, "shared.txt") == b"base"
    with pytest.raises(NotFound):
        await rt.fork(snap)
    for s in (a, b, sid):
        await rt.destroy(s)
    assert rt.stats()["copies"] == 0 and rt.stats()["sandboxes"] == 0


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
    assert status.output == b" M pkg/mod.py\n?? new.txt\n"
    with pytest.raises(NotFound) as info:
        await rt.diff(sid, "0" * 40)
    assert info.value.field == "base_commit"
    await rt.restore(sid)
    assert await rt.diff(sid, commit) == ""
    assert (await rt.exec(sid, "git -c safe.directory='*' status --porcelain")).output == b""


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
        (rt.create("podman:ubuntu"), BadRequest, "image"),
        (rt.create("host", workdir="rel"), BadRequest, "workdir"),
        (rt.create("host", repo="/no/such/repo"), NotFound, "repo"),
        (rt.create("host", limits=Limits(pids=0)), BadRequest, "limits.pids"),
        (rt.exec(sid, ["true"], timeout_s=-1), BadRequest, "timeout_s"),
        (rt.exec(sid, []), BadRequest, "argv"),
        (rt.exec(sid, ["no-such-command-xyz"]), NotFound, "argv"),
        (rt.exec(sid, ["true"], cwd="/no/such/dir"), NotFound, "cwd"),
        (rt.exec(sid, ["true"], cwd="../../.."), BadRequest, "cwd"),
        (rt.exec(sid, ["true"], env={"A=B": "x"}), BadRequest, "env.A=B"),
        (rt.exec(sid, ["true"], max_output_bytes=-5), BadRequest, "max_output_bytes"),
        (rt.write_file(sid, "big", b"x" * (MAX_FILE_BYTES + 1)), LimitExceeded, "data"),
        (rt.write_file(sid, "x", b"x", mode=0o17777), BadRequest, "mode"),
        (rt.read_file(sid, "/testbed"), BadRequest, "path"),
        (rt.list_dir(sid, "/testbed/nope"), NotFound, "path"),
    ]
    for coro, exc_type, field in cases:
        with pytest.raises(exc_type) as info:
            await coro
        assert info.value.field == field, (info.value, field)
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
    tag = f"sleep 30{os.getpid() % 10}"
    with trio.move_on_after(0.3):
        await rt.exec(sid, f"{tag}1")
    assert tag.encode() not in _ps()


async def test_stats(rt):
    sid = await rt.create("host")
    await rt.exec(sid, "head -c 1000000 /dev/zero > $TMPDIR/f")
    st = await rt.sandbox_stats(sid)
    assert st["disk_bytes"] >= 1_000_000 and st["limits_enforced"] is False
    node = rt.stats()
    assert node["sandboxes"] == 1 and node["runtime"] == "dir" and node["isolation"] is False


async def test_crash_leftovers_are_removed_on_start(tmp_path):
    """Processes and directories of a crashed run of the same state directory go on start."""
    state = tmp_path / "state"
    (state / "s" / "sb-stale").mkdir(parents=True)
    (state / "n" / "sn-stale").mkdir(parents=True)
    marker = f"{state_key(str(state))}.sb-stale.x"
    stale = subprocess.Popen(["sh", "-c", "sleep 1000 & wait"], env={**os.environ, MARKER_VAR: marker},
                             start_new_session=True)
    try:
        for _ in range(100):  # until the sleep child exists
            if len(marked_processes(f"{MARKER_VAR}={marker}")) == 2:
                break
            await trio.sleep(0.01)
        async with open_dir_runtime(str(state)) as rt:
            assert stale.wait(5) == -9
            assert marked_processes(f"{MARKER_VAR}={marker}") == []
            assert os.listdir(state / "s") == [] and os.listdir(state / "n") == []
            sid = await rt.create("host")
            assert (await rt.exec(sid, "echo alive")).output == b"alive\n"
    finally:
        kill_process_tree([stale.pid])
        stale.wait()
