"""`sandboxd doctor`: can this node run sandboxes, and if not, what to fix.

    sandboxd doctor --root /var/lib/sandboxd           # a table for people
    sandboxd doctor --root /var/lib/sandboxd --json    # one object for machines (k8s readiness)

Each check is OK, WARN or FAIL with a one-line fix. The exit code is 0 when the `ns` runtime can run
here (no FAIL among the checks it needs), 1 otherwise; podman and runc are optional (the podman
runtime) and only ever WARN. The checks read files under `Node.proc` and `Node.cgroup` and call the
functions in `Node`, so tests point them at a fake /proc and a fake cgroupfs. As root, a probe
(`_doctor_probe.py`, forked children) also unshares each namespace and mounts an overlay inside the
state directory, exactly as the runtime will.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .cgroups import Cgroups

__all__ = ["Check", "Node", "run_checks", "report", "main"]

OK, WARN, FAIL = "ok", "warn", "fail"
MIN_KERNEL = (5, 6)  # openat2(2) 5.6, pidfd_open(2) 5.3, open_tree(2)/move_mount(2) 5.2
NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "cgroup")  # what every sandbox's init unshares
FREE_BYTES_FAIL, FREE_BYTES_WARN = 256 << 20, 2 << 30  # state dir: sockets, layer metadata, podman mounts
FREE_INODES_FAIL, FREE_INODES_WARN = 10_000, 100_000
NOFILE_FAIL, NOFILE_WARN = 4096, 65536  # hard limit: the daemon raises its soft limit to it
_PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_doctor_probe.py")


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""
    required: bool = True  # a FAIL means the ns runtime cannot run

    def __post_init__(self) -> None:
        if self.status not in (OK, WARN, FAIL):
            raise ValueError(f"check {self.name}: status must be ok, warn or fail, got {self.status!r}")


def _run(argv: list[str]) -> tuple[int, str]:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, str(exc)
    return res.returncode, (res.stdout + res.stderr).strip()


def _probe(base: str) -> dict[str, str]:
    rc, out = _run([sys.executable, "-I", "-S", _PROBE, base])
    try:
        result = json.loads(out.splitlines()[-1]) if out else None
    except json.JSONDecodeError:
        result = None
    if rc != 0 or not isinstance(result, dict):
        return {"error": f"the probe failed (exit {rc}): {out[-300:]}"}
    return result


@dataclass
class Node:
    """Where the checks look. Defaults are this machine; tests replace them with fakes."""

    proc: str = "/proc"
    cgroup: str = "/sys/fs/cgroup"
    modules: str = "/lib/modules"
    euid: Callable[[], int] = os.geteuid
    which: Callable[[str], str | None] = shutil.which
    run: Callable[[list[str]], tuple[int, str]] = _run
    statvfs: Callable[[str], Any] = os.statvfs
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit
    probe: Callable[[str], dict[str, str]] = _probe  # as root only: see _doctor_probe.py
    probed: dict[str, str] = field(default_factory=dict)

    def read(self, *parts: str) -> str | None:
        try:
            with open(os.path.join(*parts)) as f:
                return f.read()
        except OSError:
            return None


def _kernel(node: Node) -> list[Check]:
    release = (node.read(node.proc, "sys/kernel/osrelease") or "").strip()
    match = re.match(r"(\d+)\.(\d+)", release)
    if not match:
        return [Check("kernel", FAIL, f"cannot read the kernel release from {node.proc}/sys/kernel/osrelease",
                      "mount /proc (the doctor and the daemon need the host's /proc)")]
    version = (int(match.group(1)), int(match.group(2)))
    need = ".".join(map(str, MIN_KERNEL))
    if version < MIN_KERNEL:
        return [Check("kernel", FAIL, f"Linux {release}: older than {need}",
                      f"upgrade to Linux {need}+ (openat2, pidfd_open, open_tree/move_mount)")]
    checks = [Check("kernel", OK, f"Linux {release} ({need}+ needed)")]
    syscalls = node.probed.get("syscalls")
    if syscalls is not None:
        checks.append(Check("syscalls", OK if syscalls == "ok" else FAIL,
                            "openat2, pidfd_open, open_tree work" if syscalls == "ok" else syscalls,
                            "" if syscalls == "ok" else "a seccomp profile may block them: run the daemon "
                            "unconfined (seccompProfile: Unconfined, or no SystemCallFilter=)"))
    return checks


def _overlay(node: Node, release: str) -> list[Check]:
    filesystems = node.read(node.proc, "filesystems") or ""
    names = {line.split()[-1] for line in filesystems.splitlines() if line.strip()}
    if "overlay" in names:
        checks = [Check("overlayfs", OK, "overlay is in /proc/filesystems")]
    elif os.path.isdir(os.path.join(node.modules, release, "kernel/fs/overlayfs")):
        checks = [Check("overlayfs", WARN, "the overlay module is not loaded (a root mount loads it)",
                        "modprobe overlay, and add it to /etc/modules-load.d/")]
    else:
        return [Check("overlayfs", FAIL, "overlayfs is neither loaded nor installed as a module",
                      "use a kernel with CONFIG_OVERLAY_FS (or install its modules package), then modprobe overlay")]
    result = node.probed.get("overlay")
    if result is None:
        checks.append(Check("overlay mount", WARN, "not tried: the mount test runs as root",
                            "run sandboxd doctor as root"))
    elif result == "ok":
        checks.append(Check("overlay mount", OK, "mounted an overlay (tmpfs upper) in the state directory"))
    else:
        checks.append(Check("overlay mount", FAIL, result,
                            "put the state directory on a local filesystem (ext4, xfs with ftype=1), not on "
                            "overlayfs or NFS; in a container it needs privileges (privileged: true)"))
    return checks


def _cgroups(node: Node) -> list[Check]:
    root = node.cgroup
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        return _cgroups_v2(node)
    missing = [c for c in Cgroups.V1_CONTROLLERS if not os.path.isdir(os.path.join(root, c))]
    if missing:
        return [Check("cgroups", FAIL, f"no cgroup v2 at {root}, and cgroup v1 lacks {', '.join(missing)}",
                      "boot with systemd.unified_cgroup_hierarchy=1 (v2), or mount the v1 memory, pids and "
                      "freezer hierarchies under " + root)]
    hybrid = " (hybrid: v2 at unified/, without controllers)" if os.path.isdir(os.path.join(root, "unified")) else ""
    readonly = [c for c in Cgroups.V1_CONTROLLERS if not os.access(os.path.join(root, c), os.W_OK)]
    if readonly:
        return [Check("cgroups", FAIL, f"v1{hybrid}: {', '.join(readonly)} not writable here",
                      "mount cgroupfs read-write for the daemon (privileged container, or Delegate=yes)")]
    return [Check("cgroups", OK, f"v1{hybrid} with {', '.join(Cgroups.V1_CONTROLLERS)}")]


def _cgroups_v2(node: Node) -> list[Check]:
    root = node.cgroup
    available = (node.read(root, "cgroup.controllers") or "").split()
    missing = [c for c in ("memory", "pids") if c not in available]
    if missing:
        return [Check("cgroups", FAIL, f"v2 without the {', '.join(missing)} controller(s) at {root}",
                      "enable them for the daemon: Delegate=yes in its unit, or a cgroup with them delegated")]
    if not os.access(os.path.join(root, "cgroup.subtree_control"), os.W_OK):
        return [Check("cgroups", FAIL, f"v2 at {root} is not writable here",
                      "mount /sys/fs/cgroup read-write for the daemon (privileged container, or Delegate=yes)")]
    checks = [Check("cgroups", OK, f"v2 with {' '.join(available)}")]
    enabled = (node.read(root, "cgroup.subtree_control") or "").split()
    procs = (node.read(root, "cgroup.procs") or "").split()
    if not {"memory", "pids"} <= set(enabled):
        # A namespaced cgroup root holding processes cannot enable domain controllers for its
        # children ("no internal processes"): sandboxes would run without memory and pids limits.
        why = f"; {len(procs)} process(es) sit in it" if procs else ""
        checks.append(Check("cgroup delegation", WARN,
                            f"memory and pids not enabled in {root}/cgroup.subtree_control{why}: sandboxes "
                            "would run without memory/pids limits",
                            "give the daemon a delegated subtree (Delegate=yes; in a container, move the "
                            "processes of the cgroup root into a child group first, as docker-in-docker does)"))
    else:
        checks.append(Check("cgroup delegation", OK, "memory and pids enabled for child groups"))
    kinds = _v2_group_files(root)
    if "cgroup.freeze" not in kinds:
        checks.append(Check("cgroup freeze", FAIL, "no cgroup.freeze in any child group (needs Linux 5.2+)",
                            "upgrade the kernel"))
    elif "cgroup.kill" not in kinds:
        checks.append(Check("cgroup freeze", OK, "cgroup.freeze present; no cgroup.kill (5.14+): kills freeze "
                            "first", required=False))
    else:
        checks.append(Check("cgroup freeze", OK, "cgroup.freeze and cgroup.kill present"))
    return checks


def _v2_group_files(root: str) -> set[str]:
    """Interface files of a non-root v2 group (the root has no cgroup.freeze or cgroup.kill)."""
    try:
        children = [e.path for e in os.scandir(root) if e.is_dir()]
    except OSError:
        return set()
    for child in children[:8]:
        try:
            return set(os.listdir(child))
        except OSError:
            continue
    return set()


def _namespaces(node: Node) -> list[Check]:
    missing = [ns for ns in NAMESPACES if not os.path.exists(os.path.join(node.proc, "self/ns", ns))]
    if missing:
        return [Check("namespaces", FAIL, f"the kernel lacks {', '.join(missing)} namespaces",
                      "use a kernel with CONFIG_NAMESPACES and its MNT/PID/NET/IPC/UTS/CGROUP options")]
    failed = {ns: node.probed[f"ns.{ns}"] for ns in NAMESPACES if node.probed.get(f"ns.{ns}", "ok") != "ok"}
    if failed:
        detail = "; ".join(f"{ns}: {err}" for ns, err in failed.items())
        return [Check("namespaces", FAIL, f"cannot unshare: {detail}",
                      "run as root with CAP_SYS_ADMIN (privileged container) and no seccomp/AppArmor profile "
                      "that blocks unshare(2)")]
    tried = bool(node.probed) and "error" not in node.probed
    how = "unshared each" if tried else "present (not tried: the probe runs as root)"
    checks = [Check("namespaces", OK if tried else WARN, f"{', '.join(NAMESPACES)}: {how}",
                    "" if tried else "run sandboxd doctor as root")]
    users = (node.read(node.proc, "sys/user/max_user_namespaces") or "").strip()
    if users.isdigit() and int(users) > 0:
        checks.append(Check("user namespaces", OK, f"max_user_namespaces={users} (not needed as root)",
                            required=False))
    else:
        checks.append(Check("user namespaces", WARN, "user namespaces are off (not needed as root)",
                            "sysctl user.max_user_namespaces=15000 for rootless tools", required=False))
    return checks


def _tools(node: Node) -> list[Check]:
    checks = []
    for tool in ("unshare", "nsenter"):
        path = node.which(tool)
        if path is None:
            checks.append(Check(tool, WARN, "not found (the runtime uses syscalls; this is for debugging "
                                "sandboxes: nsenter -t INIT_PID)", "apt-get install util-linux", required=False))
            continue
        rc, out = node.run([path, "--version"])
        checks.append(Check(tool, OK, out.splitlines()[0] if rc == 0 and out else path, required=False))
    for tool, fix in (("podman", "apt-get install podman (only for --runtime podman and podman: images)"),
                      ("runc", "apt-get install runc (podman needs it where crun fails on hybrid cgroups)")):
        path = node.which(tool)
        if path is None:
            checks.append(Check(tool, WARN, "not found (optional)", fix, required=False))
            continue
        rc, out = node.run([path, "--version"])
        first = out.splitlines()[0] if out else ""
        checks.append(Check(tool, OK if rc == 0 else WARN, first if rc == 0 else f"{path} --version failed: {first}",
                            "" if rc == 0 else fix, required=False))
    return checks


def _existing(path: str) -> str:
    """`path` if it is a directory, else its nearest ancestor that is."""
    path = os.path.abspath(path)
    while not os.path.isdir(path) and path != "/":
        path = os.path.dirname(path)
    return path


def _state_dir(node: Node, root: str) -> list[Check]:
    checks = []
    if os.path.isdir(root):
        st = os.stat(root)
        if st.st_uid != 0 or st.st_mode & 0o022:
            checks.append(Check("state dir", WARN, f"{root} is owned by uid {st.st_uid} with mode "
                                f"{st.st_mode & 0o777:o}: others could plant files the daemon trusts",
                                f"chown root:root {root} && chmod 700 {root}", required=False))
        else:
            checks.append(Check("state dir", OK, f"{root} (root-owned, mode {st.st_mode & 0o777:o})"))
    elif os.path.exists(root):
        return [Check("state dir", FAIL, f"{root} exists and is not a directory", "remove it or pass another --root")]
    else:
        parent = _existing(root)
        if not os.access(parent, os.W_OK):
            return [Check("state dir", FAIL, f"{root} is missing and {parent} is not writable",
                          f"mkdir -m 700 {root} (as root)")]
        checks.append(Check("state dir", OK, f"{root} will be created (in {parent})"))
    st = node.statvfs(_existing(root))
    free, inodes = st.f_bavail * st.f_frsize, st.f_favail
    status = FAIL if free < FREE_BYTES_FAIL or inodes < FREE_INODES_FAIL else (
        WARN if free < FREE_BYTES_WARN or inodes < FREE_INODES_WARN else OK)
    checks.append(Check("disk", status, f"{free / (1 << 30):.1f} GiB and {inodes} inodes free at {_existing(root)}",
                        "" if status == OK else "free space on that filesystem, or point --root elsewhere"))
    return checks


def _ulimits(node: Node) -> list[Check]:
    soft, hard = node.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = hard == resource.RLIM_INFINITY
    status = OK if unlimited or hard >= NOFILE_WARN else (WARN if hard >= NOFILE_FAIL else FAIL)
    checks = [Check("open files", status, f"nofile soft {soft}, hard {'unlimited' if unlimited else hard} "
                    "(the daemon raises soft to hard; each sandbox and connection holds fds)",
                    "" if status == OK else f"LimitNOFILE=1048576 in the unit, or ulimit -Hn {NOFILE_WARN}+")]
    soft, hard = node.getrlimit(resource.RLIMIT_NPROC)
    if node.euid() != 0 and soft != resource.RLIM_INFINITY and soft < 4096:
        checks.append(Check("processes", WARN, f"nproc {soft}: every command of every sandbox counts",
                            "LimitNPROC=infinity in the unit", required=False))
    return checks


_SCRATCH = ".sandboxd-doctor-"


def _sweep_scratch(parent: str, age_s: float = 600.0) -> None:
    """Scratch directories of probes killed before they cleaned up (a probe runner's timeout): their
    mounts died with the probe's namespace, the directories are plain files now."""
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(_SCRATCH) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    now = time.time()
    for entry in entries:
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime > age_s:
                shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            pass


def run_checks(root: str, node: Node | None = None) -> list[Check]:
    """Every check, in the order a person fixes them."""
    node = node or Node()
    is_root = node.euid() == 0
    checks = [Check("user", OK, "running as root") if is_root else
              Check("user", FAIL, f"running as uid {node.euid()}: the ns runtime needs root (mounts, "
                    "namespaces, cgroups)", "run as root (the systemd unit or the privileged DaemonSet), or "
                    "use --runtime podman / dir")]
    if is_root and not node.probed:
        parent = _existing(root)
        _sweep_scratch(parent)
        base = tempfile.mkdtemp(prefix=_SCRATCH, dir=parent) if os.access(parent, os.W_OK) else None
        try:
            node.probed = node.probe(base) if base else {"overlay": f"{parent} is not writable"}
        finally:
            if base:
                shutil.rmtree(base, ignore_errors=True)
        if "error" in node.probed:
            checks.append(Check("probe", FAIL, node.probed["error"], "see the error; the probe forks as root"))
    checks += _kernel(node)
    release = (node.read(node.proc, "sys/kernel/osrelease") or "").strip()
    checks += _overlay(node, release)
    checks += _cgroups(node)
    checks += _namespaces(node)
    checks += _state_dir(node, root)
    checks += _ulimits(node)
    checks += _tools(node)
    return checks


def report(checks: list[Check], root: str) -> dict[str, Any]:
    """The --json object: ok (the ns runtime can run), counts, and every check."""
    blocking = [c.name for c in checks if c.status == FAIL and c.required]
    return {"ok": not blocking, "root": root, "blocking": blocking,
            "counts": {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)},
            "checks": [asdict(c) for c in checks]}


def format_table(checks: list[Check], root: str) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"sandboxd doctor: state directory {root}"]
    for c in checks:
        line = f"  {c.status.upper():4s}  {c.name:{width}s}  {c.detail}"
        if c.fix and c.status != OK:
            line += f"\n        {'':{width}s}  fix: {c.fix}"
        lines.append(line)
    result = report(checks, root)
    lines.append("ns runtime: can run here" if result["ok"] else
                 f"ns runtime: cannot run here (fix: {', '.join(result['blocking'])})")
    return "\n".join(lines)


def main(root: str, *, as_json: bool = False, node: Node | None = None) -> int:
    checks = run_checks(root, node)
    result = report(checks, root)
    print(json.dumps(result) if as_json else format_table(checks, root))
    return 0 if result["ok"] else 1
