"""cgroups.py against a fake cgroup v2 filesystem (a directory tree that behaves like cgroupfs:
mkdir makes the interface files, rmdir refuses a group with processes), so that the v2 code is
checked on hosts whose cgroup v2 hierarchy has no controllers (hybrid v1, like the build nodes)."""

import errno
import os
import subprocess

import pytest

from sandboxd import cgroups
from sandboxd.cgroups import CgroupLimits, Cgroups, detect

CONTROLLER_FILES = {
    "memory": {"memory.max": "max", "memory.swap.max": "max", "memory.current": "0", "memory.peak": "0",
               "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n"},
    "pids": {"pids.max": "max", "pids.current": "0"},
}


def _enabled(subtree_control: str) -> list[str]:
    with open(subtree_control) as f:
        return [tok[1:] for tok in f.read().split() if tok.startswith("+")]


def _fake_mkdir(path: str) -> None:
    os.mkdir(path)
    files = {"cgroup.procs": "", "cgroup.kill": "", "cgroup.freeze": "0", "cgroup.subtree_control": ""}
    parent_control = os.path.join(os.path.dirname(path), "cgroup.subtree_control")
    enabled = _enabled(parent_control) if os.path.exists(parent_control) else []
    files["cgroup.controllers"] = " ".join(enabled)
    for controller in enabled:
        files.update(CONTROLLER_FILES.get(controller, {}))
    for name, content in files.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(content)


def _fake_rmdir(path: str) -> None:
    with open(os.path.join(path, "cgroup.procs")) as f:
        if f.read().strip():
            raise OSError(errno.EBUSY, "Device or resource busy", path)
    for entry in os.scandir(path):
        if entry.is_dir():
            raise OSError(errno.ENOTEMPTY, "Directory not empty", path)
    for entry in os.scandir(path):
        os.unlink(entry.path)
    os.rmdir(path)


def _read(path) -> str:
    with open(path) as f:
        return f.read()


@pytest.fixture
def fake_v2(tmp_path, monkeypatch):
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory pids io")
    (root / "cgroup.subtree_control").write_text("")
    (root / "cgroup.procs").write_text("")
    monkeypatch.setattr(cgroups, "_mkdir", _fake_mkdir)
    monkeypatch.setattr(cgroups, "_rmdir", _fake_rmdir)
    return root


def test_v2_layout_limits_and_removal(fake_v2):
    assert detect(str(fake_v2)) == 2
    cg = Cgroups(2, "sandboxd-test", mount=str(fake_v2))
    assert _enabled(fake_v2 / "cgroup.subtree_control") == ["memory", "pids"]
    sandbox = cg.create("sb-1", CgroupLimits(memory_bytes=256 << 20, pids=64))
    group = fake_v2 / "sandboxd-test" / "sb-1"
    # limits on the commands' group, none on init's
    assert _read(group / "cmd" / "memory.max") == str(256 << 20)
    assert _read(group / "cmd" / "pids.max") == "64"
    assert _read(group / "cmd" / "memory.swap.max") == "0"
    assert not (group / "init" / "memory.max").exists() or _read(group / "init" / "memory.max") == "max"
    # what init is told: one directory, and paths under it that exist once the exec group does
    assert sandbox.dirs == [str(group)]
    (index, rel), = sandbox.init_join
    assert os.path.exists(os.path.join(sandbox.dirs[index], rel))
    index, rel = sandbox.exec_group_dir
    _fake_mkdir(os.path.join(sandbox.dirs[index], rel.replace("{group}", "x0")))
    for index, rel in sandbox.exec_join:
        assert os.path.exists(os.path.join(sandbox.dirs[index], rel.replace("{group}", "x0")))
    # killing one exec writes cgroup.kill of its group only
    sandbox.kill_exec_group("x0")
    assert _read(group / "cmd" / "x0" / "cgroup.kill") == "1"
    assert _read(group / "cgroup.kill") == ""
    sandbox.kill_exec_group("x9")  # already removed by init: nothing to do
    assert cg.count() == 1
    sandbox.remove()
    assert not group.exists() and cg.count() == 0
    cg.remove_parent()
    assert not (fake_v2 / "sandboxd-test").exists()


def test_v2_stats_parse_the_interface_files(fake_v2):
    cg = Cgroups(2, "p", mount=str(fake_v2))
    sandbox = cg.create("sb-2", CgroupLimits(memory_bytes=1 << 30, pids=100))
    cmd = fake_v2 / "p" / "sb-2" / "cmd"
    (cmd / "memory.current").write_text("123456\n")
    (cmd / "memory.peak").write_text("654321\n")
    (cmd / "pids.current").write_text("7\n")
    (cmd / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 2\noom_kill 3\n")
    assert sandbox.stats() == {"memory_bytes": 123456, "memory_peak_bytes": 654321, "pids": 7, "oom_kills": 3}


def test_v2_without_cgroup_kill_freezes_and_kills_what_it_lists(fake_v2):
    cg = Cgroups(2, "p", mount=str(fake_v2))
    sandbox = cg.create("sb-3", CgroupLimits(memory_bytes=1 << 30, pids=100))
    group = fake_v2 / "p" / "sb-3" / "cmd" / "x0"
    _fake_mkdir(str(group))
    os.unlink(group / "cgroup.kill")  # a kernel before 5.14
    victim = subprocess.Popen(["sleep", "100"])
    try:
        (group / "cgroup.procs").write_text(f"{victim.pid}\n")
        sandbox.kill_exec_group("x0")
        assert victim.wait(timeout=5) == -9
        assert _read(group / "cgroup.freeze") == "0"  # thawed again
    finally:
        victim.kill()
        victim.wait()


def test_v2_remove_stale_sweeps_groups_left_by_a_crash(fake_v2):
    cg = Cgroups(2, "p", mount=str(fake_v2))
    for sid in ("sb-a", "sb-b"):
        cg.create(sid, CgroupLimits(memory_bytes=1 << 30, pids=100))
    _fake_mkdir(str(fake_v2 / "p" / "sb-a" / "cmd" / "x3"))  # an exec group, too
    restarted = Cgroups(2, "p", mount=str(fake_v2))
    assert restarted.remove_stale() == ["sb-a", "sb-b"]
    assert restarted.count() == 0


def test_detect_refuses_a_host_without_usable_cgroups(tmp_path):
    with pytest.raises(OSError) as info:
        detect(str(tmp_path))
    assert info.value.errno == errno.ENOENT
