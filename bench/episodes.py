"""Benchmark: end-to-end episodes per minute on the toy suite with the oracle policy, real sandboxes,
sandboxd `ns` against `podman`, in one run, and the ratio.

Each episode is the scheduler's full path: the task's environment built once per node (create +
snapshot), a fork per rollout, a token-exact tool-using episode (view, str_replace per hunk, run the
tests, submit), restore to the snapshot, SWE-bench grading, destroy. The policy answers in-process
(no HTTP), so the figure is the sandbox and grading side of the pipeline.

Usage: python bench/episodes.py [--tasks 8] [--group 4] [--concurrency 8]. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.fakes import CallablePolicy, tiny_tokenizer  # noqa: E402
from agent.grading import grade  # noqa: E402
from agent.oracle import OraclePolicy  # noqa: E402
from agent.scaffold import EpisodeConfig  # noqa: E402
from agent.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from agent.toy import generate_suite  # noqa: E402
from sandboxd.client import open_local  # noqa: E402


async def run(runtime: str, tasks, tokenizer, group: int, concurrency: int) -> dict:
    oracle = OraclePolicy(tasks, tokenizer)
    async with open_local(runtime) as node:
        sched = Scheduler([node], CallablePolicy(oracle), tokenizer, grade,
                          SchedulerConfig(max_episodes=concurrency, node_capacity=concurrency, grade_timeout_s=300,
                                          episode=EpisodeConfig(max_turns=12, max_context_tokens=16384)))
        t0 = time.perf_counter()
        groups = await sched.run_groups([(t, group, t.id) for t in tasks])
        wall = time.perf_counter() - t0
    trajs = [r.trajectory for g in groups for r in g]
    return {"episodes": len(trajs), "resolved": sum(bool(t.resolved) for t in trajs),
            "errors": sum(t.finish_reason == "error" for t in trajs), "wall_s": round(wall, 2),
            "episodes_per_min": round(len(trajs) / wall * 60, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/episodes.py needs root (ns sandboxes, podman)")
    tokenizer = tiny_tokenizer()
    with tempfile.TemporaryDirectory(prefix="bench-episodes-") as tmp:
        tasks = generate_suite(7, args.tasks, 0, Path(tmp) / "suite", python="python3")
        results = {}
        for runtime in ("ns", "podman"):
            try:
                results[runtime] = r = trio.run(run, runtime, tasks, tokenizer, args.group, args.concurrency)
            except Exception as exc:  # podman missing here: keep the ns figure, say why
                results[runtime] = {"skipped": f"{type(exc).__name__}: {exc}"}
                continue
            print(f"{runtime}: {r}", flush=True)
    ns, pod = results["ns"], results["podman"]
    print(json.dumps({"bench": "episodes", "ns_episodes_per_min": ns.get("episodes_per_min"),
                      "podman_episodes_per_min": pod.get("episodes_per_min"),
                      "ratio_ns_vs_podman": round(ns["episodes_per_min"] / pod["episodes_per_min"], 2)
                      if "episodes_per_min" in pod and "episodes_per_min" in ns else None,
                      "load_avg": os.getloadavg()[0], "details": results}))


if __name__ == "__main__":
    main()
