"""The episode scheduler: thousands of episodes in flight over sandbox nodes and policy endpoints.

A *group* is G rollouts of one task (DAPO's group for advantages). For each group the scheduler builds
the task's environment once on a node (create + snapshot), forks one sandbox per rollout from the
snapshot (G rollouts share one image's layers), runs the episode, restores the sandbox to the snapshot
(milliseconds) and grades the model's patch in it, then destroys it.

Bounds: sandboxes per node (`node_capacity`), episodes in flight overall (`max_episodes`), and the
sampler's own per-endpoint in-flight limit. An episode is assigned its endpoint once it has its
sandbox, and releases it (`release_endpoint`, when the policy has one) when it stops sampling, so the
policy's count of episodes per endpoint, by which it spreads new ones, is of those sampling. Each episode has turn, token and wall-time
limits (`EpisodeConfig`). A lost sandbox node or a dead endpoint requeues the episode from its start, on
another node or endpoint, up to `max_attempts`; after that the episode finishes with `error`. Every
requested episode yields exactly one trajectory: none lost, none duplicated.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from runtime.records import FinishReason, Task, Trajectory
from runtime.wire import ConnectionLost, NotFound, RpcTimeout

from .llm.errors import BadResponse, EndpointDown, RequestTimeout
from .scaffold import ChatFormat, EpisodeConfig, Sampler, Tokenizer, build_prompt_ids, run_episode
from .scaffold.chat import TextCodec

__all__ = ["Grader", "NodeLost", "Policy", "RolloutResult", "Scheduler", "SchedulerConfig", "relaxed_gc", "task_workdir"]

log = logging.getLogger("swe_dapo.scheduler")


class Policy(Protocol):
    """Where turns are sampled: endpoint assignment (episodes stick to one) and a sampler per endpoint.

    A policy may also have ``release_endpoint(endpoint)`` (`agent.llm.LLMClient` has): the scheduler
    calls it once for every `assign_endpoint`, when that episode (or attempt of it) stops sampling.
    """

    def assign_endpoint(self) -> str: ...
    def sampler(self, endpoint: str) -> Sampler: ...
    def report_failure(self, endpoint: str, exc: BaseException) -> None: ...


class Grader(Protocol):
    async def __call__(self, task: Task, patch: str, workspace: Any, *, timeout_s: float) -> Any: ...


class NodeLost(Exception):
    """A sandbox node stopped answering (raised by adapters; `ConnectionLost` is treated the same)."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_episodes: int = 4096  # episodes in flight across all nodes
    node_capacity: int = 256  # sandboxes in flight per node
    max_attempts: int = 3  # an episode lost to infrastructure is retried this many times in all
    grade_timeout_s: float = 900.0
    setup_timeout_s: float = 600.0  # create + snapshot of a task's environment
    episode_workdir: str = "/testbed"  # where the repository is in a sandbox, unless the task says (task_workdir)
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    # CPython's youngest-generation GC threshold while rollouts run (0: leave the process's alone). See
    # `relaxed_gc`: at the default (700) collections took ~40% of the CPU of bench/scheduler.py (c).
    gc_threshold: int = 100_000


@dataclass
class RolloutResult:
    trajectory: Trajectory
    grade: dict[str, Any] | None
    attempts: int
    error: str | None = None  # why the episode finished with `error`


def _is_endpoint_error(exc: BaseException) -> bool:
    """The endpoint failed (down, too slow, answered garbage): retry the episode on another one."""
    return isinstance(exc, (EndpointDown, RequestTimeout, BadResponse))


def _is_lost_sandbox(exc: BaseException) -> bool:
    """The node no longer knows a sandbox or snapshot we made there: it restarted (and swept them)."""
    return isinstance(exc, NotFound) and getattr(exc, "field", None) in ("sandbox", "snapshot")


def _is_infrastructure_error(exc: BaseException) -> bool:
    """Errors that are the infrastructure's, not the model's: the episode is retried elsewhere."""
    return (isinstance(exc, (NodeLost, ConnectionLost, RpcTimeout, OSError)) or _is_endpoint_error(exc)
            or _is_lost_sandbox(exc))


class _Node:
    def __init__(self, client: Any, capacity: int) -> None:
        self.client = client
        self.name = getattr(client, "node", repr(client))
        self.limiter = trio.CapacityLimiter(capacity)
        self.healthy = True
        self.draining = False  # left the membership: its running episodes finish, no new ones start
        self.failures = 0
        self.snapshots: dict[str, str] = {}  # task id -> snapshot of its environment on this node
        self.setup_locks: dict[str, trio.Lock] = {}
        self.users: dict[str, int] = {}  # task id -> groups using its snapshot


RewardFn = Callable[[Task, Trajectory, Any], float]


def task_checkout(task: Task) -> str | None:
    """The directory on the node to copy to /testbed, or None when the image already holds the repo.

    Toy and locally built tasks carry it as ``metadata["repo_path"]`` or as an absolute `repo`; SWE-bench
    style tasks name their repository (``django/django``) and ship it inside their image.
    """
    path = task.metadata.get("repo_path") if task.metadata else None
    if isinstance(path, str) and path:
        return path
    return task.repo if task.repo.startswith("/") else None


def task_workdir(task: Task, default: str = "/testbed") -> str:
    """Where the task's repository is in its sandbox: ``metadata["harness"]["workdir"]`` when the task
    carries one (SWE-rebench-V2 images hold the repository at ``/<repo name>``), else `default`."""
    harness = task.metadata.get("harness") if task.metadata else None
    workdir = harness.get("workdir") if isinstance(harness, dict) else None
    return workdir if isinstance(workdir, str) and workdir.startswith("/") else default


_gc_holders = 0  # rollouts inside `relaxed_gc`, over every scheduler of the process
_gc_saved: tuple[int, int, int] = gc.get_threshold()


@contextmanager
def relaxed_gc(threshold: int) -> Iterator[None]:
    """CPython's youngest-generation GC threshold raised to `threshold` while the block runs.

    Thousands of episodes in flight keep 10^5-10^6 container objects alive (token lists, turns,
    coroutine frames), and at the default threshold (a collection per 700 net allocations) the
    collector keeps promoting them and then scanning them all in full collections: in
    bench/scheduler.py (c), 4,096 episodes x 20 turns, ~740 collections took ~40% of the run's CPU.
    Reference cycles are still collected, only less often. Concurrent and nested blocks share the
    setting; the last one to end restores the process's own. `threshold` <= 0: no change.
    """
    global _gc_holders, _gc_saved
    if threshold <= 0:
        yield
        return
    if _gc_holders == 0:
        _gc_saved = gc.get_threshold()
        gc.set_threshold(max(threshold, _gc_saved[0]), *_gc_saved[1:])
    _gc_holders += 1
    try:
        yield
    finally:
        _gc_holders -= 1
        if _gc_holders == 0:
            gc.set_threshold(*_gc_saved)


def execution_reward(task: Task, trajectory: Trajectory, report: Any) -> float:
    return 1.0 if report is not None and getattr(report, "resolved", False) else 0.0


class Scheduler:
    """Runs groups of rollouts; see the module docstring."""

    def __init__(
        self,
        nodes: Sequence[Any],
        policy: Policy,
        tokenizer: Tokenizer,
        grader: Grader,
        config: SchedulerConfig = SchedulerConfig(),
        *,
        reward_fn: RewardFn = execution_reward,
        on_result: Callable[[RolloutResult], Awaitable[None] | None] | None = None,
        chat: ChatFormat | None = None,
    ) -> None:
        if not nodes:
            raise ValueError("Scheduler needs at least one sandbox node")
        self.nodes = [_Node(n, config.node_capacity) for n in nodes]
        self.policy = policy
        self.tokenizer = tokenizer
        self.chat = chat or ChatFormat.from_tokenizer(tokenizer)
        self.grader = grader
        self.config = config
        self.reward_fn = reward_fn
        self.on_result = on_result
        self.codec = TextCodec(tokenizer)
        self._prompts: dict[str, list[int]] = {}  # task id + workdir -> rendered prompt (shared by its rollouts)
        self._release = getattr(policy, "release_endpoint", None)
        self.episode_limiter = trio.CapacityLimiter(config.max_episodes)
        self.counters: dict[str, int] = {"started": 0, "finished": 0, "retried": 0, "errors": 0, "resolved": 0,
                                         "running": 0}

    # -- nodes ------------------------------------------------------------------------------------

    def _pick_node(self, exclude: set[str]) -> _Node:
        live = [n for n in self.nodes if not n.draining] or self.nodes
        healthy = [n for n in live if n.healthy and n.name not in exclude] or [
            n for n in live if n.name not in exclude] or live
        return min(healthy, key=lambda n: n.limiter.borrowed_tokens / n.limiter.total_tokens)

    def add_node(self, client: Any) -> None:
        """A sandbox node joined (`agent.discovery`): new episodes may start there. A node of the same
        name that was draining is taken back with its new client."""
        name = getattr(client, "node", repr(client))
        for node in self.nodes:
            if node.name == name:
                node.client, node.draining, node.healthy = client, False, True
                node.snapshots.clear()
                node.users.clear()
                return
        self.nodes.append(_Node(client, self.config.node_capacity))
        log.info("sandbox node %s added", name)

    def drain_node(self, name: str) -> bool:
        """A node left: no new episodes start there; those running finish (or requeue if it dies).
        Returns False when no node has that name."""
        for node in self.nodes:
            if node.name == name:
                node.draining = True
                log.info("sandbox node %s draining", name)
                return True
        return False

    async def follow(self, changes: Any) -> None:
        """Apply membership changes (`agent.discovery.NodeSet.changes()`) until cancelled."""
        async for change in changes:
            for client in change.added:
                self.add_node(client)
            for client in change.removed:
                self.drain_node(getattr(client, "node", repr(client)))

    def _node_failed(self, node: _Node, exc: BaseException) -> None:
        node.failures += 1
        node.snapshots.clear()  # whatever it held is gone with it
        node.users.clear()
        log.warning("sandbox node %s failed (%s); its episodes are requeued", node.name, exc)

    async def _environment(self, node: _Node, task: Task) -> str:
        """The snapshot of `task`'s environment on `node`, built once per node and task."""
        lock = node.setup_locks.setdefault(task.id, trio.Lock())
        async with lock:
            snap = node.snapshots.get(task.id)
            if snap is None:
                with trio.fail_after(self.config.setup_timeout_s):
                    sandbox = await node.client.create(task.image, repo=task_checkout(task),
                                                       workdir=task_workdir(task, self.config.episode_workdir))
                    try:
                        snap = await sandbox.snapshot()
                    finally:
                        with trio.CancelScope(shield=True):
                            await sandbox.destroy()
                node.snapshots[task.id] = snap
            node.users[task.id] = node.users.get(task.id, 0) + 1
            return snap

    async def _release_environment(self, node: _Node, task: Task) -> None:
        left = node.users.get(task.id, 0) - 1
        if left > 0:
            node.users[task.id] = left
            return
        node.users.pop(task.id, None)
        snap = node.snapshots.pop(task.id, None)
        if snap is not None:
            with trio.CancelScope(shield=True):
                try:
                    await node.client.delete_snapshot(snap)
                except Exception as exc:  # the node may be gone; the daemon sweeps on restart
                    log.debug("could not delete snapshot %s on %s: %s", snap, node.name, exc)

    # -- one rollout ------------------------------------------------------------------------------

    async def _attempt(self, node: _Node, task: Task, episode_id: str, group_id: str,
                       policy_version: int) -> RolloutResult:
        snap = await self._environment(node, task)
        try:
            async with node.limiter:
                sandbox = await node.client.fork(snap, workdir=task_workdir(task, self.config.episode_workdir))
                async with sandbox:
                    trajectory = await self._episode(task, sandbox, episode_id, group_id, policy_version)
                    report = None
                    if trajectory.patch.strip():
                        await sandbox.restore(snap)  # a fresh checkout for grading, in milliseconds
                        report = await self.grader(task, trajectory.patch, sandbox, timeout_s=self.config.grade_timeout_s)
        finally:
            await self._release_environment(node, task)
        resolved = bool(getattr(report, "resolved", False))
        reward = float(self.reward_fn(task, trajectory, report))
        grade = report.to_dict() if hasattr(report, "to_dict") else None
        trajectory = dataclasses.replace(trajectory, reward=reward, resolved=resolved if report is not None else False)
        return RolloutResult(trajectory, grade, 0)

    async def _episode(self, task: Task, sandbox: Any, episode_id: str, group_id: str,
                       policy_version: int) -> Trajectory:
        """The episode on an endpoint assigned for it (EndpointDown when every endpoint is drained),
        released when it ends: the policy counts only episodes that are sampling."""
        endpoint = self.policy.assign_endpoint()
        try:
            return await run_episode(
                task, sandbox, self.policy.sampler(endpoint), self.tokenizer, self.chat, self.config.episode,
                episode_id=episode_id, group_id=group_id, policy_version=policy_version, endpoint=endpoint,
                prompt_ids=self._prompt(task, sandbox.workdir), codec=self.codec)
        except Exception as exc:
            if _is_endpoint_error(exc):
                self.policy.report_failure(endpoint, exc)
            raise
        finally:
            if self._release is not None:
                self._release(endpoint)

    async def rollout(self, task: Task, *, episode_id: str, group_id: str, policy_version: int = 0) -> RolloutResult:
        """One episode of `task`, graded; retried from its start on infrastructure failures."""
        with relaxed_gc(self.config.gc_threshold):
            async with self.episode_limiter:
                self.counters["started"] += 1
                self.counters["running"] += 1
                try:
                    result = await self._attempts(task, episode_id, group_id, policy_version)
                finally:
                    self.counters["running"] -= 1
        self.counters["finished"] += 1
        self.counters["resolved"] += bool(result.trajectory.resolved)
        if self.on_result is not None:
            maybe = self.on_result(result)
            if maybe is not None:
                await maybe
        return result

    async def _attempts(self, task: Task, episode_id: str, group_id: str, policy_version: int) -> RolloutResult:
        excluded_nodes: set[str] = set()
        last_exc: BaseException | None = None
        for attempt in range(1, self.config.max_attempts + 1):
            node = self._pick_node(excluded_nodes)
            try:
                result = await self._attempt(node, task, episode_id, group_id, policy_version)
                node.healthy = True
                result.attempts = attempt
                return result
            except Exception as exc:
                if not _is_infrastructure_error(exc):
                    # A bug, not an outage: retrying will not help, and raising would take the
                    # other episodes of the batch down with this one. Keep it as data.
                    log.exception("episode %s failed", episode_id)
                    self.counters["errors"] += 1
                    return RolloutResult(self._error_trajectory(task, episode_id, group_id, policy_version),
                                         None, attempt, f"{type(exc).__name__}: {exc}")
                last_exc = exc
                self.counters["retried"] += 1
                if not _is_endpoint_error(exc):
                    self._node_failed(node, exc)
                    node.healthy = False
                    excluded_nodes.add(node.name)
                    if len(excluded_nodes) == len(self.nodes):
                        excluded_nodes.clear()
                log.info("episode %s attempt %d failed (%s: %s); requeued", episode_id, attempt,
                         type(exc).__name__, exc)
        self.counters["errors"] += 1
        return RolloutResult(self._error_trajectory(task, episode_id, group_id, policy_version),
                             None, self.config.max_attempts, f"{type(last_exc).__name__}: {last_exc}")

    def _prompt(self, task: Task, workdir: str) -> list[int]:
        key = f"{task.id}\0{workdir}"
        ids = self._prompts.get(key)
        if ids is None:
            if len(self._prompts) > 65536:  # bounded: a long run sees many tasks
                self._prompts.clear()
            ids = self._prompts[key] = build_prompt_ids(self.tokenizer, task, workdir)
        return ids

    def _error_trajectory(self, task: Task, episode_id: str, group_id: str, policy_version: int) -> Trajectory:
        return Trajectory(episode_id=episode_id, task_id=task.id, group_id=group_id,
                          prompt_ids=self._prompt(task, task_workdir(task, self.config.episode_workdir)), turns=[], reward=0.0,
                          finish_reason=FinishReason.ERROR, policy_version=policy_version,
                          metrics={"error": 1.0}, patch="", resolved=None)

    # -- groups -----------------------------------------------------------------------------------

    async def run_group(self, task: Task, n: int, *, group_id: str, policy_version: int = 0) -> list[RolloutResult]:
        """`n` rollouts of `task` (one DAPO group), concurrently; results in rollout order."""
        results: list[RolloutResult | None] = [None] * n

        async def one(i: int) -> None:
            results[i] = await self.rollout(task, episode_id=f"{group_id}/{i}", group_id=group_id,
                                            policy_version=policy_version)

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        return [r for r in results if r is not None]

    async def run_groups(self, groups: Sequence[tuple[Task, int, str]], *, policy_version: int = 0) -> list[list[RolloutResult]]:
        """Many groups concurrently (bounded by the scheduler's limits); results in input order."""
        out: list[list[RolloutResult]] = [[] for _ in groups]

        async def one(i: int, task: Task, n: int, group_id: str) -> None:
            out[i] = await self.run_group(task, n, group_id=group_id, policy_version=policy_version)

        async with trio.open_nursery() as nursery:
            for i, (task, n, group_id) in enumerate(groups):
                nursery.start_soon(one, i, task, n, group_id)
        return out

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "nodes": {n.name: {"healthy": n.healthy, "draining": n.draining, "failures": n.failures,
                                                     "in_use": n.limiter.borrowed_tokens} for n in self.nodes},
                "time": time.time()}
