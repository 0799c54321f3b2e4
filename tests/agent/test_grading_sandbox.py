"""Grading inside real sandboxes: toy tasks in ns sandboxes on the `host` image, as the scheduler runs them."""

from __future__ import annotations

import os

import pytest

from agent.grading import grade
from agent.toy import generate_suite

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="ns sandboxes need root")


async def test_toy_tasks_graded_in_ns_sandboxes(tmp_path):
    from sandboxd.client import open_local

    tasks = generate_suite(3, 4, 2, tmp_path / "suite", python="python3")
    async with open_local("ns") as node:
        for task in tasks:
            async with node.open(task.image, repo=task.repo) as sb:
                snap = await sb.snapshot()
                gold = await grade(task, task.gold_patch, sb, timeout_s=120)
                assert gold.resolved, (task.id, gold.to_dict())
                await sb.restore(snap)
                empty = await grade(task, "", sb, timeout_s=120, allow_empty_patch=True)
                assert not empty.resolved and empty.error is None, (task.id, empty.to_dict())
                assert all(empty.to_dict()["tests"][t] != "PASSED" for t in task.FAIL_TO_PASS)
                await node.delete_snapshot(snap)
