"""Where the learner's trajectories come from: sandboxes, a policy to sample, a scheduler, rewards.

`open_environment(cfg, policy_model, tokenizer)` brings up, for the duration of a block:

- sandbox nodes: `sandboxd` daemons named in ``[sandbox] nodes`` (Unix or TCP), or, with none, a
  runtime in this process (`sandboxd.client.open_local`);
- the policy: the embedded policy server on `policy_model` (a copy of the trainer's model, served
  in-process through an httpx transport), or the OpenAI-compatible endpoints of ``[rollout]``;
- a `WeightSync` that pushes the trainer's weights to every endpoint after a step;
- the agent `Scheduler` with the configured reward.

Reproducible sampling. Every completion request carries a seed derived from the run seed, a salt
(the step and the phase), the prompt's tokens and how many times that same prompt was already
asked for in this round: `SeededPolicy`. The G rollouts of a task share their first prompt and
get seeds 0..G-1 of it; a later turn's prompt holds the whole episode so far. So a round's
trajectories are the same multiset whatever order trio, the sandboxes or the endpoints run them
in, and a run resumed from a checkpoint samples the same batch again (the embedded server's
tokens depend only on the request's seed; vLLM honours per-request seeds too). Within a group,
`canonical_order` sorts rollouts by their tokens so that training sees them in one order.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import random
import shutil
from array import array
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.grading import grade
from agent.rewards import apply_format_penalty, count_format_errors, similarity_reward
from agent.scaffold import EpisodeConfig
from agent.scheduler import RolloutResult, Scheduler, SchedulerConfig
from runtime.records import Task, Trajectory

from .config import RunConfig

__all__ = ["Environment", "SeededPolicy", "TaskCursor", "canonical_order", "load_task_sets", "make_reward_fn",
           "open_environment"]

log = logging.getLogger("swe_dapo.learner")


class TaskCursor:
    """Tasks in a seeded order, epoch after epoch; its state is part of a checkpoint.

    `take(n)` never returns one task twice (two groups of one task in a batch would share their
    prompts, and with them their sampling seeds): at an epoch boundary, a task already in the batch is
    swapped with the next one of the new epoch that is not. The swaps are part of the state.
    """

    def __init__(self, tasks: Sequence[Task], seed: int) -> None:
        if not tasks:
            raise ValueError("TaskCursor: no tasks")
        self.tasks = list(tasks)
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self.swaps: list[tuple[int, int]] = []  # (i, j) swaps of positions applied to this epoch's order
        self._order = self._permutation(0, [])

    def _permutation(self, epoch: int, swaps: Sequence[tuple[int, int]]) -> list[int]:
        order = list(range(len(self.tasks)))
        random.Random(f"{self.seed}:tasks:{epoch}").shuffle(order)
        for i, j in swaps:
            order[i], order[j] = order[j], order[i]
        return order

    def take(self, n: int) -> list[Task]:
        if n > len(self.tasks):
            raise ValueError(f"a batch of {n} distinct tasks from a set of {len(self.tasks)}")
        out: list[Task] = []
        seen: set[int] = set()
        while len(out) < n:
            if self.index >= len(self._order):
                self.epoch, self.index, self.swaps = self.epoch + 1, 0, []
                self._order = self._permutation(self.epoch, [])
            if self._order[self.index] in seen:
                j = next(k for k in range(self.index + 1, len(self._order)) if self._order[k] not in seen)
                self.swaps.append((self.index, j))
                self._order[self.index], self._order[j] = self._order[j], self._order[self.index]
            seen.add(self._order[self.index])
            out.append(self.tasks[self._order[self.index]])
            self.index += 1
        return out

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "swaps": [list(s) for s in self.swaps]}

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.swaps = [(int(i), int(j)) for i, j in state.get("swaps", [])]
        self._order = self._permutation(self.epoch, self.swaps)


class SeededPolicy:
    """The scheduler's `Policy` over an `LLMClient`, with content-derived request seeds (see above).

    `new_round(salt)` starts a round (one step's sampling, or one evaluation): the per-prompt counters
    reset and the salt changes, so the next round draws fresh seeds.
    """

    def __init__(self, llm: Any, seed: int, *, temperature: float | None = None) -> None:
        self.llm = llm
        self.seed = seed
        self.temperature = temperature
        self.salt = ""
        self._asked: dict[bytes, int] = {}

    def new_round(self, salt: str, *, temperature: float | None = None) -> None:
        self.salt = salt
        self._asked.clear()
        if temperature is not None:
            self.temperature = temperature

    def request_seed(self, prompt_ids: Sequence[int]) -> int:
        digest = hashlib.blake2b(array("i", prompt_ids).tobytes(), digest_size=16,
                                 key=f"{self.seed}:{self.salt}".encode()[:64]).digest()
        n = self._asked.get(digest, 0)
        self._asked[digest] = n + 1
        return int.from_bytes(hashlib.blake2b(digest + n.to_bytes(4, "little"), digest_size=8).digest(),
                              "little") % (2**31 - 1)

    def sampler(self, endpoint: str) -> _SeededSampler:
        return _SeededSampler(self, self.llm.sampler(endpoint))

    def __getattr__(self, name: str) -> Any:  # assign_endpoint, report_failure, release_endpoint, ...
        return getattr(self.llm, name)


class _SeededSampler:
    def __init__(self, policy: SeededPolicy, inner: Any) -> None:
        self.policy = policy
        self.inner = inner

    async def complete(self, prompt_ids: list[int], *, max_tokens: int, stop: Sequence[str] = (),
                       stop_token_ids: Sequence[int] = (), **kwargs: Any) -> Any:
        kwargs.setdefault("seed", self.policy.request_seed(prompt_ids))
        if self.policy.temperature is not None:
            kwargs.setdefault("temperature", self.policy.temperature)
        return await self.inner.complete(prompt_ids, max_tokens=max_tokens, stop=stop,
                                         stop_token_ids=stop_token_ids, **kwargs)


def canonical_order(results: Sequence[RolloutResult]) -> list[RolloutResult]:
    """A group's rollouts sorted by what they are (tokens, then reward), not by when they finished."""
    return sorted(results, key=lambda r: (r.trajectory.token_ids(), r.trajectory.reward))


def make_reward_fn(cfg: RunConfig):
    """(task, trajectory, grade report) -> reward, as configured in ``[reward]``."""
    kind, penalty, floor = cfg.reward.kind, cfg.reward.format_penalty, cfg.reward.format_floor

    def reward(task: Task, trajectory: Trajectory, report: Any) -> float:
        if kind == "similarity":
            if not task.gold_patch:
                raise ValueError(f"reward.kind = 'similarity' needs a gold patch; task {task.id} has none")
            value = similarity_reward(trajectory.patch, task.gold_patch)
        else:
            value = 1.0 if report is not None and getattr(report, "resolved", False) else 0.0
        return apply_format_penalty(value, count_format_errors(trajectory.turns), penalty=penalty, floor=floor)

    return reward


def _toy_suite(workdir: Path, seed: int, n_train: int, n_heldout: int) -> list[Task]:
    """The toy suite (seed, n_train, n_heldout) under `workdir`, generated once and reused after."""
    from agent.grade import load_task_file
    from agent.toy import generate_suite

    suite = workdir / f"toy-s{seed}-{n_train}-{n_heldout}"
    done = suite / ".complete"
    if done.exists():  # generated by an earlier (or the interrupted) run: same seed, same bytes
        return load_task_file(str(suite / "tasks.jsonl"))
    if suite.exists():  # a generation cut short
        shutil.rmtree(suite)
    tasks = generate_suite(seed, n_train, n_heldout, suite, python="python3")
    done.touch()
    return tasks


def load_task_sets(cfg: RunConfig, out_dir: Path) -> tuple[list[Task], list[Task]]:
    """(train tasks, held-out evaluation tasks) as configured in ``[tasks]``."""
    if cfg.tasks.source == "toy":
        workdir = Path(cfg.tasks.workdir or out_dir / "tasks")
        t = cfg.tasks
        if t.toy_heldout_from == "templates":
            tasks = _toy_suite(workdir, t.toy_seed, t.toy_train, t.toy_heldout)
            return [x for x in tasks if x.split != "heldout"], [x for x in tasks if x.split == "heldout"]
        train = _toy_suite(workdir, t.toy_seed, t.toy_train, 0)
        if not t.toy_heldout:
            return train, []
        seen = {x.problem_statement for x in train}
        # Another seed's train-template tasks; one whose issue text equals a training task's is skipped.
        n = t.toy_heldout
        while True:
            pool = _toy_suite(workdir, t.toy_seed + 1, n, 0)
            fresh = [x for x in pool if x.problem_statement not in seen]
            if len(fresh) >= t.toy_heldout:
                break
            n += t.toy_heldout - len(fresh)
        return train, [dataclasses.replace(x, split="heldout") for x in fresh[:t.toy_heldout]]
    from agent.tasks import load_tasks

    train = list(load_tasks(cfg.tasks.source))
    heldout = list(load_tasks(cfg.tasks.eval_source)) if cfg.tasks.eval_source else []
    return train, heldout


@dataclass
class Environment:
    scheduler: Scheduler
    policy: SeededPolicy
    weight_sync: Any  # learner.weight_sync.WeightSync
    server: Any | None  # the embedded PolicyServer, when there is one
    endpoints: list[str]

    async def rollouts(self, groups: Sequence[tuple[Task, int, str]], *, salt: str, policy_version: int,
                       temperature: float | None = None) -> list[list[RolloutResult]]:
        """G rollouts of each task, graded and rewarded; each group in canonical order."""
        self.policy.new_round(salt, temperature=temperature)
        results = await self.scheduler.run_groups(groups, policy_version=policy_version)
        return [canonical_order(g) for g in results]


@contextlib.asynccontextmanager
async def open_environment(cfg: RunConfig, policy_model: Any, tokenizer: Any, *, policy_version: int,
                           state_dir: Path, on_result: Any = None) -> AsyncIterator[Environment]:
    """Sandboxes, policy endpoints, weight sync and scheduler for one run (see the module docstring)."""
    from agent.llm import LLMClient
    from sandboxd.client import connect, open_local

    from .serve import ServeConfig, open_policy_server
    from .weight_sync import WeightEndpoint, WeightSync

    async with contextlib.AsyncExitStack() as stack:
        nodes = []
        if cfg.sandbox.nodes:
            token = cfg.sandbox.token_file.read_text().strip() if cfg.sandbox.token_file else None
            for address in cfg.sandbox.nodes:
                nodes.append(await stack.enter_async_context(connect(address, token=token)))
        else:
            state_dir.mkdir(parents=True, exist_ok=True)
            nodes.append(await stack.enter_async_context(open_local(cfg.sandbox.runtime, str(state_dir))))

        server = None
        max_len = cfg.rollout.max_context_tokens
        if cfg.rollout.endpoints:
            llm = LLMClient(cfg.rollout.endpoints, model=cfg.rollout.model_name or None,
                            timeout_s=cfg.rollout.request_timeout_s,
                            max_model_len=max_len, seed=cfg.run.seed)
            sync_targets: list[Any] = [WeightEndpoint(u, cfg.rollout.push_backend) for u in cfg.rollout.endpoints]
        else:
            # The server samples from its own copy: the trainer's parameters change under backward().
            served = copy.deepcopy(policy_model).eval()
            for p in served.parameters():
                p.requires_grad_(False)
            server = await stack.enter_async_context(open_policy_server(
                served, tokenizer, ServeConfig(max_num_seqs=cfg.rollout.max_num_seqs, seed=cfg.run.seed,
                                               max_model_len=max_len),
                policy_version=policy_version))
            llm = LLMClient(["http://embedded"], model="policy", transport=server.transport(),
                            timeout_s=cfg.rollout.request_timeout_s, max_model_len=max_len, seed=cfg.run.seed)
            sync_targets = [server]
        await stack.enter_async_context(llm)
        weight_sync = await stack.enter_async_context(
            WeightSync(sync_targets, disk_dir=state_dir / "weights" if cfg.rollout.push_backend == "disk" else None))

        policy = SeededPolicy(llm, cfg.run.seed, temperature=cfg.rollout.temperature)
        episode = EpisodeConfig(max_turns=cfg.rollout.max_turns, max_context_tokens=cfg.rollout.max_context_tokens,
                                max_turn_tokens=cfg.rollout.max_turn_tokens, wall_time_s=cfg.rollout.episode_wall_s)
        scheduler = Scheduler(nodes, policy, tokenizer, grade,
                              SchedulerConfig(max_episodes=cfg.rollout.max_episodes,
                                              node_capacity=cfg.sandbox.node_capacity,
                                              grade_timeout_s=cfg.sandbox.grade_timeout_s, episode=episode),
                              reward_fn=make_reward_fn(cfg), on_result=on_result)
        yield Environment(scheduler, policy, weight_sync, server,
                          list(cfg.rollout.endpoints) or ["embedded"])
