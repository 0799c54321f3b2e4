"""Attacks on the ns runtime; each must fail, and leave the daemon and other sandboxes unharmed."""

import os
import resource

import pytest
import trio

from sandboxd import BadRequest, Limits, LimitExceeded, NotFound

from .conftest import needs_root

pytestmark = needs_root


async def test_host_files_outside_the_layers_are_unreachable(rt, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    sid = await rt.create("host")
    res = await rt.exec(sid, f"cat {secret}; ls /work /home /tmp; cat /proc/1/root/etc/hostname; "
                             f"ls /proc/1/root/; ls /proc/1/cwd; cat /proc/1/environ; echo done")
    assert b"host secret" not in res.output
    assert b"Permission denied" in res.output  # /proc/1/{root,cwd,environ}: init is not dumpable
    assert res.output.endswith(b"done\n")
    res = await rt.exec(sid, "tr '\\0' ' ' < /proc/1/cmdline; cat /proc/1/comm; cat /proc/1/maps /proc/1/exe 2>&1")
    assert res.output.startswith(b"init ") and b"/" not in res.output.replace(b"/proc/1/", b""), res.output
    # escaping the chroot or the namespaces needs capabilities the command does not have
    res = await rt.exec(sid, "grep -E '^Cap(Eff|Prm|Bnd|Amb)' /proc/self/status; grep NoNewPrivs /proc/self/status")
    assert res.output.count(b"0000000000000000") == 4 and b"NoNewPrivs:\t1" in res.output
    for attempt in ["unshare -U -r true", "unshare -m true", "mount -t tmpfs x /mnt", "chroot / true",
                    "mknod /tmp/sda b 8 0", "cat /sys/fs/cgroup/cgroup.procs"]:
        res = await rt.exec(sid, attempt)
        assert res.exit_code != 0, (attempt, res.output)
    # the host image's system directories are read-only
    res = await rt.exec(sid, "touch /usr/x /etc/x 2>&1; echo $?")
    assert res.output.strip().endswith(b"1")


async def test_network_is_loopback_only(rt):
    sid = await rt.create("host")
    probe = ("import socket\n"
             "for host in ['1.1.1.1', '8.8.8.8', '10.0.2.2', '192.168.1.1']:\n"
             "    s = socket.socket(); s.settimeout(1)\n"
             "    try:\n"
             "        s.connect((host, 53)); print('CONNECTED', host)\n"
             "    except OSError as e:\n"
             "        print('refused', host, e.errno)\n"
             "srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen()\n"
             "c = socket.create_connection(srv.getsockname(), timeout=1); print('loopback ok')\n"
             "import os; print(sorted(os.listdir('/sys/class/net')) if os.path.exists('/sys/class/net') else 'nosys')\n")
    await rt.write_file(sid, "/tmp/probe.py", probe.encode())
    res = await rt.exec(sid, ["python3", "/tmp/probe.py"], timeout_s=20)
    assert b"CONNECTED" not in res.output, res.output
    assert res.output.count(b"refused") == 4 and b"loopback ok" in res.output
    res = await rt.exec(sid, "cat /proc/net/dev")
    assert b"lo:" in res.output and b"eth" not in res.output and b"ens" not in res.output


async def test_fork_bomb_hits_pids_limit_and_daemon_stays_responsive(rt):
    bomb = await rt.create("host", limits=Limits(memory_bytes=256 << 20, pids=64, disk_bytes=16 << 20))
    other = await rt.create("host")
    snap = await rt.snapshot(bomb)
    result = {}

    async def run_bomb():
        result["bomb"] = await rt.exec(bomb, "b() { b | b & }; b; sleep 5", timeout_s=3)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_bomb)
        await trio.sleep(0.5)
        with trio.fail_after(5):  # the daemon and the other sandbox are fine meanwhile
            assert (await rt.exec(other, "echo alive")).output == b"alive\n"
        st = await rt.sandbox_stats(bomb)
        assert st["pids"] <= 64
    assert result["bomb"].timed_out
    with trio.fail_after(10):
        await rt.restore(bomb, snap)
    assert (await rt.exec(bomb, "echo recovered")).output == b"recovered\n"


async def test_exec_at_the_pids_limit_is_a_limit_error(rt):
    sid = await rt.create("host", limits=Limits(memory_bytes=256 << 20, pids=8, disk_bytes=16 << 20))
    async with trio.open_nursery() as nursery:
        fill = ("import os, time\n"
                "while True:\n"
                "    try:\n"
                "        if os.fork() == 0:\n"
                "            time.sleep(100)\n"
                "    except OSError:\n"
                "        break\n"
                "time.sleep(100)\n")
        nursery.start_soon(rt.exec, sid, ["python3", "-c", fill])
        with trio.fail_after(10):
            while (await rt.sandbox_stats(sid))["pids"] < 8:
                await trio.sleep(0.02)
        with pytest.raises(LimitExceeded) as info:
            await rt.exec(sid, ["true"])
        assert info.value.field == "limits"
        await rt.restore(sid)
    assert (await rt.exec(sid, "echo ok")).output == b"ok\n"


async def test_memory_exhaustion_is_killed_by_its_cgroup_only(rt):
    hog = await rt.create("host", limits=Limits(memory_bytes=64 << 20, pids=64, disk_bytes=16 << 20))
    other = await rt.create("host")
    res = await rt.exec(hog, ["python3", "-c", "x = []\nwhile True: x.append(bytearray(1 << 20))"], timeout_s=30)
    assert res.exit_code == -9 and not res.timed_out
    assert (await rt.sandbox_stats(hog))["oom_kills"] >= 1
    assert (await rt.exec(other, "echo fine")).output == b"fine\n"
    assert (await rt.exec(hog, "echo still usable")).output == b"still usable\n"  # its init survived


async def test_endless_output_is_capped_without_daemon_memory_growth(rt):
    sid = await rt.create("host")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = await rt.exec(sid, "yes 0123456789", timeout_s=2, max_output_bytes=64 * 1024)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert res.timed_out and res.truncated
    assert res.output_bytes > 10 * 1024 * 1024  # it really streamed
    assert len(res.output) < 65 * 1024
    assert after - before < 32 * 1024  # KiB: no buffering of the stream


async def test_filled_disk_fails_in_that_sandbox_only(rt):
    full = await rt.create("host", limits=Limits(memory_bytes=256 << 20, pids=64, disk_bytes=8 << 20))
    other = await rt.create("host")
    res = await rt.exec(full, "head -c 50000000 /dev/zero > /tmp/fill; echo rc=$?")
    assert b"No space left" in res.output and b"rc=1" in res.output
    with pytest.raises(LimitExceeded):
        await rt.write_file(full, "more", b"x" * (1 << 20))
    await rt.write_file(other, "big", b"x" * (16 << 20))  # more than the full one's whole disk
    assert len(await rt.read_file(other, "big")) == 16 << 20
    await rt.restore(full)
    assert (await rt.exec(full, "echo ok > /tmp/x && cat /tmp/x")).output == b"ok\n"


async def test_path_traversal_and_symlink_escapes_are_refused(rt, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("host file")
    sid = await rt.create("host")
    await rt.exec(sid, f"ln -s {outside} /testbed/abs && ln -s ../../../../../../../{outside} /testbed/rel && "
                       "ln -s /proc/1/root /testbed/proc_root && mkdir -p /testbed/d && ln -s ../../../.. /testbed/d/deep && "
                       "ln -s /etc /testbed/etc_link")
    for path in ["../../etc/passwd", "/../../etc/passwd", "abs", "rel", "proc_root/etc/hostname",
                 "d/deep/etc/passwd", "etc_link/passwd"]:
        with pytest.raises(BadRequest) as info:
            await rt.read_file(sid, path)
        assert info.value.field == "path", path
    with pytest.raises(BadRequest):
        await rt.write_file(sid, "abs", b"overwrite the host file?")
    with pytest.raises(BadRequest):
        await rt.write_file(sid, "d/deep/tmp/x", b"")
    with pytest.raises(BadRequest):
        await rt.list_dir(sid, "proc_root")
    assert outside.read_text() == "host file"
    # a command's cwd and PATH are resolved in its root: init's fds and root are not theirs
    for cwd in ["/proc/self/fd/3", "/proc/1/root", "/proc/1/cwd"]:
        with pytest.raises(BadRequest) as info:
            await rt.exec(sid, "pwd; ls", cwd=cwd)
        assert info.value.field == "cwd"
    with pytest.raises(NotFound) as info:
        await rt.exec(sid, ["ls", "/"], env={"PATH": "/proc/self/fd/4:/proc/1/root/usr/bin:/proc/1/cwd/usr/bin"})
    assert info.value.field == "argv"
    assert b"testbed" in (await rt.exec(sid, ["ls", "/"], env={"PATH": "/nowhere:/usr/bin"})).output
    # a symlink that stays inside is fine
    await rt.exec(sid, "echo inside > /testbed/d/real && ln -s real /testbed/d/ok")
    assert await rt.read_file(sid, "d/ok") == b"inside\n"


async def test_repo_copy_never_follows_the_images_symlinks_out(rt, tmp_path):
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    (host_dir / "victim").write_text("host file")
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    (repo / "victim").write_text("from the repo")
    (repo / "sub" / "x").write_text("x")
    image = tmp_path / "img"
    (image / "work").mkdir(parents=True)
    os.symlink(host_dir / "victim", image / "work" / "victim")  # a file: replaced in the sandbox
    os.symlink(host_dir, image / "work" / "sub")  # a directory: refused
    os.symlink(host_dir, image / "evil")  # the workdir itself
    with pytest.raises(BadRequest):
        await rt.create(f"dir:{image}", workdir="/evil", repo=str(repo))
    with pytest.raises(BadRequest) as info:
        await rt.create(f"dir:{image}", workdir="/work", repo=str(repo))
    assert info.value.field == "repo"
    assert sorted(os.listdir(host_dir)) == ["victim"] and (host_dir / "victim").read_text() == "host file"
    os.unlink(image / "work" / "sub")
    sid = await rt.create(f"dir:{image}", workdir="/work", repo=str(repo))
    assert await rt.read_file(sid, "victim") == b"from the repo"
    assert (host_dir / "victim").read_text() == "host file"
    assert rt.stats()["sandboxes"] == 1  # the failed creates left nothing
