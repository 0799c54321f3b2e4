"""Smoke demo of the foundation, run by `make demo` until the learner exists.

It starts a wire server in its own process on a private Unix socket, calls it from many concurrent
trio tasks over one connection (plain calls, a streaming call, typed errors, a deadline), writes the
episodes it "ran" to a trajectory store and reads them back, and prints what it measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from rich.console import Console
from rich.table import Table

from .records import FinishReason, Trajectory, Turn
from .store import TrajectoryStore
from .wire import NotFound, Router, RpcTimeout, WireServer, open_client

console = Console()


def _router() -> Router:
    router = Router()

    @router.method("episode.step")
    def step(ctx, *, episode: int, turn: int) -> dict:
        # Stands in for a policy turn: a few "token ids" and their logprobs.
        ids = [(episode * 31 + turn * 7 + k) % 1000 for k in range(8)]
        return {"ids": ids, "logprobs": [-0.5] * len(ids)}

    @router.method("episode.run_tests")
    async def run_tests(ctx, *, episode: int) -> dict:
        for name in ("test_a", "test_b", "test_c"):
            await ctx.notify("log", f"{name} PASSED")
        return {"resolved": episode % 3 != 0}

    @router.method("slow")
    async def slow(ctx) -> None:
        await trio.sleep(60)

    return router


async def _serve(address: str) -> None:
    server = WireServer(_router(), name="demo")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, [address])
        print("ready", flush=True)


async def _drive(address: str, store_dir: Path, episodes: int, turns: int) -> dict:
    results: dict = {}
    async with open_client(address, call_timeout_s=30) as client:
        t0 = time.perf_counter()
        trajectories: list[Trajectory] = []

        async def episode(i: int) -> None:
            turn_records = []
            for t in range(turns):
                out = await client.call("episode.step", {"episode": i, "turn": t})
                turn_records.append(Turn(action_ids=out["ids"], action_logprobs=out["logprobs"], observation_ids=[1, 2, 3]))
            async with client.stream("episode.run_tests", {"episode": i}) as call:
                logs = [note.data async for note in call]
            trajectories.append(Trajectory(
                episode_id=f"demo-{i}", task_id=f"task-{i % 16}", group_id=f"group-{i % 16}", prompt_ids=[0, 1, 2],
                turns=turn_records, reward=float(call.result["resolved"]), finish_reason=FinishReason.SUBMITTED,
                policy_version=0, endpoint=address, metrics={"log_lines": float(len(logs))},
            ))

        async with trio.open_nursery() as nursery:
            for i in range(episodes):
                nursery.start_soon(episode, i)
        elapsed = time.perf_counter() - t0
        results["episodes"] = episodes
        results["calls"] = episodes * (turns + 1)
        results["calls_per_s"] = round(results["calls"] / elapsed)

        try:
            await client.call("no.such.method")
        except NotFound as exc:
            results["unknown_method"] = f"NotFound: {exc}"
        try:
            await client.call("slow", timeout_s=0.2)
        except RpcTimeout as exc:
            results["deadline"] = f"RpcTimeout: {exc}"

    with TrajectoryStore.open_writer(store_dir) as writer:
        for traj in trajectories:
            writer.append(traj)
    back = list(TrajectoryStore.read(store_dir))
    assert sorted(t.episode_id for t in back) == sorted(t.episode_id for t in trajectories)
    results["stored"] = len(back)
    results["solve_rate"] = round(sum(t.reward for t in back) / len(back), 3)
    return results


def main() -> None:
    episodes, turns = 256, 20
    with tempfile.TemporaryDirectory(prefix="swe-dapo-demo-") as tmp:
        address = f"unix:{os.path.join(tmp, 'demo.sock')}"
        console.print(f"[bold]swe-dapo foundation demo[/]: wire server in its own process on {address}")
        proc = subprocess.Popen([sys.executable, "-m", "runtime.demo", "--serve", address], stdout=subprocess.PIPE, text=True)
        try:
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit("demo server did not start")
            results = trio.run(_drive, address, Path(tmp) / "trajectories", episodes, turns)
        finally:
            proc.terminate()
            proc.wait(10)
    table = Table(title=f"{episodes} concurrent episodes x {turns} turns over one connection")
    table.add_column("what")
    table.add_column("result")
    for key, value in results.items():
        table.add_row(key, str(value))
    console.print(table)
    console.print("The learner (python -m learner.run) replaces this demo once it exists.")
    print(json.dumps({"demo": "foundation", **{k: v for k, v in results.items() if isinstance(v, (int, float))}}))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        trio.run(_serve, sys.argv[2])
    else:
        main()
