"""Benchmark: toy tasks graded per minute in sandboxes, sandboxd `ns` against `podman`, in one run.

Each grade is what the scheduler does after an episode: put the sandbox back to the task's snapshot
(ns: restore in milliseconds; podman: recreate the container), then SWE-bench grading (apply the
patch, reset and apply the test patch, run the tests between markers, parse the log). Every grade is
checked: the gold patch must resolve, an empty patch must not.

Usage: python bench/grading.py [--tasks 8] [--rounds 3] [--concurrency 2]. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.grading import grade  # noqa: E402
from agent.toy import generate_suite  # noqa: E402
from sandboxd.client import open_local  # noqa: E402


async def bench_runtime(runtime: str, tasks, rounds: int, concurrency: int) -> dict:
    durations: list[float] = []
    wrong = 0
    limiter = trio.CapacityLimiter(concurrency)
    async with open_local(runtime) as node:
        async def one_task(task) -> None:
            nonlocal wrong
            async with limiter:
                async with node.open(task.image, repo=task.repo) as sb:
                    snap = await sb.snapshot()
                    for r in range(rounds):
                        patch, should_resolve = (task.gold_patch, True) if r % 2 == 0 else ("", False)
                        t0 = time.perf_counter()
                        await sb.restore(snap)
                        report = await grade(task, patch, sb, timeout_s=300, allow_empty_patch=True)
                        durations.append(time.perf_counter() - t0)
                        wrong += report.resolved != should_resolve
                    await node.delete_snapshot(snap)

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for task in tasks:
                nursery.start_soon(one_task, task)
        wall = time.perf_counter() - t0
    durations.sort()
    return {
        "grades": len(durations),
        "wrong": wrong,
        "grades_per_min": round(len(durations) / wall * 60, 1),
        "p50_s": round(statistics.median(durations), 3),
        "p99_s": round(durations[min(len(durations) - 1, int(0.99 * len(durations)))], 3),
        "wall_s": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="grades per task (alternating gold / empty patch)")
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/grading.py needs root (ns sandboxes, podman)")
    with tempfile.TemporaryDirectory(prefix="bench-grading-") as tmp:
        tasks = generate_suite(42, args.tasks, 0, Path(tmp) / "suite", python="python3")
        results = {}
        for runtime in ("ns", "podman"):
            try:
                results[runtime] = r = trio.run(bench_runtime, runtime, tasks, args.rounds, args.concurrency)
            except Exception as exc:  # podman missing on this node: report it, keep the ns figure
                results[runtime] = {"skipped": f"{type(exc).__name__}: {exc}"}
                print(f"{runtime}: skipped ({exc})", flush=True)
                continue
            print(f"{runtime}: {r}", flush=True)
    ns, pod = results["ns"], results["podman"]
    ratio = round(ns["grades_per_min"] / pod["grades_per_min"], 2) if "grades_per_min" in pod else None
    print(json.dumps({"bench": "grading", "ns_grades_per_min": ns.get("grades_per_min"),
                      "podman_grades_per_min": pod.get("grades_per_min"), "ratio_ns_vs_podman": ratio,
                      "wrong_grades": ns.get("wrong", 0) + pod.get("wrong", 0), "load_avg": os.getloadavg()[0],
                      "details": results}))


if __name__ == "__main__":
    main()
