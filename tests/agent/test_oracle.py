"""The oracle policy solves toy tasks end to end: scheduler, real ns sandboxes, SWE-bench grading."""

from __future__ import annotations

import os

import pytest

from agent.fakes import CallablePolicy
from agent.grading import grade
from agent.oracle import OraclePolicy, oracle_plan
from agent.scaffold import EpisodeConfig
from agent.scheduler import Scheduler, SchedulerConfig
from agent.toy import generate_suite
from runtime.records import FinishReason


def test_plan_follows_the_gold_patch(tmp_path):
    [task] = generate_suite(5, 1, 0, tmp_path / "s")
    plan = oracle_plan(task)
    assert plan[0].startswith("Let me look at") and "<function=view>" in plan[0]
    assert all("<function=str_replace>" in step for step in plan[1:-2])
    assert plan[-1].endswith("<function=submit>\n</function>")


@pytest.mark.skipif(os.geteuid() != 0, reason="ns sandboxes need root")
async def test_oracle_solves_toy_tasks_end_to_end(tmp_path, tiny_tokenizer):
    from sandboxd.client import open_local

    tasks = generate_suite(11, 12, 8, tmp_path / "suite", python="python3")
    oracle = OraclePolicy(tasks, tiny_tokenizer)
    async with open_local("ns") as node:
        sched = Scheduler([node], CallablePolicy(oracle), tiny_tokenizer, grade,
                          SchedulerConfig(grade_timeout_s=120, episode=EpisodeConfig(max_turns=12)))
        groups = await sched.run_groups([(t, 2, t.id) for t in tasks])
    trajs = [r.trajectory for g in groups for r in g]
    solved = sum(bool(t.resolved) for t in trajs)
    assert len(trajs) == 40 and oracle.unknown == 0
    assert solved >= 0.95 * len(trajs), [(r.trajectory.task_id, r.grade) for g in groups for r in g if not r.trajectory.resolved]
    assert all(t.finish_reason == FinishReason.SUBMITTED for t in trajs)
    assert all(t.reward == 1.0 for t in trajs if t.resolved)
