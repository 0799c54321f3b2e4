"""ShardedScheduler: episodes over worker processes, each with its own trio loop and Scheduler; the
same results as one process, exactly once each, and a lost worker's episodes rerun elsewhere."""

from __future__ import annotations

import dataclasses
import functools
import os
import signal

import pytest
import trio

from agent.fakes import FakeNode, ScriptedPolicy
from agent.scheduler import Scheduler, SchedulerConfig, ShardedScheduler
from runtime.records import FinishReason, Task
from tests.agent import test_scheduler as one_process
from tests.agent.test_scheduler import FIX

FACTORY = f"{__name__}:make_scheduler"
DEADLINE_S = 120  # a lost episode fails the test instead of hanging it


async def patch_grader(task, patch, workspace, *, timeout_s):
    if task.id == "doomed":  # the worker process dies, as one killed by the OOM killer would
        os._exit(3)
    return await one_process.patch_grader(task, patch, workspace, timeout_s=timeout_s)


def task(i: int = 0, task_id: str | None = None) -> Task:
    t = one_process.task(i)
    return dataclasses.replace(t, id=task_id) if task_id else t


def make_scheduler(shard: int, shards: int, *, latency_s: float = 0.0) -> Scheduler:
    """The factory the workers call (by name: "tests.agent.test_scheduler_shards:make_scheduler")."""
    from agent.fakes import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    return Scheduler([FakeNode(f"s{shard}n0"), FakeNode(f"s{shard}n1")], ScriptedPolicy(tokenizer, FIX, latency_s=latency_s),
                     tokenizer, patch_grader, SchedulerConfig(node_capacity=64))


def broken_factory(shard: int, shards: int) -> Scheduler:
    raise LookupError(f"no sandbox nodes for shard {shard}")


def not_a_scheduler(shard: int, shards: int) -> object:
    return object()


def summary(result):
    t = result.trajectory
    return (t.episode_id, t.group_id, t.finish_reason, t.resolved, t.reward, t.prompt_ids,
            [(x.action_ids, x.action_logprobs, x.observation_ids, x.tool) for x in t.turns], t.patch, result.grade)


async def test_sharded_results_equal_one_process_and_each_arrives_once(tiny_tokenizer):
    groups = [(task(i), 3, f"g{i}") for i in range(8)]
    local = await make_scheduler(0, 1).run_groups(groups, policy_version=2)
    seen = []

    async def on_result(result):  # awaited, in this process
        await trio.lowlevel.checkpoint()
        seen.append(result.trajectory.episode_id)

    with trio.fail_after(DEADLINE_S):
        async with ShardedScheduler(FACTORY, 2, on_result=on_result) as sched:
            sharded = await sched.run_groups(groups, policy_version=2)
            stats = sched.stats()
            again = await sched.run_group(task(9), 2, group_id="again")
    assert [[summary(r) for r in g] for g in sharded] == [[summary(r) for r in g] for g in local]
    assert all(r.trajectory.resolved and r.trajectory.policy_version == 2 and r.attempts == 1 for g in sharded for r in g)
    assert sorted(seen) == sorted([f"g{i}/{j}" for i in range(8) for j in range(3)] + ["again/0", "again/1"])
    assert [r.trajectory.episode_id for r in again] == ["again/0", "again/1"]
    assert stats["finished"] == 24 and stats["resolved"] == 24 and stats["running"] == 0
    # groups spread over both workers, each group whole in one (its rollouts fork one snapshot there)
    assert [w["finished"] for w in stats["workers"].values()] == [12, 12]
    assert [w["environments"] for w in stats["workers"].values()] == [4, 4]  # one per group, on one node
    assert stats["workers_lost"] == 0 and all(w["alive"] for w in stats["workers"].values())


async def test_a_killed_worker_is_replaced_and_its_episodes_rerun_exactly_once():
    finished: list[str] = []
    with trio.fail_after(DEADLINE_S):
        async with ShardedScheduler(FACTORY, 2, factory_kwargs={"latency_s": 0.3},
                                    on_result=lambda r: finished.append(r.trajectory.episode_id)) as sched:
            victim = sched.stats()["workers"][0]["pid"]

            async def kill_soon():
                await trio.sleep(0.4)  # mid-episode: each has 3 turns of 0.3 s
                os.kill(victim, signal.SIGKILL)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(kill_soon)
                groups = await sched.run_groups([(task(i), 4, f"g{i}") for i in range(6)])
            stats = sched.stats()
    requested = {f"g{i}/{j}" for i in range(6) for j in range(4)}
    assert len(finished) == len(requested) and set(finished) == requested  # exactly once each
    results = [r for g in groups for r in g]
    assert [r.trajectory.episode_id for r in results] == [f"g{i}/{j}" for i in range(6) for j in range(4)]
    assert all(r.error is None and r.trajectory.resolved for r in results)
    assert stats["workers_lost"] == 1 and stats["requeued"] == 12
    assert sorted(r.attempts for r in results) == [1] * 12 + [2] * 12  # the victim's half ran twice
    assert stats["workers"][0]["pid"] != victim and all(w["alive"] for w in stats["workers"].values())


async def test_an_episode_that_kills_every_worker_ends_in_error_after_max_attempts():
    with trio.fail_after(DEADLINE_S):
        async with ShardedScheduler(FACTORY, 2, max_attempts=2) as sched:
            doomed = await sched.run_group(task(task_id="doomed"), 3, group_id="d")
            assert sched.counters["workers_lost"] == 2 and sched.counters["errors"] == 3
            fine = await sched.run_group(task(1), 2, group_id="ok")  # the pool still serves
    assert [r.trajectory.episode_id for r in doomed] == ["d/0", "d/1", "d/2"]
    assert all(r.trajectory.finish_reason == FinishReason.ERROR and r.attempts == 2 for r in doomed)
    assert all(r.error.startswith("ShardWorkerLost") for r in doomed)
    assert all(r.trajectory.resolved and r.error is None for r in fine)


async def test_a_factory_that_fails_is_reported_at_start():
    with pytest.raises(RuntimeError, match="no sandbox nodes for shard"):
        async with ShardedScheduler(f"{__name__}:broken_factory", 2):
            pass
    with pytest.raises(RuntimeError, match="must give a Scheduler"):
        async with ShardedScheduler(f"{__name__}:not_a_scheduler", 1):
            pass


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="ShardedScheduler.factory"):
        ShardedScheduler("no_colon_here", 2)
    with pytest.raises(ValueError, match="ShardedScheduler.factory"):
        ShardedScheduler(lambda shard, shards: None, 2)
    with pytest.raises(ValueError, match="ShardedScheduler.workers"):
        ShardedScheduler(FACTORY, 0)
    with pytest.raises(ValueError, match="ShardedScheduler.max_attempts"):
        ShardedScheduler(FACTORY, 1, max_attempts=0)
    with pytest.raises(ValueError, match="ShardedScheduler.factory_kwargs"):
        ShardedScheduler(FACTORY, 1, factory_kwargs={"f": lambda: None})


async def test_run_groups_outside_the_context_is_an_error():
    with pytest.raises(RuntimeError, match="not open"):
        await ShardedScheduler(FACTORY, 1).run_groups([(task(0), 1, "g")])


async def test_a_worker_whose_parent_is_gone_stops_at_once():
    """End of file without ("close",) on its stdin: the worker cancels its episodes and exits."""
    with trio.fail_after(DEADLINE_S):
        async with ShardedScheduler(FACTORY, 1, factory_kwargs={"latency_s": 30.0}, max_respawns=0) as sched:
            worker = sched._workers[0]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(sched.run_group, task(0), 2, group_id="g"))
                await trio.sleep(0.5)
                await worker.process.stdin.aclose()  # as if this process had been killed
                with trio.fail_after(10):  # not the 90 s its episodes would take
                    await worker.process.wait()
            assert sched.counters["workers_lost"] == 1 and sched.counters["errors"] == 2


async def test_results_cross_packed_and_come_back_equal(tiny_tokenizer):
    """What a worker sends (`_pack_result`, pickled) is rebuilt in the parent equal field for field."""
    import pickle

    from agent.scheduler import RolloutResult, _pack_result, _unpack_result
    from runtime.records import Turn

    results = await make_scheduler(0, 1).run_group(task(0), 2, group_id="g")
    error = RolloutResult(dataclasses.replace(results[0].trajectory, turns=[], finish_reason=FinishReason.ERROR,
                                              resolved=None, metrics={"error": 1.0}), None, 3, "EndpointDown: x")
    odd = dataclasses.replace(results[1].trajectory.turns[0], action_logprobs=[-1e-30] * len(results[1].trajectory.turns[0].action_ids),
                              format_error=True, tool="")
    mixed = RolloutResult(dataclasses.replace(results[1].trajectory, turns=[odd, *results[1].trajectory.turns]),
                          {"resolved": True, "tests": {"a": "PASSED"}}, 2)
    for result in [*results, error, mixed]:
        packed = _pack_result(result)
        assert type(packed) is tuple
        back = _unpack_result(pickle.loads(pickle.dumps(packed)))
        assert back == result
        assert back.trajectory.token_ids() == result.trajectory.token_ids()
        assert all(type(t) is Turn for t in back.trajectory.turns)

    class Marked(RolloutResult):
        pass

    subclassed = Marked(results[0].trajectory, None, 1)
    assert _pack_result(subclassed) is subclassed  # sent as it is
