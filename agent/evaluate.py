"""`python -m agent.evaluate`: pass@1 .. pass@k of a model endpoint on a task set, with sandboxd.

    python -m agent.evaluate --endpoint http://gpu1:8000 --tokenizer /models/qwen --tasks verified.jsonl \\
        --k 4 --sandboxd tcp://build1:7070 --token-file token --out runs/eval-1

    python -m agent.evaluate --endpoint http://127.0.0.1:8000 --tokenizer DIR --tasks toy:heldout --k 2

Each task is rolled out `k` times (one group, forked from one snapshot); pass@j for j = 1..k uses the
unbiased estimator of Chen et al. (2021): 1 - C(n-c, j) / C(n, j), averaged over tasks. The JSON report
(`report.json`, written atomically) holds the per-task outcomes and every episode's grade; `viewer/`
has one HTML page per episode. sandboxd is used for evaluation only: nothing is trained.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from runtime.records import Task

__all__ = ["main", "pass_at_k", "summarize"]

log = logging.getLogger("swe_dapo.evaluate")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021, eq. 1)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(outcomes: dict[str, list[bool]], k: int) -> dict[str, float]:
    """pass@1..k over tasks, from each task's list of resolved flags (n >= k samples each)."""
    if not outcomes:
        raise ValueError("no tasks were evaluated")
    out = {}
    for j in range(1, k + 1):
        out[f"pass@{j}"] = sum(pass_at_k(len(r), sum(r), j) for r in outcomes.values()) / len(outcomes)
    return out


def load_task_set(spec: str, workdir: Path) -> list[Task]:
    """Tasks from a file (`agent.tasks.load_tasks`) or the toy suite: ``toy:train`` / ``toy:heldout[:SEED]``."""
    if spec.startswith("toy:"):
        from .toy import generate_suite

        parts = spec.split(":")
        split = parts[1]
        if split not in ("train", "heldout"):
            raise SystemExit(f"--tasks {spec}: expected toy:train or toy:heldout[:SEED]")
        seed = int(parts[2]) if len(parts) > 2 else 0
        tasks = generate_suite(seed, 24, 16, workdir / "toy", python="python3")
        return [t for t in tasks if t.split == split]
    from .grade import load_task_file

    return load_task_file(spec)


async def run_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    from sandboxd.client import connect, open_local

    from .grading import grade
    from .llm import LLMClient
    from .scaffold import EpisodeConfig, load_tokenizer
    from .scheduler import Scheduler, SchedulerConfig
    from .viewer import EpisodeView, write_viewer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = load_task_set(args.tasks, out)
    if args.limit:
        tasks = tasks[: args.limit]
    if not tasks:
        raise SystemExit(f"--tasks {args.tasks}: no tasks")
    tokenizer = load_tokenizer(args.tokenizer)
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    config = SchedulerConfig(max_episodes=args.concurrency, node_capacity=args.concurrency, grade_timeout_s=args.grade_timeout_s,
                             episode=EpisodeConfig(max_turns=args.max_turns, max_context_tokens=args.max_context_tokens,
                                                   max_turn_tokens=args.max_turn_tokens))
    t0 = time.perf_counter()
    async with AsyncExitStack() as stack:
        nodes = []
        for address in args.sandboxd:
            if address.startswith("local:"):
                nodes.append(await stack.enter_async_context(open_local(address.split(":", 1)[1])))
            else:
                nodes.append(await stack.enter_async_context(connect(address, token=token)))
        llm = await stack.enter_async_context(LLMClient(args.endpoint, model=args.model, temperature=args.temperature,
                                                        max_model_len=args.max_context_tokens))
        scheduler = Scheduler(nodes, llm, tokenizer, grade, config)
        groups = await scheduler.run_groups([(t, args.k, t.id) for t in tasks])
    elapsed = time.perf_counter() - t0
    by_id = {t.id: t for t in tasks}
    outcomes = {t.id: [bool(r.trajectory.resolved) for r in g] for t, g in zip(tasks, groups)}
    report = {
        "tasks": len(tasks),
        "k": args.k,
        **summarize(outcomes, args.k),
        "episodes": sum(len(g) for g in groups),
        "errors": sum(r.trajectory.finish_reason == "error" for g in groups for r in g),
        "elapsed_s": round(elapsed, 1),
        "endpoint": args.endpoint,
        "per_task": {
            tid: {"resolved": res, "episodes": [
                {"episode_id": r.trajectory.episode_id, "finish_reason": str(r.trajectory.finish_reason),
                 "turns": len(r.trajectory.turns), "resolved": r.trajectory.resolved, "grade": r.grade,
                 "error": r.error, "patch": r.trajectory.patch} for r in g]}
            for (tid, res), g in zip(outcomes.items(), groups)
        },
    }
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, out / "report.json")
    views = [EpisodeView(r.trajectory, by_id[r.trajectory.task_id], r.grade) for g in groups for r in g]
    write_viewer(out / "viewer", views, lambda ids: tokenizer.decode(ids), title=f"Evaluation on {args.tasks}")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agent.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", action="append", required=True, help="OpenAI-compatible base URL; repeatable")
    parser.add_argument("--tokenizer", required=True, help="directory of the model's tokenizer (with its chat template)")
    parser.add_argument("--model", default=None, help="model name sent to the endpoint")
    parser.add_argument("--tasks", required=True, help="task file (jsonl/json/parquet/save_to_disk) or toy:heldout[:SEED]")
    parser.add_argument("--k", type=int, default=1, help="rollouts per task; pass@1..k are reported")
    parser.add_argument("--sandboxd", action="append", default=None,
                        help="sandboxd address (unix:PATH, tcp://HOST:PORT) or local:ns|podman|dir; repeatable")
    parser.add_argument("--token-file", help="sandboxd token file for tcp:// addresses")
    parser.add_argument("--out", default=None, help="output directory (default: a new temp dir)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N tasks")
    parser.add_argument("--concurrency", type=int, default=64, help="episodes in flight")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-turns", type=int, default=30)
    parser.add_argument("--max-context-tokens", type=int, default=32768)
    parser.add_argument("--max-turn-tokens", type=int, default=2048)
    parser.add_argument("--grade-timeout-s", type=float, default=900.0)
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error("--k must be >= 1")
    args.sandboxd = args.sandboxd or ["local:ns"]
    args.out = args.out or tempfile.mkdtemp(prefix="swe-dapo-eval-")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report = trio.run(run_evaluation, args)
    summary = {k: v for k, v in report.items() if k != "per_task"}
    print(f"report: {Path(args.out) / 'report.json'}\nviewer: {Path(args.out) / 'viewer' / 'index.html'}", file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
