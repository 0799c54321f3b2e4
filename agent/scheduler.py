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

One trio loop runs ~30,000 turns per second of CPU (tool parsing, token bookkeeping, records);
past that, `ShardedScheduler` runs the episodes over worker processes, each with its own trio loop and
`Scheduler`, with the same run_group/run_groups/on_result surface and the same guarantees.
"""

from __future__ import annotations

import gc
import importlib
import inspect
import itertools
import json
import logging
import os
import pickle
import struct
import subprocess
import sys
import time
import traceback
from array import array
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import trio

from runtime.records import FinishReason, Task, Trajectory, Turn
from runtime.wire import ConnectionLost, NotFound, RpcTimeout

from .llm.errors import BadResponse, EndpointDown, RequestTimeout
from .scaffold import (ChatFormat, EpisodeConfig, PromptEncoder, Sampler, Tokenizer, build_prompts, render_prompts,
                       run_episode)
from .scaffold.chat import TextCodec

__all__ = ["Grader", "NodeLost", "Policy", "RolloutResult", "Scheduler", "SchedulerConfig", "ShardedScheduler",
           "relaxed_gc", "task_workdir"]

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
    # `relaxed_gc`: at the default (700) collections took ~40% of the CPU of bench/scheduler.py (c); at
    # 100,000, five collections of 16-83 ms each stalled its 4,096 episodes; at 10^6, none ran.
    gc_threshold: int = 1_000_000


@dataclass
class RolloutResult:
    trajectory: Trajectory
    grade: dict[str, Any] | None
    attempts: int
    error: str | None = None  # why the episode finished with `error`


def _is_endpoint_error(exc: BaseException) -> bool:
    """The endpoint failed (down, too slow, answered garbage): retry the episode on another one."""
    return isinstance(exc, (EndpointDown, RequestTimeout, BadResponse))


def _error_trajectory(task: Task, episode_id: str, group_id: str, policy_version: int,
                      prompt_ids: list[int]) -> Trajectory:
    """The record of an episode that ended in `error`: no turns, not graded (the learner drops it)."""
    return Trajectory(episode_id=episode_id, task_id=task.id, group_id=group_id, prompt_ids=prompt_ids, turns=[],
                      reward=0.0, finish_reason=FinishReason.ERROR, policy_version=policy_version,
                      metrics={"error": 1.0}, patch="", resolved=None)


def _is_lost_sandbox(exc: BaseException) -> bool:
    """The node no longer knows a sandbox or snapshot we made there: it restarted (and swept them)."""
    return isinstance(exc, NotFound) and getattr(exc, "field", None) in ("sandbox", "snapshot")


def _is_infrastructure_error(exc: BaseException) -> bool:
    """Errors that are the infrastructure's, not the model's: the episode is retried elsewhere."""
    return (isinstance(exc, (NodeLost, ConnectionLost, RpcTimeout, OSError)) or _is_endpoint_error(exc)
            or _is_lost_sandbox(exc))


class _Slot:
    """``async with _Slot(limiter)``: one of `limiter`'s tokens for the block, taken at once when one is
    free. trio's `acquire` always passes through the scheduler first; with thousands of episodes
    starting together each such pass waits behind all of them, twice per episode (its slot and its
    node's sandbox slot)."""

    __slots__ = ("limiter",)

    def __init__(self, limiter: trio.CapacityLimiter) -> None:
        self.limiter = limiter

    async def __aenter__(self) -> None:
        try:
            self.limiter.acquire_nowait()
        except trio.WouldBlock:
            await self.limiter.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.limiter.release()


class _Node:
    def __init__(self, client: Any, capacity: int) -> None:
        self.client = client
        self.name = getattr(client, "node", repr(client))
        self.limiter = trio.CapacityLimiter(capacity)
        self.healthy = True
        self.draining = False  # left the membership: its running episodes finish, no new ones start
        self.failures = 0
        self.snapshots: dict[str, str] = {}  # task id -> snapshot of its environment on this node
        self.building: dict[str, trio.Event] = {}  # task id -> set when the build under way ends
        self.users: dict[str, int] = {}  # task id -> groups using its snapshot
        self.placed = 0  # episodes placed here and not finished (running, or waiting for capacity)


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


_PROMPT_CHUNK = 32  # prompts per background encode: the first episodes wait for one chunk, not the batch
_gc_holders = 0  # rollouts inside `relaxed_gc`, over every scheduler of the process
_gc_saved: tuple[int, int, int] = gc.get_threshold()
_gc_promote = False  # the outermost block found nothing frozen: it may promote with freeze/unfreeze


class relaxed_gc:  # noqa: N801 (a context manager used like a function: `with relaxed_gc(n):`)
    """CPython's youngest-generation GC threshold raised to `threshold` while the block runs, and what
    the block leaves alive promoted to the oldest generation, unscanned, when it ends.

    Thousands of episodes in flight keep 10^5-10^6 container objects alive (token lists, turns,
    coroutine frames). At the default threshold (a collection per 700 net allocations) the collector
    keeps promoting them and then scanning them all in full collections: in bench/scheduler.py (c),
    4,096 episodes x 20 turns, ~740 collections took ~40% of the run's CPU. A young collection costs
    ~0.7 us per live young object there (they are scattered over thousands of interleaved episodes),
    so each one at 100,000 took 16-83 ms of stalled event loop.

    The block's survivors are mostly results on their way to the caller (trajectories, ~5 objects a
    turn). Scanning them young when the block ends would be the largest pause of all (420,000 objects,
    290 ms, right after the last episode). So the outermost block ends with ``gc.freeze(); gc.unfreeze()``,
    which moves every tracked object to the oldest generation without scanning; reference cycles among
    them are still found, by the next full collection. It does so only when nothing was frozen as it
    began: unfreezing would hand someone else's `gc.freeze()` back to the collector. (The CPython 3.12
    of the lent GPU machines starts with 375 objects frozen, even with -S: there the block ends with
    that young collection, 170 ms after a sharded 4,096-episode batch's last result.)

    Concurrent and nested blocks share the setting; the last one to end restores the process's own.
    `threshold` <= 0: no change. (A class, not a generator: every rollout enters one.)
    """

    __slots__ = ("threshold",)

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold

    def __enter__(self) -> None:
        global _gc_holders, _gc_saved, _gc_promote
        if self.threshold <= 0:
            return
        if _gc_holders == 0:
            _gc_saved = gc.get_threshold()
            _gc_promote = gc.get_freeze_count() == 0
            gc.set_threshold(max(self.threshold, _gc_saved[0]), *_gc_saved[1:])
        _gc_holders += 1

    def __exit__(self, *exc_info: object) -> None:
        global _gc_holders
        if self.threshold <= 0:
            return
        _gc_holders -= 1
        if _gc_holders == 0:
            if _gc_promote and gc.isenabled() and gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
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
        self._prompts_pending: dict[str, trio.Event] = {}  # key -> set when its encoding ends (see _encode_soon)
        self._prompt_encoder = PromptEncoder(tokenizer)  # the system message encoded once, not per task
        self._release = getattr(policy, "release_endpoint", None)
        self.episode_limiter = trio.CapacityLimiter(config.max_episodes)
        self.counters: dict[str, int] = {"started": 0, "finished": 0, "retried": 0, "errors": 0, "resolved": 0,
                                         "running": 0, "environments": 0}  # environments: snapshots built

    # -- nodes ------------------------------------------------------------------------------------

    def _pick_node(self, exclude: set[str]) -> _Node:
        """The least loaded usable node: not draining, healthy, not in `exclude`, in that order of need.
        Load counts placed episodes, not sandboxes in use: a group placed a moment ago counts at once."""
        live = [n for n in self.nodes if not n.draining] or self.nodes
        healthy = [n for n in live if n.healthy and n.name not in exclude] or [
            n for n in live if n.name not in exclude] or live
        return min(healthy, key=lambda n: n.placed / n.limiter.total_tokens)

    def _place_group(self, n: int) -> _Node:
        """The node for a group of `n` rollouts, reserved for them (each `rollout` given it takes one):
        a group's rollouts fork one snapshot of its task's environment there, built once."""
        node = self._pick_node(set())
        node.placed += n
        return node

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
        """The snapshot of `task`'s environment on `node`, built once per node and task: the first
        rollout to need it builds it, the others wait for that build and all wake together when it
        ends (a lock would hand it on one waiter at a time). A failed build is tried again by the
        first of them to run."""
        while True:
            snap = node.snapshots.get(task.id)
            if snap is not None:
                node.users[task.id] = node.users.get(task.id, 0) + 1
                return snap
            building = node.building.get(task.id)
            if building is not None:
                await building.wait()
                continue
            done = node.building[task.id] = trio.Event()
            try:
                with trio.fail_after(self.config.setup_timeout_s):
                    sandbox = await node.client.create(task.image, repo=task_checkout(task),
                                                       workdir=task_workdir(task, self.config.episode_workdir))
                    try:
                        snap = await sandbox.snapshot()
                    finally:
                        with trio.CancelScope(shield=True):
                            await sandbox.destroy()
                node.snapshots[task.id] = snap
                self.counters["environments"] += 1
            finally:
                if node.building.get(task.id) is done:
                    del node.building[task.id]
                done.set()

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
            async with _Slot(node.limiter):
                sandbox = await node.client.fork(snap, workdir=task_workdir(task, self.config.episode_workdir))
                async with sandbox:
                    # The episode, on an endpoint assigned for it (EndpointDown when every endpoint is
                    # drained) and released when it ends: the policy counts only episodes that are
                    # sampling. Inline rather than a helper coroutine: one frame less to resume at
                    # each of the episode's awaits, thousands of times a second.
                    prompt_ids = await self._prompt_ids(task, sandbox.workdir)
                    endpoint = self.policy.assign_endpoint()
                    try:
                        trajectory = await run_episode(
                            task, sandbox, self.policy.sampler(endpoint), self.tokenizer, self.chat,
                            self.config.episode, episode_id=episode_id, group_id=group_id,
                            policy_version=policy_version, endpoint=endpoint, prompt_ids=prompt_ids,
                            prompt_checked=True, codec=self.codec)
                    except Exception as exc:
                        if _is_endpoint_error(exc):
                            self.policy.report_failure(endpoint, exc)
                        raise
                    finally:
                        if self._release is not None:
                            self._release(endpoint)
                    report = None
                    if trajectory.patch.strip():
                        await sandbox.restore(snap)  # a fresh checkout for grading, in milliseconds
                        report = await self.grader(task, trajectory.patch, sandbox, timeout_s=self.config.grade_timeout_s)
        finally:
            await self._release_environment(node, task)
        resolved = bool(getattr(report, "resolved", False))
        reward = float(self.reward_fn(task, trajectory, report))
        grade = report.to_dict() if hasattr(report, "to_dict") else None
        trajectory = trajectory.graded(reward=reward, resolved=resolved if report is not None else False)
        return RolloutResult(trajectory, grade, 0)

    async def rollout(self, task: Task, *, episode_id: str, group_id: str, policy_version: int = 0,
                      _placed: _Node | None = None,
                      _into: tuple[list[RolloutResult | None], int] | None = None) -> RolloutResult:
        """One episode of `task`, graded; retried from its start on infrastructure failures.

        `_placed`: a node `_place_group` reserved for this rollout's group, tried first. `_into`: (list,
        index) where to store the result too, so that `run_groups` runs this coroutine as the task
        itself: every frame between a trio task and the episode is resumed at each of its awaits
        (the attempts loop is inline here, not a helper, for the same reason)."""
        reserved = _placed
        try:
            with relaxed_gc(self.config.gc_threshold):
                async with _Slot(self.episode_limiter):
                    self.counters["started"] += 1
                    self.counters["running"] += 1
                    if reserved is not None:  # each attempt counts the node it uses, below
                        reserved.placed -= 1
                        reserved = None
                    excluded_nodes: set[str] = set()
                    result: RolloutResult | None = None
                    exc: BaseException | None = None
                    attempt = 0
                    try:
                        for attempt in range(1, self.config.max_attempts + 1):
                            if attempt == 1 and _placed is not None and _placed.healthy and not _placed.draining:
                                node = _placed  # the group's node: its snapshot is (being) built there
                            else:
                                node = self._pick_node(excluded_nodes)
                            node.placed += 1
                            try:
                                result = await self._attempt(node, task, episode_id, group_id, policy_version)
                            except Exception as error:
                                exc = error
                                if not _is_infrastructure_error(exc):
                                    # A bug, not an outage: retrying will not help, and raising would
                                    # take the other episodes of the batch down with this one.
                                    log.exception("episode %s failed", episode_id)
                                    break
                                self._attempt_failed(node, exc, excluded_nodes, episode_id, attempt)
                            else:
                                node.healthy = True
                                result.attempts = attempt
                                break
                            finally:
                                node.placed -= 1
                        if result is None:  # kept as data: an error trajectory, which the learner drops
                            self.counters["errors"] += 1
                            result = RolloutResult(self._error_trajectory(task, episode_id, group_id, policy_version),
                                                   None, attempt, f"{type(exc).__name__}: {exc}")
                    finally:
                        self.counters["running"] -= 1
        finally:
            if reserved is not None:  # cancelled before it started
                reserved.placed -= 1
        self.counters["finished"] += 1
        self.counters["resolved"] += bool(result.trajectory.resolved)
        if _into is not None:
            _into[0][_into[1]] = result
        if self.on_result is not None:
            maybe = self.on_result(result)
            if maybe is not None:
                await maybe
        return result

    def _attempt_failed(self, node: _Node, exc: BaseException, excluded_nodes: set[str], episode_id: str,
                        attempt: int) -> None:
        """An attempt lost to the infrastructure: a node's failure marks it (the next attempt goes to
        another one while any is left), an endpoint's is the policy's to count."""
        self.counters["retried"] += 1
        if not _is_endpoint_error(exc):
            self._node_failed(node, exc)
            node.healthy = False
            excluded_nodes.add(node.name)
            if len(excluded_nodes) == len(self.nodes):
                excluded_nodes.clear()
        log.info("episode %s attempt %d failed (%s: %s); requeued", episode_id, attempt, type(exc).__name__, exc)

    # -- prompts ----------------------------------------------------------------------------------
    #
    # A batch's prompts are encoded in a worker thread while the event loop sets up the batch's
    # sandboxes; an episode waits for its own prompt only before its first sample. Encoding in the
    # loop would stall every episode in flight (a SWE-bench prompt of 10k tokens takes milliseconds;
    # 512 short ones took 136 ms here); a fast tokenizer's batch encode runs without the GIL.

    async def _prompt_ids(self, task: Task, workdir: str) -> list[int]:
        """`task`'s rendered prompt: cached, or from the encoding under way, or encoded now."""
        key = f"{task.id}\0{workdir}"
        ids = self._prompts.get(key)
        if ids is None:
            pending = self._prompts_pending.get(key)
            if pending is not None:
                await pending.wait()
                ids = self._prompts.get(key)
            if ids is None:  # none was under way, or it failed: encode it here (a failure is this episode's)
                [ids] = await trio.to_thread.run_sync(build_prompts, self.tokenizer, [(task, workdir)])
                self._store_prompts({key: ids})
                ids = self._prompts[key]  # the checked copy
        return ids

    def _store_prompts(self, prompts: dict[str, list[int]]) -> None:
        """Cache `prompts`, each checked once here for all its rollouts (`Trajectory.check_prompt_ids`)."""
        checked = {key: Trajectory.check_prompt_ids(ids) for key, ids in prompts.items()}
        if len(self._prompts) + len(checked) > 65536:  # bounded: a long run sees many tasks
            self._prompts.clear()
        self._prompts.update(checked)

    def _encode_soon(self, nursery: trio.Nursery, tasks: Sequence[Task]) -> None:
        """Start encoding the prompts of `tasks` that are neither cached nor under way, in the background
        (`_encode_chunks`), in chunks of `_PROMPT_CHUNK` so that the first episodes wait for one chunk."""
        todo: dict[str, tuple[Task, str]] = {}
        for task in tasks:
            workdir = task_workdir(task, self.config.episode_workdir)
            key = f"{task.id}\0{workdir}"
            if key not in self._prompts and key not in self._prompts_pending:
                todo[key] = (task, workdir)
        if not todo:
            return
        keys = list(todo)
        try:  # rendering is Python (it would fight the loop for the GIL in a thread): here, ~16 us a task
            texts = render_prompts(self.tokenizer, list(todo.values()))
        except Exception as exc:  # each episode renders its own prompt and gets the error
            log.warning("rendering %d prompts failed: %s: %s", len(keys), type(exc).__name__, exc)
            return
        chunks = []
        for i in range(0, len(keys), _PROMPT_CHUNK):
            chunk, done = keys[i:i + _PROMPT_CHUNK], trio.Event()
            self._prompts_pending.update(dict.fromkeys(chunk, done))
            chunks.append((chunk, texts[i:i + _PROMPT_CHUNK], done))
        nursery.start_soon(self._encode_chunks, chunks)

    async def _encode_chunks(self, chunks: list[tuple[list[str], list[str], trio.Event]]) -> None:
        """Encode `chunks` in one worker thread, each stored (and its waiters woken) as soon as it is
        encoded: the thread hands a chunk to the loop with `run_sync_soon` and goes on to the next. The
        system message every prompt starts with is encoded once (`PromptEncoder`, checked again on the
        batch's first prompt), which cut the encoding of 512 short prompts to a fifth. The ids become
        lists in the loop: in the thread each list would wait for the GIL, which a busy loop
        gives up once per switch interval (5 ms); a thread call per chunk would wait for the loop's
        answer once per pass over thousands of episodes (~15 ms a chunk here)."""
        token = trio.lowlevel.current_trio_token()
        encoder = self._prompt_encoder

        def publish(keys: list[str], done: trio.Event, raw: Any) -> None:  # in the loop
            try:
                self._store_prompts(dict(zip(keys, encoder.to_ids(raw))))
            except Exception as exc:  # never out of a run_sync_soon callback; the waiters encode their own
                log.warning("storing %d prompts failed: %s: %s", len(keys), type(exc).__name__, exc)
            finally:
                self._release_pending(keys, done)

        def work() -> None:  # in a worker thread
            if encoder.prefix and not encoder.check(chunks[0][1][0]):
                log.warning("the tokenizer does not encode a prompt cut after its system message as it encodes "
                            "it whole: prompts are encoded whole from now on")
                encoder.disable()
            for keys, texts, done in chunks:
                token.run_sync_soon(publish, keys, done, encoder.encode_raw(texts))

        try:
            await trio.to_thread.run_sync(work)
        except Exception as exc:  # the chunks not stored: each waiting episode encodes its own prompt
            log.warning("encoding prompts failed: %s: %s", type(exc).__name__, exc)
        finally:  # (run_sync_soon runs callbacks in order: the published ones ran before this)
            for keys, _, done in chunks:
                self._release_pending(keys, done)

    def _release_pending(self, keys: list[str], done: trio.Event) -> None:
        for key in keys:
            if self._prompts_pending.get(key) is done:
                del self._prompts_pending[key]
        done.set()

    def _error_trajectory(self, task: Task, episode_id: str, group_id: str, policy_version: int) -> Trajectory:
        workdir = task_workdir(task, self.config.episode_workdir)
        prompt = self._prompts.get(f"{task.id}\0{workdir}")
        if prompt is None:  # rare (an episode that never got its prompt): encoded here, in the loop
            try:
                prompt = build_prompts(self.tokenizer, [(task, workdir)])[0]
            except Exception:  # the record must still be made; the learner drops error trajectories
                prompt = []
        return _error_trajectory(task, episode_id, group_id, policy_version, prompt or [0])

    # -- groups -----------------------------------------------------------------------------------

    async def run_group(self, task: Task, n: int, *, group_id: str, policy_version: int = 0) -> list[RolloutResult]:
        """`n` rollouts of `task` (one DAPO group), concurrently; results in rollout order."""
        return (await self.run_groups([(task, n, group_id)], policy_version=policy_version))[0]

    async def run_groups(self, groups: Sequence[tuple[Task, int, str]], *, policy_version: int = 0) -> list[list[RolloutResult]]:
        """Many groups concurrently (bounded by the scheduler's limits); results in input order. Each
        group's rollouts are placed on one node (`_place_group`); all rollouts are tasks of one nursery
        (no task per group: thousands of episodes start together at every batch)."""
        out: list[list[RolloutResult | None]] = [[None] * n for _, n, _ in groups]
        with relaxed_gc(self.config.gc_threshold):  # before spawning: the spawn allocates too
            async with trio.open_nursery() as nursery:
                self._encode_soon(nursery, [task for task, _, _ in groups])
                for results, (task, n, group_id) in zip(out, groups):
                    node = self._place_group(n)
                    for i in range(n):
                        nursery.start_soon(partial(self.rollout, task, episode_id=f"{group_id}/{i}", group_id=group_id,
                                                   policy_version=policy_version, _placed=node, _into=(results, i)))
        return [[r for r in results if r is not None] for results in out]

    def stats(self) -> dict[str, Any]:
        nodes = {n.name: {"healthy": n.healthy, "draining": n.draining, "failures": n.failures,
                          "in_use": n.limiter.borrowed_tokens, "placed": n.placed} for n in self.nodes}
        return {**self.counters, "nodes": nodes, "time": time.time()}


# -- episodes sharded over worker processes ---------------------------------------------------------
#
# Parent and worker speak length-prefixed pickle frames over the worker's stdin and stdout (both ends
# are this module, started by the parent). Parent -> worker: ("init", factory, kwargs, shard, shards),
# then ("run", [(item, task, episode_id, group_id, policy_version), ...]) any number of times, then
# ("close",): the worker finishes what it was given, sends the last results and exits. End of file
# without ("close",) means the parent is gone: the worker cancels its episodes and exits.
# Worker -> parent: ("ready", pid) or ("error", text) once, then ("results", [(item, result, error), ...],
# stats) as episodes finish; `result` is None (see `error`), a `RolloutResult`, or, for plain records, that
# result packed by `_pack_result` (token ids and floats as arrays in bytes: pickling ~2,000 ints and floats
# one object at a time cost more CPU than the episode's bookkeeping). Trusted peers only: pickle runs code
# on load, and packed records are rebuilt without being checked again (as unpickling does).

_FRAME = struct.Struct(">I")
_MAX_FRAME = (1 << 32) - 1
_RESULTS_PER_FRAME = 64  # a frame in flight is a bounded chunk of work for either side
_WORKER_PATH_ENV = "SWE_DAPO_SHARD_SYS_PATH"
_WORKER_BOOT = ("import json, os, sys; "
                f"sys.path[:0] = [p for p in json.loads(os.environ.pop({_WORKER_PATH_ENV!r}, '[]')) if p not in sys.path]; "
                "from agent.scheduler import _shard_worker_main; _shard_worker_main()")


def _frame(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(payload) > _MAX_FRAME:
        raise ValueError(f"a shard frame of {len(payload)} bytes is over the {_MAX_FRAME}-byte limit")
    return _FRAME.pack(len(payload)) + payload


_PACKED_FIELDS = frozenset({"prompt_ids", "turns", "finish_reason"})  # the fields packed apart


def _pack_result(result: RolloutResult) -> tuple | RolloutResult:
    """`result` as a tuple of a few bytes objects and scalars (see `_unpack_result`); the result itself
    when its records are not the plain classes (a subclass may carry more than the fields packed here)."""
    traj = result.trajectory
    if type(result) is not RolloutResult or type(traj) is not Trajectory or any(type(t) is not Turn for t in traj.turns):
        return result
    ids = list(traj.prompt_ids)
    lps: list[float] = []
    times: list[float] = []
    lengths: list[int] = []
    for turn in traj.turns:
        ids += turn.action_ids
        ids += turn.observation_ids
        lps += turn.action_logprobs
        times.append(turn.llm_s)
        times.append(turn.tool_s)
        lengths.append(len(turn.action_ids))
        lengths.append(len(turn.observation_ids))
    fields = traj.__dict__
    header = {k: v for k, v in fields.items() if k not in _PACKED_FIELDS}
    header["finish_reason"] = traj.finish_reason.value
    return (header, len(traj.prompt_ids), array("I", ids).tobytes(), array("d", lps).tobytes(),
            array("d", times).tobytes(), array("I", lengths).tobytes(), [t.tool for t in traj.turns],
            bytes([t.format_error for t in traj.turns]), result.grade, result.attempts, result.error)


def _unpack_result(packed: tuple) -> RolloutResult:
    """The `RolloutResult` that `_pack_result` packed, equal to it field for field."""
    header, n_prompt, ids_b, lps_b, times_b, lengths_b, tools, format_errors, grade, attempts, error = packed
    arrays = []
    for code, data in (("I", ids_b), ("d", lps_b), ("d", times_b), ("I", lengths_b)):
        values = array(code)
        values.frombytes(data)
        arrays.append(values.tolist())
    ids, lps, times, lengths = arrays
    make_turn = Turn.from_checked
    turns = []
    pos, lp = n_prompt, 0
    for k, tool in enumerate(tools):
        n_action, n_obs = lengths[2 * k], lengths[2 * k + 1]
        end = pos + n_action
        turns.append(make_turn(ids[pos:end], lps[lp:lp + n_action], ids[end:end + n_obs], tool,
                               bool(format_errors[k]), times[2 * k], times[2 * k + 1]))
        pos, lp = end + n_obs, lp + n_action
    traj = object.__new__(Trajectory)  # as unpickling builds it: the worker's record was checked
    traj.__dict__.update(header, prompt_ids=ids[:n_prompt], turns=turns,
                         finish_reason=FinishReason(header["finish_reason"]))
    return RolloutResult(traj, grade, attempts, error)


_READ_CHUNK = 1 << 16  # a 1 MiB read costs a fresh mmap of 1 MiB per call, most of it unused


def _widen_pipe(stream: Any) -> None:
    """Linux: a 1 MiB pipe buffer, so a frame of results crosses in a few reads, not dozens."""
    fileno = getattr(stream, "fileno", None)
    if fileno is not None and sys.platform.startswith("linux"):
        try:
            import fcntl

            fcntl.fcntl(fileno(), 1031, 1 << 20)  # F_SETPIPE_SZ
        except (OSError, ValueError, ImportError):
            pass  # over /proc/sys/fs/pipe-max-size for this user: the default size works, more slowly


class _FrameReader:
    """Reads `_frame`s from a trio receive stream; None at a clean end of stream."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def read(self) -> Any:
        buf = self.buf
        while True:
            if len(buf) >= _FRAME.size:
                (n,) = _FRAME.unpack_from(buf)
                end = _FRAME.size + n
                if len(buf) >= end:
                    with memoryview(buf) as view, view[_FRAME.size:end] as payload:
                        message = pickle.loads(payload)
                    del buf[:end]
                    return message
            chunk = await self.stream.receive_some(_READ_CHUNK)
            if not chunk:
                if buf:
                    raise EOFError(f"stream ended inside a frame ({len(buf)} bytes buffered)")
                return None
            buf += chunk


def _resolve_factory(factory: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(factory):
        return factory
    module, _, attr = factory.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"ShardedScheduler.factory: {factory!r} is not callable")
    return obj


def _check_factory(factory: Any) -> None:
    """A clear error now, in the parent, rather than a worker that cannot start."""
    if isinstance(factory, str):
        module, sep, attr = factory.partition(":")
        if not (module and sep and attr) or not all(p.isidentifier() for p in (*module.split("."), *attr.split("."))):
            raise ValueError(f"ShardedScheduler.factory: expected 'package.module:function', got {factory!r}")
        return
    if not callable(factory):
        raise TypeError(f"ShardedScheduler.factory: expected 'package.module:function' or a callable, got {type(factory).__name__}")
    if getattr(factory, "__module__", None) == "__main__":
        raise ValueError("ShardedScheduler.factory: a function of __main__ cannot be imported by a worker process; "
                         "name it as 'package.module:function'")
    try:
        pickle.dumps(factory)
    except Exception as exc:
        raise ValueError(f"ShardedScheduler.factory: a worker process cannot receive it ({exc}); "
                         "use a module-level function, 'package.module:function'") from None


async def _open_sharded(stack: AsyncExitStack, factory: Any, kwargs: Mapping[str, Any], shard: int, shards: int) -> Scheduler:
    made = _resolve_factory(factory)(shard, shards, **kwargs)
    if inspect.isawaitable(made):
        made = await made
    if hasattr(made, "__aenter__"):
        made = await stack.enter_async_context(made)
    if not isinstance(made, Scheduler):
        raise TypeError(f"ShardedScheduler.factory: must give a Scheduler (or an awaitable or async context "
                        f"manager of one), gave {type(made).__name__}")
    return made


def _shard_worker_main() -> None:
    """Entry point of a worker process (see `ShardedScheduler`): the protocol on fds 0 and 1."""
    proto_in, proto_out = os.dup(0), os.dup(1)
    os.dup2(2, 1)  # what the factory or a library prints goes to stderr, never into the protocol
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    trio.run(_shard_worker, proto_in, proto_out)


async def _shard_worker(fd_in: int, fd_out: int) -> None:
    reader = _FrameReader(trio.lowlevel.FdStream(fd_in))
    out = trio.lowlevel.FdStream(fd_out)
    _widen_pipe(out)
    cpu0 = time.process_time()
    init = await reader.read()
    if init is None:
        return
    _, factory, kwargs, shard, shards = init
    async with AsyncExitStack() as stack:
        try:
            sched = await _open_sharded(stack, factory, kwargs, shard, shards)
        except Exception:
            await out.send_all(_frame(("error", traceback.format_exc())))
            return
        # What the imports and the factory made lives as long as the process: out of the collector's way.
        gc.freeze()
        await out.send_all(_frame(("ready", os.getpid())))
        finished: list[tuple[int, RolloutResult | None, str | None]] = []
        wake = trio.Event()
        closing = False

        def stats() -> dict[str, Any]:
            return {**sched.counters, "cpu_s": round(time.process_time() - cpu0, 3), "pid": os.getpid()}

        def encode(batch: list[tuple[int, RolloutResult | None, str | None]]) -> bytes:
            try:
                return _frame(("results", batch, stats()))
            except Exception:  # one result that does not pickle must not lose the others
                kept = []
                for item, result, error in batch:
                    try:
                        pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
                        kept.append((item, result, error))
                    except Exception as exc:
                        kept.append((item, None, f"result could not be sent from the shard worker: {type(exc).__name__}: {exc}"))
                return _frame(("results", kept, stats()))

        async def sender() -> None:
            nonlocal wake
            while True:
                await wake.wait()
                wake = trio.Event()
                while finished:
                    batch = finished[:_RESULTS_PER_FRAME]
                    del finished[:_RESULTS_PER_FRAME]
                    await out.send_all(encode(batch))
                if closing:
                    return

        async def one(item: int, task: Task, episode_id: str, group_id: str, policy_version: int, node: _Node) -> None:
            try:
                result = await sched.rollout(task, episode_id=episode_id, group_id=group_id,
                                             policy_version=policy_version, _placed=node)
                finished.append((item, _pack_result(result), None))
            except Exception as exc:  # on_result of the factory's scheduler failed: this episode's, not the worker's
                log.exception("episode %s failed in shard %d", episode_id, shard)
                finished.append((item, None, f"{type(exc).__name__}: {exc}"))
            wake.set()

        # The worker lives for its rollouts: the relaxed GC threshold holds for its whole life, so a
        # batch's records, freed by refcount once sent, never pile up into one full collection.
        with relaxed_gc(sched.config.gc_threshold), trio.CancelScope() as serving:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                async with trio.open_nursery() as episodes:
                    while True:
                        message = await reader.read()
                        if message is None:  # the parent is gone: nobody will read what we would send
                            serving.cancel()
                            return
                        if message[0] == "close":
                            break
                        if message[0] == "run":  # a group's entries come together: one node for them
                            sched._encode_soon(episodes, [entry[1] for entry in message[1]])
                            for _, group in itertools.groupby(message[1], key=lambda entry: entry[3]):
                                group = list(group)
                                node = sched._place_group(len(group))
                                for entry in group:
                                    episodes.start_soon(one, *entry, node)
                closing = True  # every episode given has finished: send the rest and end
                wake.set()


@dataclass(eq=False)
class _ShardItem:
    """One requested episode, until its one result is delivered."""

    key: int
    task: Task
    episode_id: str
    group_id: str
    policy_version: int
    deliver: Callable[[RolloutResult], None]
    tries: int = 0  # worker processes it was given to


class _ShardWorker:
    def __init__(self, index: int, process: Any) -> None:
        self.index = index
        self.process = process
        self.reader = _FrameReader(process.stdout)
        self.send_lock = trio.Lock()
        self.items: dict[int, _ShardItem] = {}  # given to this worker, no result yet
        self.alive = True
        self.stats: dict[str, Any] = {}

    async def send(self, message: Any) -> None:
        data = _frame(message)
        async with self.send_lock:
            await self.process.stdin.send_all(data)


class ShardedScheduler:
    """Episodes sharded over `workers` processes, each running its own trio loop and `Scheduler`.

    One trio loop spends ~30 us of CPU per turn (parsing the call, running the tool, token
    bookkeeping, the records): ~30,000 turns a second at most; 4,096 episodes at 200 ms of policy
    latency keep two thirds of a core busy (bench/scheduler.py). Past one core's worth, shard. Each
    worker builds its own `Scheduler` by calling ``factory(shard, shards, **factory_kwargs)``; `factory` is a
    ``"package.module:function"`` string or an importable module-level function, and may return the
    `Scheduler`, an awaitable of one, or an async context manager yielding one (to open an
    `agent.llm.LLMClient` for the worker's lifetime). Limits are per worker: a factory shares out
    `max_episodes`, per-node capacity and per-endpoint in-flight limits by `shards`.

    Same surface as `Scheduler`: `run_group`, `run_groups` (results in input order), `on_result`
    (called in this process as results arrive), `counters`, `stats()`. A group's rollouts run in one
    worker (they fork one snapshot of the task's environment there); groups go to the least loaded
    worker. Inside a worker the scheduler retries node and endpoint failures as usual; a worker process
    that dies is replaced and its unfinished episodes are rerun from their start in the replacement, up
    to `max_attempts` workers per episode, after which they finish with `error`. Every requested episode
    yields exactly one result: none lost, none duplicated.

    Use as ``async with ShardedScheduler(...) as sched:``; the workers start on entry (importing the
    factory's modules takes seconds, so keep the pool across iterations) and stop on exit. A cancelled
    `run_groups` leaves its episodes running in the workers; their results still go to `on_result`.

    Cost: results cross a pipe packed (`_pack_result`: token ids and floats as array bytes, pickled with
    the rest). A 20-turn trajectory (~1,400 token ids, ~700 logprobs) takes ~25 us of a worker's CPU to
    pack (34 us as a plain pickle), plus freeing it, and ~37 us of this process's to rebuild (47 us to
    unpickle), mostly at the end of a batch, where every episode ends: sharding pays where cores are
    free, not on a machine already busy (on 2 cores, 4,096 episodes at 200 ms ran closer to the ideal
    in one process).
    """

    def __init__(
        self,
        factory: str | Callable[..., Any],
        workers: int,
        *,
        factory_kwargs: Mapping[str, Any] | None = None,
        max_attempts: int = 3,
        on_result: Callable[[RolloutResult], Awaitable[None] | None] | None = None,
        gc_threshold: int = 1_000_000,
        startup_timeout_s: float = 300.0,
        stop_timeout_s: float = 60.0,
        max_respawns: int | None = None,
        python: str = sys.executable,
    ) -> None:
        _check_factory(factory)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"ShardedScheduler.workers must be an int >= 1, got {workers!r}")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"ShardedScheduler.max_attempts must be an int >= 1, got {max_attempts!r}")
        for name, value in (("startup_timeout_s", startup_timeout_s), ("stop_timeout_s", stop_timeout_s)):
            if not value > 0:
                raise ValueError(f"ShardedScheduler.{name} must be > 0, got {value!r}")
        self.factory = factory
        self.workers = workers
        self.factory_kwargs = dict(factory_kwargs or {})
        try:
            pickle.dumps(self.factory_kwargs)
        except Exception as exc:
            raise ValueError(f"ShardedScheduler.factory_kwargs: a worker process cannot receive them ({exc})") from None
        self.max_attempts = max_attempts
        self.on_result = on_result
        self.gc_threshold = gc_threshold
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.respawns_left = workers * max_attempts if max_respawns is None else max_respawns
        self.python = python
        self.counters: dict[str, int] = {"started": 0, "finished": 0, "errors": 0, "resolved": 0, "running": 0,
                                         "requeued": 0, "workers_lost": 0}
        self._workers: list[_ShardWorker] = []
        self._keys = itertools.count()
        self._stack: AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None
        self._closing = False

    # -- lifetime ---------------------------------------------------------------------------------

    async def __aenter__(self) -> ShardedScheduler:
        if self._stack is not None:
            raise RuntimeError("ShardedScheduler is already open")
        stack = AsyncExitStack()
        self._nursery = await stack.enter_async_context(trio.open_nursery())
        self._stack = stack
        workers: list[_ShardWorker | None] = [None] * self.workers
        try:
            failures: list[RuntimeError] = []

            async def start(i: int) -> None:
                try:
                    workers[i] = await self._spawn(i)
                except RuntimeError as exc:
                    failures.append(exc)

            async with trio.open_nursery() as starting:
                for i in range(self.workers):
                    starting.start_soon(start, i)
            if failures:
                raise failures[0]
            self._workers = [w for w in workers if w is not None]
        except BaseException:
            for w in workers:
                if w is not None:
                    self._kill(w)
            self._nursery.cancel_scope.cancel()
            await stack.aclose()
            self._stack = self._nursery = None
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._stack is not None and self._nursery is not None
        self._closing = True
        try:
            if exc_info[0] is None:
                with trio.move_on_after(self.stop_timeout_s):
                    for w in self._workers:
                        if w.alive:
                            try:
                                await w.send(("close",))
                                await w.process.stdin.aclose()
                            except (trio.BrokenResourceError, trio.ClosedResourceError):
                                pass
                    for w in self._workers:
                        await w.process.wait()
        finally:
            for w in self._workers:
                self._kill(w)
            self._nursery.cancel_scope.cancel()
            stack, self._stack, self._nursery = self._stack, None, None
            await stack.aclose()

    def _kill(self, w: _ShardWorker) -> None:
        if w.process.returncode is None:
            try:
                w.process.kill()
            except OSError:
                pass

    async def _spawn(self, index: int) -> _ShardWorker:
        """A worker process with its scheduler built, or RuntimeError saying why not."""
        env = {**os.environ, _WORKER_PATH_ENV: json.dumps([p for p in sys.path if isinstance(p, str)])}
        process = await trio.lowlevel.open_process([self.python, "-c", _WORKER_BOOT], stdin=subprocess.PIPE,
                                                   stdout=subprocess.PIPE, env=env)
        w = _ShardWorker(index, process)
        _widen_pipe(process.stdout)
        try:
            with trio.fail_after(self.startup_timeout_s):
                await w.send(("init", self.factory, self.factory_kwargs, index, self.workers))
                reply = await w.reader.read()
        except trio.TooSlowError:
            self._kill(w)
            raise RuntimeError(f"shard worker {index} did not start within {self.startup_timeout_s:g} s") from None
        except Exception as exc:  # it died before answering (a broken pipe, a torn frame)
            reply = ("error", f"{type(exc).__name__}: {exc}")
        if reply is None or reply[0] != "ready":
            self._kill(w)
            await process.wait()
            why = reply[1] if reply is not None else f"it exited with status {process.returncode}"
            raise RuntimeError(f"shard worker {index} failed to start: {why}")
        w.stats = {"pid": reply[1]}
        assert self._nursery is not None
        self._nursery.start_soon(self._read, w)
        return w

    # -- results ----------------------------------------------------------------------------------

    async def _read(self, w: _ShardWorker) -> None:
        why = "it exited"
        while True:
            try:
                message = await w.reader.read()
            except Exception as exc:  # a broken pipe or a torn frame: the worker is gone either way
                why = f"{type(exc).__name__}: {exc}"
                break
            if message is None:
                break
            if message[0] == "results":
                w.stats.update(message[2])
                for key, result, error in message[1]:
                    if type(result) is tuple:
                        result = _unpack_result(result)
                    item = w.items.pop(key, None)
                    if item is not None:  # else already delivered (cannot happen; never twice)
                        await self._deliver(item, result if result is not None else self._error_result(item, error))
        await self._lost(w, why)

    async def _deliver(self, item: _ShardItem, result: RolloutResult) -> None:
        result.attempts += item.tries - 1  # each lost worker counts as one attempt
        self.counters["finished"] += 1
        self.counters["running"] -= 1
        self.counters["errors"] += result.error is not None
        self.counters["resolved"] += bool(result.trajectory.resolved)
        item.deliver(result)
        if self.on_result is not None:
            maybe = self.on_result(result)
            if maybe is not None:
                await maybe

    def _error_result(self, item: _ShardItem, error: str | None) -> RolloutResult:
        # The prompt of an episode that never ran: rendering it needs the tokenizer, which lives in the
        # workers; the learner drops error trajectories, so a placeholder token keeps the record valid.
        trajectory = _error_trajectory(item.task, item.episode_id, item.group_id, item.policy_version, [0])
        return RolloutResult(trajectory, None, 1, error or "unknown error in the shard worker")

    async def _lost(self, w: _ShardWorker, why: str) -> None:
        """The worker's stream ended: a normal stop when nothing was pending, else its episodes requeue."""
        w.alive = False
        items = list(w.items.values())
        w.items.clear()
        if self._closing and not items:
            return  # it is exiting as asked; __aexit__ waits for it (and kills it past stop_timeout_s)
        self._kill(w)
        with trio.CancelScope(shield=True):
            await w.process.wait()
        self.counters["workers_lost"] += 1
        log.warning("shard worker %d (pid %s) lost (%s, status %s); %d episodes requeued", w.index,
                    w.stats.get("pid"), why, w.process.returncode, len(items))
        retry = [i for i in items if i.tries < self.max_attempts]
        for item in items:
            if item.tries >= self.max_attempts:
                await self._deliver(item, self._error_result(
                    item, f"ShardWorkerLost: shard worker process lost {item.tries} times ({why})"))
        if not retry or self._closing:
            for item in retry:
                await self._deliver(item, self._error_result(item, f"ShardWorkerLost: the pool is closing ({why})"))
            return
        if self.respawns_left > 0:
            self.respawns_left -= 1
            try:
                replacement = await self._spawn(w.index)
                self._workers[self._workers.index(w)] = replacement
            except RuntimeError as exc:
                log.error("could not replace shard worker %d: %s", w.index, exc)
        self.counters["requeued"] += len(retry)
        await self._submit(retry)

    # -- submitting -------------------------------------------------------------------------------

    async def _submit(self, items: list[_ShardItem]) -> None:
        """Give `items` to live workers, keeping each group's items together, least loaded first."""
        by_worker: dict[_ShardWorker, list[_ShardItem]] = {}
        load = {w: len(w.items) for w in self._workers if w.alive}
        for _, group in itertools.groupby(items, key=lambda i: i.group_id):
            group = list(group)
            if not load:
                for item in group:
                    await self._deliver(item, self._error_result(item, "ShardWorkerLost: no shard worker is running"))
                continue
            w = min(load, key=load.__getitem__)
            load[w] += len(group)
            for item in group:
                item.tries += 1
                w.items[item.key] = item  # before the send: a worker lost from here on requeues them
            by_worker.setdefault(w, []).extend(group)
        for w, given in by_worker.items():
            try:
                await w.send(("run", [(i.key, i.task, i.episode_id, i.group_id, i.policy_version) for i in given]))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the worker died: its reader requeues what it was given

    async def run_groups(self, groups: Sequence[tuple[Task, int, str]], *, policy_version: int = 0) -> list[list[RolloutResult]]:
        """Many groups concurrently over the workers; results in input order."""
        if self._nursery is None:
            raise RuntimeError("ShardedScheduler is not open: use `async with ShardedScheduler(...) as sched`")
        out: list[list[RolloutResult | None]] = [[None] * n for _, n, _ in groups]
        left = sum(n for _, n, _ in groups)
        done = trio.Event()
        if not left:
            return [[] for _ in groups]

        def sink(g: int, i: int) -> Callable[[RolloutResult], None]:
            def deliver(result: RolloutResult) -> None:
                nonlocal left
                out[g][i] = result
                left -= 1
                if not left:
                    done.set()
            return deliver

        items = [_ShardItem(next(self._keys), task, f"{group_id}/{i}", group_id, policy_version, sink(g, i))
                 for g, (task, n, group_id) in enumerate(groups) for i in range(n)]
        self.counters["started"] += len(items)
        self.counters["running"] += len(items)
        with relaxed_gc(self.gc_threshold):  # thousands of trajectories arrive here too
            await self._submit(items)
            await done.wait()
        return [[r for r in g if r is not None] for g in out]

    async def run_group(self, task: Task, n: int, *, group_id: str, policy_version: int = 0) -> list[RolloutResult]:
        """`n` rollouts of `task` (one DAPO group) in one worker; results in rollout order."""
        return (await self.run_groups([(task, n, group_id)], policy_version=policy_version))[0]

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "workers": {w.index: {"alive": w.alive, "pending": len(w.items), **w.stats}
                                             for w in self._workers}, "time": time.time()}
