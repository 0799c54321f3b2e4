"""Soak: continuous create/exec/snapshot/restore/destroy from many clients against `sandboxd serve`.

A real daemon (its own process, ns runtime, Unix socket) serves `--clients` clients (64), each on
its own connection, each repeating one cycle until the time is up:

    create -> exec (write a file) -> snapshot -> exec (change it) -> restore(snapshot)
           -> exec (the file is back) -> snapshot.delete -> destroy

Every `--sample-s` seconds it samples the daemon: RSS, open fds, mounts in the host's mount
namespace and in the daemon's private one (the mount thread's /proc/<pid>/task/<tid>/mountinfo),
cgroups under the daemon's parent group, and its processes (zygote, inits, commands).

Checks at the end:
  - leaks: once the clients have stopped and every sandbox is gone (within --settle-s: the daemon
    unmounts in the background), fds, mounts (both namespaces),
    cgroups and processes are back at their counts before the load (taken after one warm-up cycle,
    which starts the zygote, the image layers and the spare uppers); RSS under load does not drift
    (mean of the last window within 10% + 8 MiB of the first);
  - latency drift: the p99 of the cycle (and of each operation, reported) in the last window is
    within 20% of the first. Windows are 5 minutes, or a fifth of the run when it is shorter than
    25 minutes.
Errors of any call are counted by kind; there must be none.

Needs root and overlayfs. Usage: python bench/soak.py [--minutes 30] [--clients 64] [--sample-s 10]
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from collections import Counter

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sandboxd.client import connect  # noqa: E402
from sandboxd.launch import Daemon, start_daemon  # noqa: E402

LIMITS = {"memory_bytes": 256 << 20, "pids": 64, "disk_bytes": 16 << 20}
CGROUP_MOUNT = "/sys/fs/cgroup"


# --- the daemon ------------------------------------------------------------------------------------


def _cgroup_parent(state_dir: str) -> str:
    # as sandboxd.service.open_runtime names it
    return "sandboxd-" + hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:10]


def _count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return -1


def _processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (ppid, cmdline) of every process."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        out[int(pid)] = (ppid, cmdline)
    return out


def _mount_points(path: str) -> Counter[str]:
    try:
        with open(path) as f:
            return Counter(line.split()[4] for line in f)
    except OSError:
        return Counter()


def _mount_thread_mountinfo(pid: int) -> str:
    own_ns = os.readlink(f"/proc/{pid}/ns/mnt")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            if os.readlink(f"/proc/{pid}/task/{tid}/ns/mnt") != own_ns:  # the mount thread
                return f"/proc/{pid}/task/{tid}/mountinfo"
        except OSError:
            continue
    return ""


def sample(daemon: Daemon) -> dict:
    """One sample of the daemon's resources."""
    pid = daemon.pid
    with open(f"/proc/{pid}/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    mountinfo = _mount_thread_mountinfo(pid)
    private_mounts = _count_lines(mountinfo) if mountinfo else -1
    parent = _cgroup_parent(daemon.root)
    cgroups = 0
    for controller in ("memory", "pids", "freezer", "unified", ""):
        top = os.path.join(CGROUP_MOUNT, controller, parent)
        if os.path.isdir(top):
            cgroups += sum(len(dirs) for _, dirs, _ in os.walk(top))
    procs = _processes()
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(p)
    kinds: Counter[str] = Counter()
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        cmdline = procs[p][1]
        # the daemon's only child is the zygote; the zygote's children are inits (and embryos)
        kinds["zygote" if procs[p][0] == pid else "init" if cmdline.startswith(b"init") else "command"] += 1
        todo.extend(children.get(p, []))
    return {
        "t": round(time.monotonic(), 1),
        "rss_mib": round(rss_kib / 1024, 1),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "mounts_host": _count_lines(f"/proc/{pid}/mountinfo"),
        "mounts_daemon": private_mounts,
        "cgroups": cgroups,
        "zygotes": kinds["zygote"],
        "inits": kinds["init"],
        "commands": kinds["command"],
    }


# --- the load -----------------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.samples: list[tuple[float, str, float]] = []  # (monotonic end time, op, seconds)
        self.errors: Counter[str] = Counter()
        self.cycles = 0

    async def timed(self, op: str, call):
        t0 = time.perf_counter()
        result = await call
        self.samples.append((time.monotonic(), op, time.perf_counter() - t0))
        return result


async def one_cycle(node, rec: Recorder) -> None:
    t0 = time.perf_counter()
    sb = await rec.timed("create", node.create("host", limits=LIMITS, timeout_s=120))
    try:
        res = await rec.timed("exec", sb.exec("echo base > /testbed/f && cat /testbed/f", timeout_s=60))
        assert res.exit_code == 0 and res.output == b"base\n", ("write and read back", res)
        snap = await rec.timed("snapshot", sb.snapshot())
        try:
            res = await rec.timed("exec", sb.exec("echo changed > /testbed/f; sleep 0.01 &", timeout_s=60))
            assert res.exit_code == 0, ("change", res)
            await rec.timed("restore", sb.restore(snap))
            res = await rec.timed("exec", sb.exec("cat /testbed/f", timeout_s=60))
            if res.output != b"base\n":
                detail = await sb.exec("od -c /testbed/f | head -3; stat -c %s /testbed/f; cat /testbed/f", timeout_s=60)
                raise AssertionError("read after restore", res.exit_code, res.output, detail.output[:200])
        finally:
            with trio.CancelScope(shield=True):
                await rec.timed("delete_snapshot", node.delete_snapshot(snap))
    finally:
        with trio.CancelScope(shield=True):
            await rec.timed("destroy", sb.destroy())
    rec.samples.append((time.monotonic(), "cycle", time.perf_counter() - t0))
    rec.cycles += 1


async def client(address: str, stop: trio.Event, rec: Recorder) -> None:
    async with connect(address, call_timeout_s=120) as node:
        while not stop.is_set():
            try:
                await one_cycle(node, rec)
            except Exception as exc:  # counted and reported: a soak must have none
                kind = re.sub(r"duration_s=[0-9.e-]+", "duration_s=...", f"{type(exc).__name__}: {exc}")[:400]
                rec.errors[kind] += 1
                await trio.sleep(0.1)


# What must return to its count before the load. The daemon keeps up to 2 empty uppers ready per disk
# size (one tmpfs mount each), refilled in the background: its mounts are counted without them.
RETURN_KEYS = ("fds", "mounts_host", "mounts_daemon_but_spares", "cgroups", "zygotes", "inits", "commands")


async def with_spares(s: dict, address: str) -> dict:
    async with connect(address) as node:
        spares = (await node.stats())["runtime"]["spare_uppers"]
    return {**s, "spare_uppers": spares, "mounts_daemon_but_spares": s["mounts_daemon"] - spares}


def p99(values: list[float]) -> float:
    if not values:
        return math.nan
    values = sorted(values)
    return values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)]


def window_stats(rec: Recorder, start: float, end: float) -> dict:
    by_op: dict[str, list[float]] = {}
    for t, op, s in rec.samples:
        if start <= t < end:
            by_op.setdefault(op, []).append(s)
    return {op: {"n": len(v), "p50_ms": round(sorted(v)[len(v) // 2] * 1e3, 2), "p99_ms": round(p99(v) * 1e3, 2)}
            for op, v in sorted(by_op.items())}


async def soak(args: argparse.Namespace, work: str) -> dict:
    address = f"unix:{os.path.join(work, 'd.sock')}"
    daemon = start_daemon(os.path.join(work, "state"), [address], log_level="WARNING", die_with_parent=True,
                          timeout_s=60)
    load_start = os.getloadavg()
    try:
        async with connect(address) as node:  # warm-up: zygote, image layers, spare uppers
            await one_cycle(node, Recorder())
        await trio.sleep(2)
        before = await with_spares(sample(daemon), address)
        mounts_before = _mount_points(_mount_thread_mountinfo(daemon.pid))
        samples = [before]
        rec = Recorder()
        stop = trio.Event()
        duration = args.minutes * 60
        window = 300.0 if duration >= 25 * 60 else duration / 5
        t_start = time.monotonic()
        async with trio.open_nursery() as nursery:
            for _ in range(args.clients):
                nursery.start_soon(client, address, stop, rec)
            while time.monotonic() - t_start < duration:
                await trio.sleep(min(args.sample_s, max(0.0, duration - (time.monotonic() - t_start))))
                samples.append({**sample(daemon), "cycles": rec.cycles, "errors": sum(rec.errors.values())})
                if args.progress:
                    print(json.dumps(samples[-1]), file=sys.stderr, flush=True)
            t_end = time.monotonic()
            stop.set()  # every client finishes its cycle: nothing is left behind by the load
        # Settled: the daemon unmounts old roots and uppers in the background.
        after = await with_spares(sample(daemon), address)
        t_stopped = time.monotonic()
        while time.monotonic() - t_stopped < args.settle_s:
            if all(after[k] == before[k] for k in RETURN_KEYS):
                break
            await trio.sleep(1)
            after = await with_spares(sample(daemon), address)
        settle_s = round(time.monotonic() - t_stopped, 1)
        mounts_after = _mount_points(_mount_thread_mountinfo(daemon.pid))
        async with connect(address) as node:
            node_stats = await node.stats()
    finally:
        rc = daemon.stop()
    load_end = os.getloadavg()

    first, last = window_stats(rec, t_start, t_start + window), window_stats(rec, t_end - window, t_end)
    under_load = [s for s in samples[1:]]
    rss_first = [s["rss_mib"] for s in under_load if s["t"] < t_start + window]
    rss_last = [s["rss_mib"] for s in under_load if s["t"] >= t_end - window]
    mean = lambda xs: round(sum(xs) / len(xs), 1) if xs else math.nan  # noqa: E731
    returned = {k: {"before": before[k], "after": after[k], "ok": after[k] == before[k]} for k in RETURN_KEYS}
    rss_ok = mean(rss_last) <= mean(rss_first) * 1.10 + 8
    drift = {op: round(last[op]["p99_ms"] / first[op]["p99_ms"], 3)
             for op in first if op in last and first[op]["p99_ms"] > 0}
    latency_ok = drift.get("cycle", math.inf) <= 1.2
    leaks_ok = all(v["ok"] for v in returned.values())
    return {
        "bench": "soak",
        "pass": bool(leaks_ok and rss_ok and latency_ok and not rec.errors and rc == 0),
        "minutes": args.minutes,
        "clients": args.clients,
        "cycles": rec.cycles,
        "cycles_per_s": round(rec.cycles / (t_end - t_start), 2),
        "errors": dict(rec.errors),
        "leaks_ok": leaks_ok,
        "settle_s": settle_s,
        "returned_to_start": returned,
        "rss_mib": {"before": before["rss_mib"], "first_window_mean": mean(rss_first),
                    "last_window_mean": mean(rss_last), "max": max(s["rss_mib"] for s in samples),
                    "after": after["rss_mib"], "ok": rss_ok},
        "window_s": round(window, 1),
        "p99_drift_last_over_first": drift,
        "latency_ok": latency_ok,
        "latency_first_window": first,
        "latency_last_window": last,
        "max_under_load": {k: max(s[k] for s in under_load) for k in ("fds", "mounts_daemon", "cgroups", "inits")}
        if under_load else {},
        "mounts_daemon_added": sorted((mounts_after - mounts_before).elements())[:20],
        "mounts_daemon_removed": sorted((mounts_before - mounts_after).elements())[:20],
        "node_stats_after": {k: v for k, v in node_stats.get("runtime", {}).items() if k != "background_errors"},
        "daemon_exit_code": rc,
        "daemon_warnings": sum(1 for line in daemon.lines if " WARNING " in line or " ERROR " in line),
        "daemon_latency_p99_ms": {m: h["p99_ms"] for m, h in node_stats.get("latency", {}).items()},
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in load_end],
        "cpus": os.cpu_count(),
        "samples": [{k: v for k, v in s.items()} for s in samples],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the load runs (default 30)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients, one connection each (default 64)")
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--settle-s", type=float, default=120.0,
                        help="after the load, how long counts may take to return (default 120)")
    parser.add_argument("--progress", action="store_true", help="print each sample on stderr")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("soak: the ns runtime needs root")
    with tempfile.TemporaryDirectory(prefix="sandboxd-soak-") as work:
        report = trio.run(soak, args, work)
    print(json.dumps(report))
    sys.exit(0 if report["pass"] else 1)


if __name__ == "__main__":
    main()
