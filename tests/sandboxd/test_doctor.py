"""`sandboxd doctor` against fake nodes (a fake /proc, fake cgroupfs trees, fake tools and limits),
each broken in one way, and once for real on this machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sandboxd import doctor
from sandboxd.doctor import NAMESPACES, Node, report, run_checks

from .conftest import needs_root

ALL_OK_PROBE = {**{f"ns.{ns}": "ok" for ns in NAMESPACES}, "overlay": "ok", "syscalls": "ok"}


def make_proc(tmp_path, release="6.1.0-18-amd64", filesystems=("ext4", "tmpfs", "overlay"),
              namespaces=NAMESPACES, max_user_namespaces="15000"):
    proc = tmp_path / "proc"
    (proc / "sys/kernel").mkdir(parents=True)
    (proc / "sys/kernel/osrelease").write_text(release + "\n")
    (proc / "sys/user").mkdir(parents=True)
    (proc / "sys/user/max_user_namespaces").write_text(max_user_namespaces + "\n")
    (proc / "filesystems").write_text("".join(f"nodev\t{fs}\n" for fs in filesystems))
    (proc / "self/ns").mkdir(parents=True)
    for ns in namespaces:
        (proc / "self/ns" / ns).write_text("")
    return proc


def make_v2(tmp_path, controllers="cpuset cpu io memory pids", enabled="memory pids", procs="",
            child_files=("cgroup.procs", "cgroup.freeze", "cgroup.kill")):
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text(enabled + "\n")
    (root / "cgroup.procs").write_text(procs)
    (root / "system.slice").mkdir()
    for name in child_files:
        (root / "system.slice" / name).write_text("")
    return root


def make_v1(tmp_path, controllers=("memory", "pids", "freezer", "cpu"), unified=True):
    root = tmp_path / "cgroup"
    root.mkdir()
    for c in controllers:
        (root / c).mkdir()
    if unified:
        (root / "unified").mkdir()
    return root


def make_node(tmp_path, *, proc=None, cgroup=None, euid=0, tools=("unshare", "nsenter", "podman", "runc"),
              free_bytes=100 << 30, free_inodes=10 << 20, nofile=(1 << 20, 1 << 20), probe=None) -> Node:
    probed_in: list[str] = []

    def fake_probe(base: str) -> dict:
        assert os.path.isdir(base)
        probed_in.append(base)
        return dict(ALL_OK_PROBE if probe is None else probe)

    def getrlimit(which: int) -> tuple[int, int]:
        import resource

        return nofile if which == resource.RLIMIT_NOFILE else (resource.RLIM_INFINITY, resource.RLIM_INFINITY)

    node = Node(
        proc=str(proc or make_proc(tmp_path)), cgroup=str(cgroup or make_v2(tmp_path)),
        modules=str(tmp_path / "modules"),
        euid=lambda: euid, which=lambda tool: f"/usr/bin/{tool}" if tool in tools else None,
        run=lambda argv: (0, f"{os.path.basename(argv[0])} version 9.9"),
        statvfs=lambda path: SimpleNamespace(f_bavail=free_bytes // 4096, f_frsize=4096, f_favail=free_inodes),
        getrlimit=getrlimit, probe=fake_probe)
    node.probed_in = probed_in  # type: ignore[attr-defined]
    return node


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


def test_a_healthy_v2_node_is_ok_and_the_probe_leaves_nothing(tmp_path):
    state = tmp_path / "state"
    node = make_node(tmp_path)
    checks = run_checks(str(state), node)
    assert {c.name: c.status for c in checks if c.status != "ok"} == {}
    names = by_name(checks)
    assert names["cgroups"].detail.startswith("v2")
    assert names["cgroup freeze"].detail == "cgroup.freeze and cgroup.kill present"
    assert names["podman"].detail == "podman version 9.9"
    assert report(checks, str(state))["ok"] is True
    # The probe ran in a scratch directory next to the (missing) state dir, removed afterwards.
    (base,) = node.probed_in
    assert os.path.dirname(base) == str(tmp_path) and not os.path.exists(base) and not state.exists()


def test_scratch_dirs_of_killed_probes_are_swept(tmp_path):
    old, recent = tmp_path / ".sandboxd-doctor-old", tmp_path / ".sandboxd-doctor-new"
    for d in (old, recent):
        (d / "lower").mkdir(parents=True)
    os.utime(old, (0, 0))
    run_checks(str(tmp_path / "state"), make_node(tmp_path))
    assert not old.exists() and recent.exists()


def test_hybrid_v1_is_ok(tmp_path):
    checks = by_name(run_checks(str(tmp_path), make_node(tmp_path, cgroup=make_v1(tmp_path))))
    assert checks["cgroups"].status == "ok" and "hybrid" in checks["cgroups"].detail


BROKEN = {
    # name: (node changes, the check that fails, words in its fix)
    "old kernel": (lambda t: {"proc": make_proc(t, release="5.4.0-150-generic")}, "kernel", "5.6"),
    "no overlayfs": (lambda t: {"proc": make_proc(t, filesystems=("ext4", "tmpfs"))}, "overlayfs", "CONFIG_OVERLAY_FS"),
    "v1 without freezer": (lambda t: {"cgroup": make_v1(t, controllers=("memory", "pids"))}, "cgroups", "freezer"),
    "v2 without pids": (lambda t: {"cgroup": make_v2(t, controllers="cpu memory io")}, "cgroups", "Delegate=yes"),
    "v2 without freeze": (lambda t: {"cgroup": make_v2(t, child_files=("cgroup.procs",))}, "cgroup freeze", "kernel"),
    "no cgroups at all": (lambda t: {"cgroup": t}, "cgroups", "unified_cgroup_hierarchy"),
    "not root": (lambda t: {"euid": 1000}, "user", "run as root"),
    "overlay cannot mount": (lambda t: {"probe": {**ALL_OK_PROBE, "overlay": "OSError: [Errno 22] Invalid argument"}},
                             "overlay mount", "not on overlayfs"),
    "pid namespace refused": (lambda t: {"probe": {**ALL_OK_PROBE, "ns.pid": "PermissionError: unshare 0x20000000"}},
                              "namespaces", "CAP_SYS_ADMIN"),
    "no net namespace": (lambda t: {"proc": make_proc(t, namespaces=("mnt", "pid", "ipc", "uts", "cgroup"))},
                         "namespaces", "CONFIG_NAMESPACES"),
    "seccomp blocks openat2": (lambda t: {"probe": {**ALL_OK_PROBE, "syscalls": "OSError: [Errno 38] openat2"}},
                               "syscalls", "Unconfined"),
    "disk full": (lambda t: {"free_bytes": 100 << 20}, "disk", "free space"),
    "out of inodes": (lambda t: {"free_inodes": 500}, "disk", "free space"),
    "tiny fd limit": (lambda t: {"nofile": (1024, 1024)}, "open files", "LimitNOFILE"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_broken_node_fails_the_right_check_with_a_fix(tmp_path, case, capsys):
    changes, name, fix_words = BROKEN[case]
    node = make_node(tmp_path, **changes(tmp_path))
    assert doctor.main(str(tmp_path / "state"), as_json=True, node=node) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and name in result["blocking"]
    (check,) = [c for c in result["checks"] if c["name"] == name]
    assert check["status"] == "fail" and fix_words in check["fix"]


WARNED = {
    "controllers not delegated": (lambda t: {"cgroup": make_v2(t, enabled="", procs="1\n7\n")}, "cgroup delegation"),
    "no podman": (lambda t: {"tools": ("unshare", "nsenter", "runc")}, "podman"),
    "no runc": (lambda t: {"tools": ("unshare", "nsenter", "podman")}, "runc"),
    "no nsenter": (lambda t: {"tools": ("unshare", "podman", "runc")}, "nsenter"),
    "overlay module not loaded": (lambda t: {"proc": _proc_with_overlay_module(t)}, "overlayfs"),
    "fd limit below 64k": (lambda t: {"nofile": (8192, 8192)}, "open files"),
    "low disk": (lambda t: {"free_bytes": 1 << 30}, "disk"),
    "user namespaces off": (lambda t: {"proc": make_proc(t, max_user_namespaces="0")}, "user namespaces"),
}


def _proc_with_overlay_module(tmp_path):
    (tmp_path / "modules/6.1.0-18-amd64/kernel/fs/overlayfs").mkdir(parents=True)
    return make_proc(tmp_path, filesystems=("ext4",))


@pytest.mark.parametrize("case", sorted(WARNED))
def test_warnings_name_a_fix_and_do_not_block(tmp_path, case):
    changes, name = WARNED[case]
    checks = run_checks(str(tmp_path / "state"), make_node(tmp_path, **changes(tmp_path)))
    assert by_name(checks)[name].status == "warn" and by_name(checks)[name].fix
    assert [c.name for c in checks if c.status != "ok"] == [name]
    assert report(checks, "x")["ok"] is True


def test_a_state_dir_others_can_write_is_a_warning(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o777)
    os.chmod(state, 0o777)
    checks = by_name(run_checks(str(state), make_node(tmp_path)))
    if os.geteuid() == 0:
        assert checks["state dir"].status == "warn" and "chmod 700" in checks["state dir"].fix
    file_root = tmp_path / "file"
    file_root.write_text("")
    assert by_name(run_checks(str(file_root), make_node(tmp_path / "state")))["state dir"].status == "fail"


def test_the_table_for_people_lists_fixes(tmp_path, capsys):
    node = make_node(tmp_path, tools=(), proc=make_proc(tmp_path, release="4.19.0"))
    assert doctor.main(str(tmp_path / "state"), node=node) == 1
    out = capsys.readouterr().out
    assert "FAIL  kernel" in out and "fix: upgrade to Linux 5.6+" in out
    assert "WARN  podman" in out and out.rstrip().endswith("ns runtime: cannot run here (fix: kernel)")


@needs_root
def test_doctor_on_this_machine(tmp_path):
    """This machine runs the ns runtime (the daemon tests do), so doctor must say OK for what it has."""
    res = subprocess.run([sys.executable, "-m", "sandboxd", "doctor", "--root", str(tmp_path / "state"), "--json"],
                         capture_output=True, text=True, timeout=120)
    result = json.loads(res.stdout)
    statuses = {c["name"]: c["status"] for c in result["checks"]}
    assert res.returncode == 0 and result["ok"] is True, result
    expected_ok = ["user", "kernel", "syscalls", "overlayfs", "overlay mount", "cgroups", "namespaces", "state dir"]
    expected_ok += [tool for tool in ("unshare", "nsenter", "podman", "runc") if shutil.which(tool)]
    assert {name: statuses.get(name) for name in expected_ok} == {name: "ok" for name in expected_ok}
    assert not list(tmp_path.iterdir())  # neither the state dir nor the probe's scratch dir was left
