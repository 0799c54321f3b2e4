"""The scheduler: groups of rollouts over nodes and endpoints, failures requeued, nothing lost or
duplicated; and one end-to-end run on real ns sandboxes."""

from __future__ import annotations

import dataclasses
import gc
import os
import weakref
from dataclasses import dataclass

import pytest
import trio

from agent.fakes import FakeNode, ScriptedPolicy, fake_latency
from agent.scaffold import EpisodeConfig, build_prompt_ids
from agent.scheduler import Scheduler, SchedulerConfig, relaxed_gc
from runtime.records import FinishReason, Task

FIX = [
    "<function=view>\n<parameter=path>pkg/calc.py</parameter>\n</function>",
    "<function=str_replace>\n<parameter=path>pkg/calc.py</parameter>\n<parameter=old>a - b</parameter>\n"
    "<parameter=new>a + b</parameter>\n</function>",
    "<function=submit>\n</function>",
]


@dataclass
class Report:
    resolved: bool

    def to_dict(self):
        return {"resolved": self.resolved}


async def patch_grader(task, patch, workspace, *, timeout_s):
    """Resolved when the patch makes add() add (checked on the patch text: fake sandboxes run nothing)."""
    return Report("+    return a + b" in patch)


def task(i: int = 0, repo: str = "toy/calc") -> Task:
    return Task(id=f"calc-{i}", repo=repo, base_commit="HEAD", problem_statement="add() subtracts.", image="host",
                test_patch="", FAIL_TO_PASS=["test_add"], PASS_TO_PASS=[], test_command="true", log_parser="pytest")


async def test_groups_run_and_are_graded(tiny_tokenizer):
    nodes = [FakeNode("n0"), FakeNode("n1")]
    seen = []
    sched = Scheduler(nodes, ScriptedPolicy(tiny_tokenizer, FIX), tiny_tokenizer, patch_grader,
                      SchedulerConfig(node_capacity=8), on_result=seen.append)
    groups = await sched.run_groups([(task(i), 4, f"g{i}") for i in range(6)], policy_version=3)
    assert [len(g) for g in groups] == [4] * 6
    trajs = [r.trajectory for g in groups for r in g]
    assert all(t.resolved and t.reward == 1.0 and t.finish_reason == FinishReason.SUBMITTED for t in trajs)
    assert all(t.policy_version == 3 for t in trajs)
    assert [r.trajectory.episode_id for r in groups[2]] == ["g2/0", "g2/1", "g2/2", "g2/3"]
    assert len(seen) == 24 and sched.counters["finished"] == 24 and sched.counters["resolved"] == 24
    # G rollouts of a task fork one snapshot: one create per task (its group is placed on one node),
    # one fork per rollout; the groups are spread over the nodes by load, 3 each.
    assert [n.created for n in nodes] == [3 + 3 * 4, 3 + 3 * 4]
    assert sched.counters["environments"] == 6 and all(n.placed == 0 for n in sched.nodes)
    assert all(not n.sandboxes and not n.snapshots for n in nodes)  # everything cleaned up


async def test_node_killed_and_endpoint_failures_lose_and_duplicate_nothing(tiny_tokenizer, autojump_clock):
    nodes = [FakeNode("n0", latency_s=0.01), FakeNode("n1", latency_s=0.01), FakeNode("n2", latency_s=0.01)]
    policy = ScriptedPolicy(tiny_tokenizer, FIX, endpoints=["e0", "e1"], failure_rate=0.10, latency_s=0.05, seed=7)
    finished: list[str] = []
    sched = Scheduler(nodes, policy, tiny_tokenizer, patch_grader,
                      SchedulerConfig(node_capacity=16, max_attempts=6),
                      on_result=lambda r: finished.append(r.trajectory.episode_id))

    async def kill_later():
        await trio.sleep(0.3)
        nodes[0].kill()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(kill_later)
        groups = await sched.run_groups([(task(i), 8, f"g{i}") for i in range(25)])
    requested = {f"g{i}/{j}" for i in range(25) for j in range(8)}
    assert len(finished) == len(requested) and set(finished) == requested  # exactly once each
    assert sched.counters["retried"] > 0 and nodes[0].dead
    trajs = [r.trajectory for g in groups for r in g]
    ok = [t for t in trajs if t.finish_reason != FinishReason.ERROR]
    assert len(ok) >= 0.95 * len(trajs) and all(t.resolved for t in ok)
    assert not nodes[1].sandboxes and not nodes[2].sandboxes
    # Groups were placed on all three nodes; every placement was given back, the dead node's included.
    assert all(n.created > 0 for n in nodes)
    assert [node["placed"] for node in sched.stats()["nodes"].values()] == [0, 0, 0]
    assert sched.counters["environments"] >= 25


async def test_a_bug_in_one_episode_does_not_take_the_batch_down(tiny_tokenizer):
    async def broken_grader(task, patch, workspace, *, timeout_s):
        if task.id == "calc-1":
            raise KeyError("bug in the grader")
        return Report(True)

    sched = Scheduler([FakeNode("n0")], ScriptedPolicy(tiny_tokenizer, FIX), tiny_tokenizer, broken_grader)
    groups = await sched.run_groups([(task(i), 2, f"g{i}") for i in range(3)])
    assert [r.trajectory.finish_reason for r in groups[1]] == [FinishReason.ERROR] * 2
    assert "KeyError" in groups[1][0].error
    assert all(r.trajectory.resolved for i in (0, 2) for r in groups[i])


async def test_every_assigned_endpoint_is_released(tiny_tokenizer, autojump_clock):
    # Endpoint failures requeue episodes: each attempt's endpoint is released, the failed ones too.
    policy = ScriptedPolicy(tiny_tokenizer, FIX, endpoints=["e0", "e1"], failure_rate=0.2, latency_s=0.05, seed=3)
    peak = {"e0": 0, "e1": 0}

    async def watching_grader(task, patch, workspace, *, timeout_s):
        for endpoint, n in policy.episodes.items():
            peak[endpoint] = max(peak[endpoint], n)
        return Report("+    return a + b" in patch)

    sched = Scheduler([FakeNode("n0")], policy, tiny_tokenizer, watching_grader,
                      SchedulerConfig(node_capacity=8, max_attempts=8))
    await sched.run_groups([(task(i), 4, f"g{i}") for i in range(10)])
    assert sched.counters["retried"] > 0 and sum(policy.failures.values()) > 0
    assert policy.episodes == {"e0": 0, "e1": 0}
    assert 0 < max(peak.values()) <= 8  # never more than the episodes in flight


async def test_the_tasks_harness_workdir_is_the_sandbox_workdir(tiny_tokenizer):
    node = FakeNode("n0")
    workdirs = []

    async def grader(task, patch, workspace, *, timeout_s):
        workdirs.append(workspace.workdir)
        return Report(True)

    rebench = dataclasses.replace(task(1), metadata={"harness": {"dataset": "swerebench-v2", "workdir": "/calc"}})
    sched = Scheduler([node], ScriptedPolicy(tiny_tokenizer, FIX), tiny_tokenizer, grader)
    [[plain], [moved]] = await sched.run_groups([(task(0), 1, "g0"), (rebench, 1, "g1")])
    assert sorted(workdirs) == ["/calc", "/testbed"]
    prompt = tiny_tokenizer.decode(moved.trajectory.prompt_ids)
    assert "/calc" in prompt and "/testbed" not in prompt  # the model is told where the repository is
    assert "/testbed" in tiny_tokenizer.decode(plain.trajectory.prompt_ids)


async def test_gc_is_relaxed_while_rollouts_run_and_restored_after(tiny_tokenizer):
    before = gc.get_threshold()
    seen = []

    async def grader(task, patch, workspace, *, timeout_s):
        seen.append(gc.get_threshold()[0])
        return Report(True)

    sched = Scheduler([FakeNode("n0")], ScriptedPolicy(tiny_tokenizer, FIX), tiny_tokenizer, grader,
                      SchedulerConfig(gc_threshold=123_456))
    await sched.run_groups([(task(i), 2, f"g{i}") for i in range(3)])
    assert seen == [max(123_456, before[0])] * 6 and gc.get_threshold() == before
    off = Scheduler([FakeNode("n0")], ScriptedPolicy(tiny_tokenizer, FIX), tiny_tokenizer, grader,
                    SchedulerConfig(gc_threshold=0))
    await off.run_group(task(0), 1, group_id="g")
    assert seen[-1] == before[0]
    with relaxed_gc(200_000):  # nested: the outer block's setting holds until it ends
        with relaxed_gc(150_000):
            pass
        assert gc.get_threshold()[0] == max(200_000, before[0])
    assert gc.get_threshold() == before


def test_relaxed_gc_promotes_what_it_leaves_alive_unscanned_and_cycles_are_still_collected():
    class Node:
        pass

    gc.collect()
    collected: list[int] = []
    with relaxed_gc(1_000_000):
        kept = [[i] for i in range(1000)]  # results on their way to the caller
        cycle = Node()
        cycle.self = cycle
        weak = weakref.ref(cycle)
        del cycle
        gc.callbacks.append(seen := lambda phase, info: collected.append(info["generation"]) if phase == "stop" else None)
    try:
        # Ending did not scan them young (no collection ran); they went to the oldest generation.
        assert collected == [] and gc.get_count()[0] < 10 and gc.get_freeze_count() == 0
        assert gc.is_tracked(kept[0]) and any(o is kept[0] for o in gc.get_objects(generation=2))
    finally:
        gc.callbacks.remove(seen)
    assert weak() is not None  # the cycle waits for a full collection, which finds it
    gc.collect()
    assert weak() is None
    # Something frozen before the block stays frozen: it is not handed back to the collector.
    frozen = [[0]]
    gc.freeze()
    try:
        count = gc.get_freeze_count()
        with relaxed_gc(1_000_000):
            pass
        assert gc.get_freeze_count() == count
    finally:
        gc.unfreeze()
    del frozen


@dataclass
class Encoding:
    ids: list


class RecordingBackend:
    """A fast tokenizer's Rust backend that records each batch encode (its size, whether in the main
    thread), fails on texts holding `fail_on`, and encodes texts holding `skew_on` differently alone
    than inside a whole prompt (an extra id 0 in front): cutting prompts is then not exact."""

    def __init__(self, backend, fail_on: str | None = None, skew_on: str | None = None) -> None:
        self.backend, self.fail_on, self.skew_on, self.batches = backend, fail_on, skew_on, []

    def encode_batch(self, texts, **kwargs):
        import threading

        self.batches.append((len(texts), threading.current_thread() is threading.main_thread()))
        if self.fail_on is not None and any(self.fail_on in t for t in texts):
            raise ValueError("the backend cannot encode this task")
        out = self.backend.encode_batch(texts, **kwargs)
        if self.skew_on is None:
            return out
        return [Encoding([0, *e.ids]) if self.skew_on in t and not t.startswith("<|im_start|>system") else e
                for t, e in zip(texts, out)]

    def __getattr__(self, name):
        return getattr(self.backend, name)


class RecordingTokenizer:
    def __init__(self, tokenizer, fail_on: str | None = None, skew_on: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.backend_tokenizer = RecordingBackend(tokenizer.backend_tokenizer, fail_on, skew_on)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


async def test_prompts_are_encoded_once_per_task_in_chunks_off_the_event_loop(tiny_tokenizer):
    import agent.scheduler as scheduler_module

    tokenizer = RecordingTokenizer(tiny_tokenizer)
    sched = Scheduler([FakeNode("n0"), FakeNode("n1")], ScriptedPolicy(tiny_tokenizer, FIX), tokenizer, patch_grader)
    n_tasks = scheduler_module._PROMPT_CHUNK + 5
    assert sched._prompt_encoder.prefix  # the system message is encoded once, the rest per task
    batches = tokenizer.backend_tokenizer.batches
    batches.clear()  # (the encoder's probes, when the scheduler was built)
    groups = await sched.run_groups([(task(i), 3, f"g{i}") for i in range(n_tasks)])
    # Each task once, in chunks, after the cut is checked again on the batch's first prompt (two encodes).
    assert sorted(n for n, _ in batches) == [1, 1, 5, scheduler_module._PROMPT_CHUNK]
    assert not any(on_main for _, on_main in batches)  # in a worker thread, never in the loop
    for i, group in enumerate(groups):
        assert [r.trajectory.prompt_ids for r in group] == [build_prompt_ids(tiny_tokenizer, task(i), "/testbed")] * 3
    assert all(r.trajectory.resolved for g in groups for r in g)
    await sched.run_group(task(0), 2, group_id="again")  # cached: nothing encoded again
    assert len(batches) == 4 and not sched._prompts_pending


async def test_prompts_are_encoded_whole_once_cutting_them_proves_inexact(tiny_tokenizer):
    tokenizer = RecordingTokenizer(tiny_tokenizer, skew_on="subtracts")  # the probes pass, the tasks do not
    sched = Scheduler([FakeNode("n0")], ScriptedPolicy(tiny_tokenizer, FIX), tokenizer, patch_grader)
    assert sched._prompt_encoder.prefix
    groups = await sched.run_groups([(task(i), 2, f"g{i}") for i in range(3)])
    assert sched._prompt_encoder.prefix == ""  # the batch's first prompt showed it
    for i, group in enumerate(groups):
        assert [r.trajectory.prompt_ids for r in group] == [build_prompt_ids(tiny_tokenizer, task(i), "/testbed")] * 2


async def test_a_prompt_that_cannot_be_encoded_fails_its_episodes_and_a_cancelled_batch_leaves_nothing_waiting(
        tiny_tokenizer):
    tokenizer = RecordingTokenizer(tiny_tokenizer, fail_on="task number 1.")
    tasks = [dataclasses.replace(task(i), problem_statement=f"add() subtracts, task number {i}.") for i in range(3)]
    sched = Scheduler([FakeNode("n0")], ScriptedPolicy(tiny_tokenizer, FIX), tokenizer, patch_grader)
    with trio.fail_after(30):
        groups = await sched.run_groups([(t, 2, f"g{i}") for i, t in enumerate(tasks)])
    # The chunk holding task 1 failed: the other tasks' episodes encoded their own prompts and ran.
    assert [[r.error is None for r in g] for g in groups] == [[True, True], [False, False], [True, True]]
    assert all("cannot encode" in r.error and r.trajectory.finish_reason == FinishReason.ERROR for r in groups[1])
    assert all(r.trajectory.resolved for i in (0, 2) for r in groups[i])
    assert not sched._prompts_pending

    fresh = Scheduler([FakeNode("n0")], ScriptedPolicy(tiny_tokenizer, FIX, latency_s=1.0), tiny_tokenizer, patch_grader)
    with trio.move_on_after(0.01):  # cancelled while prompts are being encoded or episodes sample
        await fresh.run_groups([(task(i), 2, f"g{i}") for i in range(40)])
    assert not fresh._prompts_pending  # no event left that nobody will set
    fresh.policy.latency_s = 0.0
    with trio.fail_after(30):
        again = await fresh.run_groups([(task(i), 1, f"h{i}") for i in range(40)])
    assert all(r.error is None and r.trajectory.resolved for g in again for r in g)


async def test_fake_latency_wakes_each_sleeper_at_its_time(autojump_clock):
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await fake_latency(seconds)
        woke.append((name, trio.current_time()))

    async with trio.open_nursery() as nursery:
        for name, seconds in (("c", 3.0), ("a", 1.0), ("b", 2.0), ("z", 0.0)):
            nursery.start_soon(sleeper, name, seconds)
        with trio.move_on_after(1.5):  # a cancelled sleeper leaves, and the others still wake
            await fake_latency(10.0)
        await trio.sleep(0.25)
        nursery.start_soon(sleeper, "d", 0.5)  # an earlier deadline than the one the alarm waits for
    assert woke == [("z", 0.0), ("a", 1.0), ("b", 2.0), ("d", 2.25), ("c", 3.0)]


@pytest.mark.skipif(os.geteuid() != 0, reason="ns sandboxes need root")
async def test_end_to_end_on_ns_sandboxes(tiny_tokenizer, toy_repo):
    from sandboxd.client import open_local

    repo, commit = toy_repo

    async def run_check(task, patch, workspace, *, timeout_s):
        applied = await workspace.exec(["git", "apply", "-"], stdin=patch.encode(), timeout_s=30)
        check = await workspace.exec(["python3", "-c", "from pkg.calc import add; assert add(2, 3) == 5"], timeout_s=30)
        return Report(applied.exit_code == 0 and check.exit_code == 0)

    async with open_local("ns") as node:
        sched = Scheduler([node], ScriptedPolicy(tiny_tokenizer, FIX), tiny_tokenizer, run_check,
                          SchedulerConfig(episode=EpisodeConfig(max_turns=5)))
        results = await sched.run_group(task(0, str(repo)), 3, group_id="real")
        assert [r.trajectory.resolved for r in results] == [True, True, True]
        assert all("+    return a + b" in r.trajectory.patch for r in results)
        stats = await node.stats()
        assert stats["runtime"]["sandboxes"] == 0 and stats["runtime"]["snapshots"] == 0


async def test_nodes_join_and_drain_while_groups_run(tiny_tokenizer):
    """Membership changes (agent.discovery): a drained node gets no new episode, a new one takes work."""
    from agent.discovery import Membership

    n0, n1 = FakeNode("n0"), FakeNode("n1")
    sched = Scheduler([n0], ScriptedPolicy(tiny_tokenizer, FIX), tiny_tokenizer, patch_grader,
                      SchedulerConfig(node_capacity=8))
    send, receive = trio.open_memory_channel(4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sched.follow, receive)
        await send.send(Membership(added=[n1], removed=[n0]))
        while not any(n.name == "n1" for n in sched.nodes):
            await trio.sleep(0)
        before = n0.created
        groups = await sched.run_groups([(task(i), 2, f"g{i}") for i in range(3)])
        nursery.cancel_scope.cancel()
    assert all(r.trajectory.resolved for g in groups for r in g)
    assert n0.created == before and n1.created > 0  # nothing new on the drained node
    assert sched.stats()["nodes"]["n0"]["draining"] is True
    assert sched.drain_node("nope") is False
    sched.add_node(n0)  # back again: taken back, not duplicated
    assert [n.name for n in sched.nodes] == ["n0", "n1"] and not sched.nodes[0].draining


async def test_a_node_that_restarted_and_forgot_its_snapshots_requeues_not_errors(tiny_tokenizer):
    """After `sandboxd serve` restarts, the scheduler's snapshot ids are unknown there (NotFound):
    that is the node's loss, retried from the start, not the episode's error."""
    node = FakeNode("n0")
    forget = {"done": False}
    fork = node.fork

    async def fork_after_restart(snapshot, **kwargs):
        if not forget["done"]:
            forget["done"] = True
            node.snapshots.clear()  # the restarted daemon swept what its predecessor made
        return await fork(snapshot, **kwargs)

    node.fork = fork_after_restart
    sched = Scheduler([node], ScriptedPolicy(tiny_tokenizer, FIX), tiny_tokenizer, patch_grader,
                      SchedulerConfig(node_capacity=4))
    [group] = await sched.run_groups([(task(0), 1, "g0")])
    assert group[0].trajectory.resolved and group[0].attempts == 2 and sched.counters["retried"] == 1
