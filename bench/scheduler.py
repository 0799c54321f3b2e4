"""Benchmark of the episode scheduler: many concurrent episodes of many turns.

(a) in-process: 4,096 concurrent episodes x 20 turns, a scripted policy and fake in-process sandboxes:
    turns per second and the scheduler's own overhead per turn (p50/p99: a turn's wall time less the
    time spent inside the sampler and the tool);
(c) with 200 ms per-turn sampler latency: the run's wall time against the ideal
    (turns x latency / concurrency), target within 10%.
(b), over loopback HTTP against the fake server in another process, is `--http` (needs agent.llm).

Usage: python bench/scheduler.py [--episodes 4096] [--turns 20]. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.fakes import FakeNode, ScriptedPolicy, tiny_tokenizer  # noqa: E402
from agent.scaffold import EpisodeConfig  # noqa: E402
from agent.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from runtime.records import Task  # noqa: E402


class Report:
    resolved = True

    def to_dict(self):
        return {"resolved": True}


async def grader(task, patch, workspace, *, timeout_s):
    return Report()


def script(turns: int) -> list[str]:
    step = "Checking.\n<function=bash>\n<parameter=command>python -m pytest -q</parameter>\n</function>"
    return [step] * (turns - 1) + ["<function=submit>\n</function>"]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def run(episodes: int, turns: int, latency_s: float, tokenizer) -> dict:
    groups = max(1, episodes // 8)
    tasks = [Task(id=f"t{i}", repo="bench/repo", base_commit="HEAD", problem_statement="The tests fail.",
                  image="host", test_patch="", FAIL_TO_PASS=["t"], PASS_TO_PASS=[], test_command="true",
                  log_parser="pytest") for i in range(groups)]
    nodes = [FakeNode(f"n{i}") for i in range(4)]
    policy = ScriptedPolicy(tokenizer, script(turns), latency_s=latency_s)
    config = SchedulerConfig(max_episodes=episodes, node_capacity=episodes,
                             episode=EpisodeConfig(max_turns=turns, max_context_tokens=1 << 20))
    sched = Scheduler(nodes, policy, tokenizer, grader, config)
    t0 = time.perf_counter()
    results = await sched.run_groups([(t, episodes // groups, f"g{i}") for i, t in enumerate(tasks)])
    wall = time.perf_counter() - t0
    trajs = [r.trajectory for g in results for r in g]
    n_turns = sum(len(t.turns) for t in trajs)
    overhead_ms = []
    for t in trajs:
        per_turn = (t.metrics["wall_s"] - sum(x.llm_s + x.tool_s for x in t.turns)) / max(1, len(t.turns))
        overhead_ms.append(per_turn * 1e3)
    ideal = turns * latency_s
    return {
        "episodes": len(trajs),
        "turns": n_turns,
        "wall_s": round(wall, 3),
        "turns_per_s": round(n_turns / wall),
        "overhead_per_turn_p50_ms": round(percentile(overhead_ms, 0.5), 3),
        "overhead_per_turn_p99_ms": round(percentile(overhead_ms, 0.99), 3),
        "ideal_s": round(ideal, 3) if latency_s else None,
        "vs_ideal": round(wall / ideal, 3) if latency_s else None,
        "resolved": sum(bool(t.resolved) for t in trajs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=4096)
    parser.add_argument("--turns", type=int, default=20)
    args = parser.parse_args()
    tokenizer = tiny_tokenizer()
    a = trio.run(run, args.episodes, args.turns, 0.0, tokenizer)
    print("(a) in-process:", a, flush=True)
    c = trio.run(run, args.episodes, args.turns, 0.2, tokenizer)
    print("(c) 200 ms latency:", c, flush=True)
    print(json.dumps({
        "bench": "scheduler",
        "inproc_turns_per_s": a["turns_per_s"],
        "inproc_overhead_p50_ms": a["overhead_per_turn_p50_ms"],
        "inproc_overhead_p99_ms": a["overhead_per_turn_p99_ms"],
        "latency200_wall_s": c["wall_s"],
        "latency200_ideal_s": c["ideal_s"],
        "latency200_vs_ideal": c["vs_ideal"],
        "targets": {"turns_per_s": 3000, "overhead_p99_ms": 2.0, "vs_ideal": 1.10},
        "details": {"inproc": a, "latency200": c},
    }))


if __name__ == "__main__":
    main()
