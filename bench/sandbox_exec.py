"""Exec round trip of `true` in a running sandbox, ns runtime against its peers, in one run.

    daemon      the same through `sandboxd serve` in its own process, over its Unix socket with the
                wire protocol and the trio client (sandboxd.client): what the scheduler pays
    ns          NsRuntime.exec(sid, ["true"]) in this process: validation, the request to the
                sandbox's init, posix_spawn in the sandbox, the exit notice, the output drained
    nsenter     `nsenter -t <init> -m -u -i -n -p --root=<its root> true`: a new host process that
                enters the sandbox's namespaces (the reference; no cgroup, no capability drop)
    podman      PodmanRuntime.exec(sid, ["true"]) (sandboxd/podman.py, podman's API service)
    podman-cli  `podman exec <container> true` on that runtime's container

The podman peers are skipped, with the reason in `skipped`, where podman (or podman-py) cannot
run. Needs root and overlayfs. Usage: python bench/sandbox_exec.py [--rounds 1000]
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Awaitable, Callable

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sandboxd import Limits, open_ns_runtime  # noqa: E402

LIMITS = Limits(memory_bytes=1 << 30, pids=512, disk_bytes=256 << 20)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p * len(xs)))] * 1e3, 3)


async def timed(fn: Callable[[], Awaitable[object]], rounds: int, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        await fn()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t)
    return out


async def measure_ns(work: str, rounds: int) -> dict[str, list[float]]:
    async with open_ns_runtime(os.path.join(work, "ns"), limits=LIMITS) as rt:
        sid = await rt.create("host")

        async def ns_true() -> None:
            res = await rt.exec(sid, ["true"])
            assert res.exit_code == 0, res

        pid = rt.init_pid(sid)
        root = f"/proc/{pid}/root/r{rt._sandboxes[sid].generation}"
        argv = ["nsenter", "-t", str(pid), "-m", "-u", "-i", "-n", "-p", f"--root={root}", f"--wd={root}",
                "true"]

        async def nsenter_true() -> None:
            await trio.run_process(argv, stdin=subprocess.DEVNULL)

        return {"ns": await timed(ns_true, rounds), "nsenter": await timed(nsenter_true, max(50, rounds // 4))}


async def measure_daemon(work: str, rounds: int) -> dict[str, list[float]]:
    """exec through `sandboxd serve` in its own process, over its Unix socket."""
    from sandboxd.client import connect
    from sandboxd.launch import start_daemon

    sock = os.path.join(work, "daemon.sock")
    daemon = start_daemon(os.path.join(work, "daemon"), [f"unix:{sock}"], log_level="WARNING", die_with_parent=True)
    try:
        async with connect(f"unix:{sock}") as node:
            async with node.open("host") as sb:
                async def daemon_true() -> None:
                    res = await sb.exec(["true"], timeout_s=30)
                    assert res.exit_code == 0, res

                return {"daemon": await timed(daemon_true, rounds)}
    finally:
        daemon.stop()


async def measure_podman(work: str, rounds: int, skipped: dict[str, str]) -> dict[str, list[float]]:
    """The podman runtime's exec and `podman exec`; {} (and why in `skipped`) where they cannot run."""
    if shutil.which("podman") is None:
        skipped["podman"] = "podman is not installed"
        return {}
    try:
        from sandboxd.podman import open_podman_runtime
    except ImportError as exc:
        skipped["podman"] = f"sandboxd.podman cannot be imported: {exc}"
        return {}
    out: dict[str, list[float]] = {}
    try:
        async with open_podman_runtime(os.path.join(work, "podman"), limits=LIMITS) as rt:
            sid = await rt.create("host")

            async def podman_true() -> None:
                res = await rt.exec(sid, ["true"])
                assert res.exit_code == 0, res

            out["podman"] = await timed(podman_true, max(30, rounds // 20), warmup=3)
            ids = subprocess.run(["podman", "ps", "-q", "--no-trunc", "--filter", f"label=sandboxd.sandbox={sid}"],
                                 capture_output=True, text=True).stdout.split()
            if len(ids) != 1:
                skipped["podman-cli"] = f"no single container labelled sandboxd.sandbox={sid}: {ids}"
            else:
                async def cli_true() -> None:
                    await trio.run_process(["podman", "exec", ids[0], "true"], stdin=subprocess.DEVNULL,
                                           capture_stdout=True, capture_stderr=True)

                out["podman-cli"] = await timed(cli_true, max(20, rounds // 50), warmup=2)
    except Exception as exc:  # a peer that cannot run here is reported, not fatal
        skipped["podman"] = f"{type(exc).__name__}: {exc}"[:300]
    return out


async def main(rounds: int) -> dict:
    work = tempfile.mkdtemp(prefix="sandbox-exec-")
    skipped: dict[str, str] = {}
    load_before = os.getloadavg()[0]
    try:
        times = await measure_daemon(work, rounds)
        times.update(await measure_ns(work, rounds))
        times.update(await measure_podman(work, rounds, skipped))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result: dict = {"bench": "sandbox_exec"}
    for name, xs in times.items():
        key = name.replace("-", "_")
        result[f"{key}_true_p50_ms"] = pct(xs, 0.5)
        result[f"{key}_true_p99_ms"] = pct(xs, 0.99)
        result[f"{key}_rounds"] = len(xs)
    for peer in ("nsenter", "podman", "podman-cli"):
        if peer in times:
            result[f"ns_vs_{peer.replace('-', '_')}_speedup"] = round(pct(times[peer], 0.5) / pct(times["ns"], 0.5), 1)
            result[f"daemon_vs_{peer.replace('-', '_')}_speedup"] = round(pct(times[peer], 0.5) / pct(times["daemon"], 0.5), 1)
    result["skipped"] = skipped
    result["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # before, after: a shared machine
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000, help="exec round trips of the ns runtime")
    args = parser.parse_args()
    print(json.dumps(trio.run(main, args.rounds)))
