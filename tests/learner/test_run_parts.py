"""The loop's parts without sandboxes: task cursor, request seeds, checkpoints, metrics log."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from learner import checkpoint as ckpt
from learner.metrics import MetricsLog, read_metrics
from learner.rollouts import SeededPolicy, TaskCursor


def _tasks(n):
    return [SimpleNamespace(id=f"t{i}") for i in range(n)]


def test_task_cursor_batches_are_distinct_and_resume_exactly():
    cursor = TaskCursor(_tasks(5), seed=3)
    batches = [[t.id for t in cursor.take(3)] for _ in range(7)]
    assert all(len(set(b)) == 3 for b in batches)  # distinct even across epoch boundaries
    assert {t for b in batches[:1] for t in b} <= {f"t{i}" for i in range(5)}
    # the same seed gives the same sequence; a cursor restored mid-way continues it
    again = TaskCursor(_tasks(5), seed=3)
    first = [[t.id for t in again.take(3)] for _ in range(3)]
    state = json.loads(json.dumps(again.state()))
    restored = TaskCursor(_tasks(5), seed=3)
    restored.load_state(state)
    rest = [[t.id for t in restored.take(3)] for _ in range(4)]
    assert first + rest == batches
    assert [[t.id for t in TaskCursor(_tasks(5), seed=4).take(3)] for _ in range(7)] != batches
    with pytest.raises(ValueError, match="6 distinct tasks from a set of 5"):
        cursor.take(6)


def test_request_seeds_depend_on_prompt_round_and_repeat_count_not_order():
    policy = SeededPolicy(llm=None, seed=7)
    policy.new_round("dapo:0:0")
    a = [policy.request_seed([1, 2, 3]) for _ in range(4)]  # G rollouts of one prompt
    b = policy.request_seed([1, 2, 4])
    assert len(set(a)) == 4 and b not in a
    policy.new_round("dapo:0:0")
    assert policy.request_seed([1, 2, 4]) == b and [policy.request_seed([1, 2, 3]) for _ in range(4)] == a
    policy.new_round("dapo:1:0")
    assert policy.request_seed([1, 2, 3]) != a[0]
    assert SeededPolicy(llm=None, seed=8).request_seed([1, 2, 3]) != a[0]


class _Tok:
    def save_pretrained(self, path):
        (path / "tokenizer.json").write_text("{}")


def _save(root, step, value):
    from learner.tiny import shared_tokenizer, tiny_model

    model = tiny_model(shared_tokenizer(), seed=0)
    with torch.no_grad():
        next(model.parameters()).fill_(value)
    return ckpt.save(root, step=step, model=model, tokenizer=_Tok(), keep=2,
                     engine_state={"model": model.state_dict(), "optimizer": {"x": value}, "scheduler": {}, "step": step},
                     state={"policy_version": step, "rng": ckpt.capture_rng()})


def test_checkpoints_are_atomic_and_fall_back_to_the_last_good_one(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 1, 1.0)
    _save(root, 2, 2.0)
    _save(root, 3, 3.0)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000002", "step-000003"]  # keep = 2
    assert ckpt.find_latest(root).name == "step-000003"
    loaded = ckpt.load(ckpt.find_latest(root))
    assert loaded.step == 3 and loaded.trainer["optimizer"] == {"x": 3.0} and "model" not in loaded.trainer
    # a kill mid-write leaves a .tmp directory: ignored, and swept by the next save
    (root / ".tmp-step-000004-abc").mkdir()
    (root / ".tmp-step-000004-abc" / "state.json").write_text("{")
    assert ckpt.find_latest(root).name == "step-000003"
    # `latest` naming a checkpoint that lost a file: the newest readable one is used
    (root / "step-000003" / "trainer.pt").unlink()
    assert ckpt.find_latest(root).name == "step-000002"
    _save(root, 4, 4.0)
    assert not list(root.glob(".tmp-*")) and ckpt.find_latest(root).name == "step-000004"
    with pytest.raises(ckpt.CheckpointError, match="trainer.pt"):
        ckpt.load(root / "step-000003")


def test_rng_state_round_trips():
    state = ckpt.capture_rng()
    a = (torch.rand(3), __import__("random").random())
    ckpt.restore_rng(json.loads(json.dumps(state)))
    b = (torch.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_metrics_log_truncates_to_the_checkpoint_and_skips_torn_lines(tmp_path):
    log = MetricsLog.open(tmp_path, tensorboard=False)
    for step in range(1, 5):
        log.log(step, "dapo", {"loss/policy": step / 10, "bad": float("nan")})
    log.close()
    with open(tmp_path / "metrics.jsonl", "ab") as fh:
        fh.write(b'{"step": 5, "sta')  # a kill mid-write
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    resumed = MetricsLog.open(tmp_path, keep_lines=2, tensorboard=False)
    resumed.log(3, "dapo", {"loss/policy": 0.3})
    resumed.close()
    records = list(read_metrics(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3] and records[0]["bad"] is None
    fresh = MetricsLog.open(tmp_path, tensorboard=False)  # a fresh run starts a new file
    fresh.close()
    assert os.path.getsize(tmp_path / "metrics.jsonl") == 0


# --- the loop's DAPO sampling and weight push, against a fake environment ---------------------------


def _trajectory(task_id: str, reward: float, n_model: int = 3):
    from runtime.records import FinishReason, Trajectory, Turn

    return Trajectory(episode_id=f"{task_id}/{reward}", task_id=task_id, group_id=task_id, prompt_ids=[1, 2],
                      turns=[Turn(action_ids=[5] * n_model, action_logprobs=[-1.0] * n_model, observation_ids=[7])],
                      reward=reward, finish_reason=FinishReason.SUBMITTED, policy_version=0, resolved=reward > 0)


class _FakeEnv:
    """Rewards by task: tasks t0..t3 always fail (all-equal groups), the others are mixed."""

    def __init__(self):
        self.calls = []

    async def rollouts(self, groups, *, salt, policy_version, temperature=None):
        self.calls.append([t.id for t, _, _ in groups])
        out = []
        for task, n, _ in groups:
            rewards = [0.0] * n if task.id in ("t0", "t1", "t2", "t3") else [float(i % 2) for i in range(n)]
            out.append([SimpleNamespace(trajectory=_trajectory(task.id, r)) for r in rewards])
        return out


def _run(overrides=()):
    from learner.config import RunConfig, check_config  # noqa: F401
    from learner.run import Console, Run
    from runtime.config import load_config

    cfg = load_config(RunConfig, {"rollout": {"group_size": 4}, "dapo": {"batch_groups": 2, "max_sample_rounds": 3}},
                      list(overrides))
    return Run(cfg, Console(quiet=True))


async def test_dapo_drops_uninformative_groups_and_refills(monkeypatch):
    import learner.run as run_module

    trained = {}

    def fake_step(engine, samples, **kwargs):
        trained["samples"] = samples
        return {"loss/policy": 0.0, "time/train_s": 0.0}

    monkeypatch.setattr(run_module, "dapo_step", fake_step)
    run = _run()
    env = _FakeEnv()
    cursor = TaskCursor(_tasks(8), seed=0)
    first_two = [t.id for t in TaskCursor(_tasks(8), seed=0).take(2)]
    metrics = await run.dapo_iteration(env, engine=None, cursor=cursor)
    assert len(trained["samples"]) == 2 * 4
    assert metrics["sampling/groups_kept"] == 2 and metrics["dapo/skipped"] == 0.0
    # seed 0 orders the tasks t1 t7 | t2 | t4 ...: t1 and t2 always fail (dropped), so two refill rounds
    # sample one group each until two informative groups are kept
    assert first_two == ["t1", "t7"] and env.calls == [["t1", "t7"], ["t2"], ["t4"]]
    assert metrics["sampling/groups_dropped"] == 2 and metrics["sampling/rounds"] == 3
    advantages = sorted({round(s.advantage, 6) for s in trained["samples"]})
    assert len(advantages) == 2 and advantages[0] == -advantages[1]  # group-normalised, mixed 0/1 rewards
    assert metrics["rollout/episodes"] == 4 * sum(len(c) for c in env.calls)


@pytest.mark.parametrize("weight", [0.25, 0.0])
async def test_negative_advantages_are_scaled_by_negative_weight(monkeypatch, weight):
    import learner.run as run_module

    trained = {}

    def fake_step(engine, samples, **kwargs):
        trained["samples"] = samples
        return {"loss/policy": 0.0, "time/train_s": 0.0}

    monkeypatch.setattr(run_module, "dapo_step", fake_step)
    await _run([f"dapo.negative_weight={weight}"]).dapo_iteration(_FakeEnv(), engine=None,
                                                                   cursor=TaskCursor(_tasks(8), seed=0))
    values = sorted({round(s.advantage, 6) for s in trained["samples"]})
    positive = max(values)
    assert positive > 0 and min(values) == pytest.approx(-positive * weight)


async def test_dapo_step_is_skipped_when_no_group_is_informative(monkeypatch):
    import learner.run as run_module

    monkeypatch.setattr(run_module, "dapo_step", lambda *a, **k: pytest.fail("trained on nothing"))
    run = _run(["dapo.max_sample_rounds=2"])
    env = _FakeEnv()
    only_failing = [t for t in _tasks(4)]
    metrics = await run.dapo_iteration(env, engine=None, cursor=TaskCursor(only_failing, seed=0))
    assert metrics["dapo/skipped"] == 1.0 and metrics["sampling/rounds"] == 2 and metrics["sampling/groups_kept"] == 0


async def test_a_weight_push_that_no_endpoint_takes_stops_the_run_and_a_partial_one_does_not(monkeypatch, autojump_clock):
    from learner.weight_sync import RouteFailed, WeightSyncError

    calls = []

    class Sync:
        def __init__(self, updated):
            self.updated = updated

        async def push(self, weights, version):
            calls.append(version)
            raise WeightSyncError("rejected", {"http://a": RouteFailed("http://a", "/update_weights", 400, "no")},
                                  self.updated)

    run = _run(["rollout.push_attempts=2"])
    engine = SimpleNamespace(full_weights=lambda: {})
    with pytest.raises(WeightSyncError):
        await run._push(SimpleNamespace(weight_sync=Sync([])), engine, 1)
    assert calls == [1, 1]  # retried once, then given up
    failed = await run._push(SimpleNamespace(weight_sync=Sync(["http://b"])), engine, 2)
    assert failed == 1


@pytest.mark.parametrize("heldout_from", ["templates", "instances"])
def test_toy_task_sets_hold_out_templates_or_unseen_instances(tmp_path, heldout_from):
    from agent.toy import HELDOUT_TEMPLATES, TRAIN_TEMPLATES
    from learner.config import load_run_config
    from learner.rollouts import load_task_sets

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # the loader never reads the model
    cfg = load_run_config(None, [f"model.path={tmp_path / 'model'}", "tasks.toy_train=6", "tasks.toy_heldout=4", f"tasks.toy_heldout_from={heldout_from}",
                                 f"tasks.workdir={tmp_path}"])
    train, heldout = load_task_sets(cfg, tmp_path)
    assert len(train) == 6 and len(heldout) == 4
    assert {t.split for t in train} == {"train"} and {t.split for t in heldout} == {"heldout"}
    assert {t.metadata["template"] for t in train} <= set(TRAIN_TEMPLATES)
    held_templates = {t.metadata["template"] for t in heldout}
    assert held_templates <= set(HELDOUT_TEMPLATES if heldout_from == "templates" else TRAIN_TEMPLATES)
    assert not {t.id for t in train} & {t.id for t in heldout}
    assert not {t.problem_statement for t in train} & {t.problem_statement for t in heldout}
    # reused, not regenerated: the same tasks on a second call
    again_train, again_heldout = load_task_sets(cfg, tmp_path)
    assert [t.id for t in again_train] == [t.id for t in train]
    assert [t.to_dict() for t in again_heldout] == [t.to_dict() for t in heldout]


def test_final_table_labels_each_evaluation_by_the_stage_that_just_ended():
    from rich.console import Console as RichConsole

    from learner.run import final_table

    records = [{"stage": "eval", "step": 0, "eval/solve_rate": 0.125, "eval/pass@4": 0.25, "eval/reward_mean": 0.1},
               {"stage": "rft", "step": 1}, {"stage": "rft", "step": 2},
               {"stage": "eval", "step": 2, "eval/solve_rate": 0.25},
               {"stage": "dapo", "step": 3}, {"stage": "eval", "step": 3, "eval/solve_rate": float("nan")},
               {"stage": "dapo", "step": 4}, {"stage": "eval", "step": 4, "eval/solve_rate": 0.5}]
    console = RichConsole(width=200, record=True)
    console.print(final_table(records, ["rft", "dapo"], 4))
    rows = [line for line in console.export_text().splitlines() if "%" in line or "during" in line]
    assert [r.split("│")[1].strip() for r in rows] == ["before", "after RFT", "during DAPO", "after DAPO"]
    assert "12.5%" in rows[0] and "25.0%" in rows[0] and "+0.10" in rows[0]
    assert "25.0%" in rows[1] and "50.0%" in rows[3] and "-" in rows[2]
