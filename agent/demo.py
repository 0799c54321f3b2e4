"""The embedded-default demo (`make demo`) until the tiny policy ships: the whole rollout path, for real.

1. generates held-out toy tasks (small Python repositories with a seeded bug each);
2. starts `sandboxd serve` in its own process (ns runtime, private Unix socket);
3. starts an OpenAI-compatible endpoint serving the oracle policy (the fake server, over loopback HTTP);
4. runs G rollouts per task through the scheduler: fork a snapshot, token-exact episodes with the tool
   scaffold, restore, SWE-bench grading; then a second pass with a policy that never edits, as the
   baseline;
5. prints a table, the daemon's restore/exec latencies, and writes the HTML trajectory viewer.

`python -m learner.run` replaces this once the tiny policy it starts from is shipped.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import trio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)


async def _run(workdir: Path, daemon_address: str, n_tasks: int, group: int) -> dict:
    from sandboxd.client import connect

    from .fake_llm.server import FakeLLM, open_fake_server
    from .fakes import tiny_tokenizer
    from .grading import grade
    from .llm import LLMClient
    from .oracle import OraclePolicy
    from .scaffold import EpisodeConfig
    from .scheduler import Scheduler, SchedulerConfig
    from .toy import generate_suite
    from .viewer import EpisodeView, write_viewer

    tasks = [t for t in generate_suite(2026, 8, n_tasks, workdir / "toy", python="python3") if t.split == "heldout"]
    tokenizer = tiny_tokenizer()
    decode = lambda ids: tokenizer.decode(ids)  # noqa: E731
    results: dict = {}
    async with connect(daemon_address) as node:
        for label, policy in (("oracle", OraclePolicy(tasks, tokenizer)),
                              ("no-fix policy", OraclePolicy(tasks, tokenizer, noise=0.999, seed=1))):
            fake = FakeLLM(policy, model="oracle", decode=decode)
            async with open_fake_server(fake) as url, LLMClient([url], model="oracle") as llm:
                done: list = []
                with Progress(TextColumn(f"[bold]{label:16s}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[solved]}"),
                              TimeElapsedColumn(), console=console) as progress:
                    bar = progress.add_task(label, total=len(tasks) * group, solved="")

                    def on_result(result, bar=bar, progress=progress, done=done) -> None:
                        done.append(result)
                        solved = sum(bool(r.trajectory.resolved) for r in done)
                        progress.update(bar, advance=1, solved=f"solved {solved}/{len(done)}")

                    sched = Scheduler([node], llm, tokenizer, grade,
                                      SchedulerConfig(max_episodes=32, node_capacity=32, grade_timeout_s=120,
                                                      episode=EpisodeConfig(max_turns=8, max_context_tokens=8192)),
                                      on_result=on_result)
                    t0 = time.perf_counter()
                    groups = await sched.run_groups([(t, group, f"{label}/{t.id}") for t in tasks])
                    elapsed = time.perf_counter() - t0
            trajs = [r.trajectory for g in groups for r in g]
            results[label] = {
                "episodes": len(trajs),
                "solve_rate": sum(bool(t.resolved) for t in trajs) / len(trajs),
                "mean_turns": sum(len(t.turns) for t in trajs) / len(trajs),
                "episodes_per_min": len(trajs) / elapsed * 60,
                "errors": sum(t.finish_reason == "error" for t in trajs),
            }
            if label == "oracle":
                by_id = {t.id: t for t in tasks}
                index = write_viewer(workdir / "viewer", [EpisodeView(r.trajectory, by_id[r.trajectory.task_id], r.grade, label)
                                                          for g in groups for r in g], decode, title="Held-out toy episodes")
                results["viewer"] = str(index)
        stats = await node.stats()
    results["daemon"] = {name: {"count": h["count"], "p50_ms": h["p50_ms"], "p99_ms": h["p99_ms"]}
                         for name, h in stats["latency"].items() if name in ("sandbox.restore", "sandbox.exec", "sandbox.fork")}
    return results


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("make demo runs sandboxes with namespaces and cgroups: run it as root")
    n_tasks, group = 8, 4
    out = Path(os.environ.get("SWE_DAPO_DEMO_DIR") or tempfile.mkdtemp(prefix="swe-dapo-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]swe-dapo demo[/]: {n_tasks} held-out toy tasks x {group} rollouts, sandboxd + oracle endpoint; output in {out}")
    from sandboxd.launch import start_daemon

    daemon = start_daemon(str(out / "state"), [f"unix:{out / 'sandboxd.sock'}"], log_level="WARNING",
                          die_with_parent=True, timeout_s=60)
    try:
        results = trio.run(_run, out, daemon.addresses[0], n_tasks, group)
    finally:
        daemon.stop()
    table = Table(title="Rollouts on held-out toy tasks (real sandboxes, SWE-bench grading)")
    for col in ("policy", "episodes", "solve rate", "mean turns", "episodes/min", "errors"):
        table.add_column(col)
    for label in ("oracle", "no-fix policy"):
        r = results[label]
        table.add_row(label, str(r["episodes"]), f"{r['solve_rate']:.0%}", f"{r['mean_turns']:.1f}",
                      f"{r['episodes_per_min']:.0f}", str(r["errors"]))
    console.print(table)
    lat = Table(title="sandboxd latencies (daemon histograms, bucket upper bounds)")
    for col in ("call", "count", "p50 ms", "p99 ms"):
        lat.add_column(col)
    for name, h in results["daemon"].items():
        lat.add_row(name, str(h["count"]), str(h["p50_ms"]), str(h["p99_ms"]))
    console.print(lat)
    console.print(f"Trajectory viewer: {results['viewer']}")
    console.print("Training (RFT then DAPO, python -m learner.run) replaces this demo once the tiny policy it starts "
                  "from is shipped (scripts/make_tiny_policy.py).")
    print(json.dumps({"demo": "rollouts", **{k: v for k, v in results.items() if k in ("oracle", "no-fix policy")}}))


if __name__ == "__main__":
    main()
