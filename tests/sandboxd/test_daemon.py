"""The daemon and its client: the same API in-process and over sockets, typed errors naming the field,
streamed exec output, and a daemon killed with SIGKILL that restarts, cleans up and serves again."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess

import pytest
import trio

from runtime.wire import BadRequest, NotFound, Unauthorized
from sandboxd.client import connect, open_local

from .conftest import needs_root, start_daemon as launch

pytestmark = needs_root

TOKEN = "daemon-test-token"


async def exercise(node, repo: str, commit: str) -> None:
    """One pass over the API, asserting what a user would notice."""
    async with node.open("host", repo=repo, limits={"memory_bytes": 256 << 20, "pids": 128, "disk_bytes": 32 << 20}) as sb:
        res = await sb.exec("cat pkg/mod.py && echo err >&2", timeout_s=30)
        assert res.exit_code == 0 and b"return 1" in res.output and b"err" in res.output
        chunks: list[bytes] = []

        async def on_output(chunk: bytes) -> None:
            chunks.append(chunk)

        res = await sb.exec(["sh", "-c", "for i in 1 2 3; do echo line$i; done"], timeout_s=30, on_output=on_output)
        assert b"".join(chunks) == b"line1\nline2\nline3\n" == res.output
        snap = await sb.snapshot()
        await sb.write_file("pkg/mod.py", b"def f():\n    return 2\n")
        await sb.exec("rm README", timeout_s=30)
        patch = await sb.diff(commit)
        assert "-    return 1" in patch and "+    return 2" in patch and "README" in patch
        entries, more = await sb.list_dir("pkg")
        assert [e.name for e in entries] == ["mod.py"] and not more
        await sb.restore(snap)
        assert await sb.read_file("pkg/mod.py") == b"def f():\n    return 1\n"
        assert (await sb.exec("cat README", timeout_s=30)).output == b"hello\n"
        async with node.attach((await node.fork(snap)).id) as child:
            assert (await child.exec("cat README", timeout_s=30)).output == b"hello\n"
        res = await sb.exec("sleep 30", timeout_s=0.3)
        assert res.timed_out and res.exit_code < 0
        with pytest.raises(BadRequest) as info:
            await sb.read_file("../../etc/shadow")
        assert info.value.field == "path"
        with pytest.raises(BadRequest) as info:
            await sb.exec("true", timeout_s=-1)
        assert info.value.field == "timeout_s"
    with pytest.raises(NotFound) as info:
        await node.attach("sb-nope").exec("true")
    assert info.value.field == "sandbox"
    with pytest.raises(NotFound) as info:
        await node.fork("sn-nope")
    assert info.value.field == "snapshot"
    with pytest.raises(BadRequest) as info:
        await node.create("host", limits={"memory_mb": 5})
    assert info.value.field == "limits.memory_mb"
    with pytest.raises(BadRequest) as info:
        await node.caller.call("sandbox.exec", {"sandbox": "x", "argv": "true", "timeout_s": "soon"})
    assert info.value.field == "params.timeout_s"
    stats = await node.stats()
    assert stats["runtime"]["sandboxes"] == 0
    assert stats["latency"]["sandbox.exec"]["count"] >= 4
    assert stats["errors"]["not_found"] >= 2


async def test_in_process_mode(git_repo):
    repo, commit = git_repo
    async with open_local("ns") as node:
        await exercise(node, repo, commit)


def start_daemon(root: str, sock: str, token_file: str) -> tuple[subprocess.Popen, list[str]]:
    daemon = launch(root, [f"unix:{sock}", "tcp://127.0.0.1:0"], token_file=token_file, log_level="WARNING")
    return daemon.proc, daemon.addresses


def sandbox_processes(root: str) -> list[int]:
    """Host pids of processes still holding the state directory (inits and their commands)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"sleep\x00424242" in cmdline:
            pids.append(int(pid))
    return pids


async def test_daemon_over_sockets_and_restart_after_sigkill(git_repo, tmp_path):
    repo, commit = git_repo
    root, sock = str(tmp_path / "root"), str(tmp_path / "d.sock")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    proc, addresses = start_daemon(root, sock, str(token_file))
    try:
        unix, tcp = addresses
        async with connect(unix, token=TOKEN) as node:
            await exercise(node, repo, commit)
        async with connect(tcp, token="wrong", connect_timeout_s=5) as node:
            with pytest.raises(Unauthorized):
                await node.stats()
        async with connect(tcp, token=TOKEN) as node:
            sb = await node.create("host", repo=repo)
            async with trio.open_nursery() as nursery:
                # A command that would outlive its daemon if nothing cleaned up.
                nursery.start_soon(lambda: sb.exec("sleep 424242", timeout_s=3600))
                for _ in range(100):
                    if sandbox_processes(root):
                        break
                    await trio.sleep(0.05)
                assert sandbox_processes(root)
                proc.kill()  # SIGKILL: no cleanup code runs
                proc.wait(10)
                nursery.cancel_scope.cancel()
        # The sandbox's processes die with the daemon (init's parent-death signal, pid namespace).
        for _ in range(100):
            if not sandbox_processes(root):
                break
            await trio.sleep(0.05)
        assert not sandbox_processes(root)
        proc, addresses = start_daemon(root, sock, str(token_file))
        async with connect(addresses[0], token=TOKEN) as node:
            stats = await node.stats()
            assert stats["runtime"]["sandboxes"] == 0
            async with node.open("host", repo=repo) as sb2:
                assert (await sb2.exec("cat README", timeout_s=30)).output == b"hello\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not os.path.exists(sock)  # removed on a clean stop
        parent = "sandboxd-" + hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:10]
        leftover = [c for c in ("memory", "pids", "freezer") if os.path.isdir(f"/sys/fs/cgroup/{c}/{parent}")
                    and any(e.is_dir() for e in os.scandir(f"/sys/fs/cgroup/{c}/{parent}"))]
        assert not leftover, f"sandbox cgroups left under {parent}: {leftover}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


async def test_many_concurrent_creates_and_execs():
    """Regression: concurrent creates once raced on the zygote's socket (BusyResourceError)."""
    async with open_local("ns") as node:
        outputs = []

        async def one(i: int) -> None:
            async with node.open("host") as sb:
                outputs.append((await sb.exec(f"echo {i}", timeout_s=30)).output)

        async with trio.open_nursery() as nursery:
            for i in range(24):
                nursery.start_soon(one, i)
        assert sorted(outputs) == sorted(f"{i}\n".encode() for i in range(24))
        assert (await node.stats())["runtime"]["sandboxes"] == 0
