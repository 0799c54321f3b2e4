"""Density of the ns runtime: how many idle sandboxes this machine holds, and what each costs.

Creates up to --count idle sandboxes from one image (`host`), one after another, stopping early
(and saying why) if a create fails or MemAvailable falls below --min-available-gib. Reports:

    create_p50_ms / _p99_ms      create("host") round trip, ready for exec
    mem_per_sandbox_kib          MemTotal - MemAvailable, grown per sandbox (everything: user and kernel)
    kernel_per_sandbox_kib       Slab + KernelStack + PageTables grown per sandbox (namespaces,
                                 mounts, cgroups, page tables), from /proc/meminfo
    init_pss_kib / init_rss_kib  one idle init's proportional / resident set (smaps_rollup), the
    init_uss_kib                 average over all, and its private pages (what it does not share
                                 with the zygote and the other inits)
    daemon_pss_kib_per_sandbox   the daemon's own PSS growth per sandbox
    cgroup_kib_per_sandbox       the runtime's cgroup (v1: memory.usage_in_bytes of its parent,
                                 which holds every init and every sandbox) per sandbox; kmem too
    disk_per_sandbox_bytes       an idle sandbox's upper (tmpfs, counted in RAM above) in use, and
                                 host disk used by the state directory
    destroy_p50_ms / _p99_ms     destroy round trip

Then destroys them all and asserts that mounts (in the mount thread's namespace), cgroups and
processes are back to their counts before. Needs root and overlayfs.
Usage: python bench/sandbox_density.py [--count 1000]. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sandboxd import Limits, open_ns_runtime  # noqa: E402

LIMITS = Limits(memory_bytes=512 << 20, pids=256, disk_bytes=256 << 20)


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0])  # KiB
    return out


def rollup(pid: int) -> dict[str, int]:
    """smaps_rollup of a process, in KiB ({} if it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1])
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return out


def children(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(x) for x in f.read().split()]
    return kids


def read_int(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return 0


def mount_count(rt) -> int:
    """Mounts in the mount thread's namespace, the spare uppers kept ready not counted."""
    rt.mounter.drain_background()
    with open(f"/proc/{rt.mounter.tid}/mountinfo") as f:
        return len(f.readlines()) - rt.stats()["spare_uppers"]


def disk_used(path: str) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p * len(xs)))] * 1e3, 3) if xs else 0.0


async def main(count: int, min_available_gib: float) -> dict:
    work = tempfile.mkdtemp(prefix="sandbox-density-")
    result: dict = {"bench": "sandbox_density", "target": count}
    try:
        async with open_ns_runtime(os.path.join(work, "state"), limits=LIMITS) as rt:
            warm = await rt.create("host")  # images, spare uppers: what the first create builds
            await rt.destroy(warm)
            zygote = rt.zygote.pid
            parent_v1 = os.path.join(rt.cgroups.mount, "memory", rt.cgroups.parent)
            await trio.sleep(0.5)
            start = {"mounts": mount_count(rt), "cgroups": rt.cgroups.count(), "inits": len(children(zygote)),
                     "meminfo": meminfo(), "daemon": rollup(os.getpid()), "zygote": rollup(zygote),
                     "disk": disk_used(work), "cgroup": read_int(f"{parent_v1}/memory.usage_in_bytes"),
                     "kmem": read_int(f"{parent_v1}/memory.kmem.usage_in_bytes")}
            sids, create = [], []
            stop_reason = "reached the target"
            for _ in range(count):
                if meminfo()["MemAvailable"] < min_available_gib * (1 << 20):
                    stop_reason = f"MemAvailable below {min_available_gib} GiB"
                    break
                t = time.perf_counter()
                try:
                    sids.append(await rt.create("host"))
                except Exception as exc:
                    stop_reason = f"create failed: {type(exc).__name__}: {exc}"[:300]
                    break
                create.append(time.perf_counter() - t)
            n = len(sids)
            await trio.sleep(2.0)  # let them settle: idle means idle
            # every sandbox answers
            for sid in sids[:: max(1, n // 20)]:
                assert (await rt.exec(sid, ["true"])).exit_code == 0
            end = {"meminfo": meminfo(), "daemon": rollup(os.getpid()), "disk": disk_used(work),
                   "cgroup": read_int(f"{parent_v1}/memory.usage_in_bytes"),
                   "kmem": read_int(f"{parent_v1}/memory.kmem.usage_in_bytes")}
            inits = [rt.init_pid(sid) for sid in sids]
            rollups = [r for r in (rollup(p) for p in inits) if r]
            uppers = [rt._sandboxes[sid].upper.mount for sid in sids[:50]]
            upper_bytes = [await rt.mounter.run(_upper_used, u) for u in uppers]

            def per(key: str) -> float:
                return round((start["meminfo"][key] - end["meminfo"][key]) / max(n, 1), 1)

            def grown(*keys: str) -> float:
                return round(sum(end["meminfo"][k] - start["meminfo"][k] for k in keys) / max(n, 1), 1)

            destroy = []
            for sid in sids:
                t = time.perf_counter()
                await rt.destroy(sid)
                destroy.append(time.perf_counter() - t)
            await trio.sleep(0.5)
            after = {"mounts": mount_count(rt), "cgroups": rt.cgroups.count(), "inits": len(children(zygote))}
            assert after == {k: start[k] for k in after}, f"left behind: before {start}, after {after}"
            result.update({
                "sandboxes": n, "stop_reason": stop_reason,
                "create_p50_ms": pct(create, 0.5), "create_p99_ms": pct(create, 0.99),
                "create_first_100_p50_ms": pct(create[:100], 0.5), "create_last_100_p50_ms": pct(create[-100:], 0.5),
                "destroy_p50_ms": pct(destroy, 0.5), "destroy_p99_ms": pct(destroy, 0.99),
                "mem_per_sandbox_kib": per("MemAvailable"),
                "kernel_per_sandbox_kib": grown("Slab", "KernelStack", "PageTables"),
                "slab_per_sandbox_kib": grown("Slab"), "pagetables_per_sandbox_kib": grown("PageTables"),
                "shmem_per_sandbox_kib": grown("Shmem"),
                "init_pss_kib": round(sum(r.get("Pss", 0) for r in rollups) / max(len(rollups), 1), 1),
                "init_rss_kib": round(sum(r.get("Rss", 0) for r in rollups) / max(len(rollups), 1), 1),
                "init_uss_kib": round(sum(r.get("Private_Clean", 0) + r.get("Private_Dirty", 0) for r in rollups)
                                      / max(len(rollups), 1), 1),
                "zygote_pss_kib": rollup(zygote).get("Pss", 0),
                "daemon_pss_kib_per_sandbox": round((end["daemon"].get("Pss", 0) - start["daemon"].get("Pss", 0))
                                                    / max(n, 1), 1),
                "cgroup_kib_per_sandbox": round((end["cgroup"] - start["cgroup"]) / 1024 / max(n, 1), 1),
                "cgroup_kmem_kib_per_sandbox": round((end["kmem"] - start["kmem"]) / 1024 / max(n, 1), 1),
                "disk_per_sandbox_bytes": {"upper_tmpfs_used": int(sum(upper_bytes) / max(len(upper_bytes), 1)),
                                           "host_disk": int((end["disk"] - start["disk"]) / max(n, 1))},
                "cleanup": {"mounts": after["mounts"], "cgroups": after["cgroups"], "inits": after["inits"]},
                "mem_available_gib_at_peak": round(end["meminfo"]["MemAvailable"] / (1 << 20), 2),
            })
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return result


def _upper_used(mount: str) -> int:  # on the mount thread: the uppers are mounted there
    st = os.statvfs(mount)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="idle sandboxes to create")
    parser.add_argument("--min-available-gib", type=float, default=2.0, help="stop creating below this")
    args = parser.parse_args()
    print(json.dumps(trio.run(main, args.count, args.min_available_gib)))
