"""A shortened `make demo` in CI: `python -m learner.run learner/configs/demo.toml` with the shipped tiny
policy, one RFT and one DAPO step on a few toy tasks, in real `ns` sandboxes, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from learner import checkpoint as ckpt
from learner.config import DEFAULT_MODEL, load_run_config
from learner.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "learner" / "configs" / "demo.toml"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="ns sandboxes need root")]

SHORT = ["rft.steps=1", "rft.batch_tasks=4", "dapo.steps=1", "dapo.batch_groups=2", "dapo.sample_groups=4",
         "dapo.max_sample_rounds=2", "tasks.toy_train=8", "tasks.toy_heldout=4", "eval.samples=2",
         "eval.viewer_episodes=2", "model.torch_threads=1"]


def test_the_demo_config_uses_the_shipped_policy_on_unseen_task_instances():
    cfg = load_run_config(DEMO)
    assert cfg.model.path == DEFAULT_MODEL and (DEFAULT_MODEL / "model.safetensors").is_file()
    assert cfg.run.stages == ["rft", "dapo"] and cfg.reward.kind == "execution"
    assert cfg.tasks.source == "toy" and cfg.tasks.toy_heldout_from == "instances"
    assert cfg.eval.before and cfg.eval.viewer_episodes > 0
    provenance = json.loads((DEFAULT_MODEL / "provenance.json").read_text())
    assert provenance["command"].startswith("python scripts/make_tiny_policy.py") or "make_tiny_policy" in provenance["command"]
    assert provenance["files"]["model.safetensors"]["bytes"] == (DEFAULT_MODEL / "model.safetensors").stat().st_size


def test_shortened_demo_runs_in_sandboxes_rewards_trains_and_reloads(tmp_path):
    out = tmp_path / "demo"
    argv = [sys.executable, "-m", "learner.run", str(DEMO), f"run.out_dir={out}", f"tasks.workdir={tmp_path / 'tasks'}",
            *SHORT, "--fresh", "--quiet"]
    proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    records = list(read_metrics(out / "metrics.jsonl"))
    assert [(r["step"], r["stage"]) for r in records] == [(0, "eval"), (1, "rft"), (1, "eval"), (2, "dapo"), (2, "eval")]

    # episodes ran in real sandboxes: the tools saw the task's repository, and every episode was graded
    from learner.tiny import load_model
    from runtime.store import TrajectoryStore

    trajectories = list(TrajectoryStore.read(out / "trajectories"))
    assert len(trajectories) >= 4 * 2 + 4 * 4 + 4 * 2  # baseline eval + RFT + DAPO (+ refills, + final eval)
    start_model, tok = load_model(DEFAULT_MODEL)
    observations = [tok.decode(t.observation_ids) for tr in trajectories for t in tr.turns]
    assert any("def " in o and ".py" in o for o in observations), "no tool output from a toy repository"
    # an episode whose sandbox or endpoint failed past its retries ends as `error` (the learner drops
    # it); every other one was graded
    graded = [tr for tr in trajectories if str(getattr(tr.finish_reason, "value", tr.finish_reason)) != "error"]
    assert len(graded) >= 0.75 * len(trajectories)
    assert all(tr.resolved is not None for tr in graded), "an episode was not graded"
    assert any(tr.resolved for tr in graded) and any(tr.patch for tr in graded)
    # rewards arrived: the execution reward is 1 exactly for resolved episodes (less a format penalty)
    for tr in trajectories:
        assert -1.0 <= tr.reward <= 1.0
        if tr.resolved:
            assert tr.reward > 0.5
    for r in records:
        if r["stage"] != "eval":
            assert "rollout/reward_mean" in r and r["rollout/episodes"] > 0
    assert summary["policy_version"] >= 1, "no training step was taken"

    # the weights changed, and the last checkpoint reloads and runs
    latest = ckpt.find_latest(out / "checkpoints")
    assert latest is not None and json.loads((latest / "state.json").read_text())["step"] == 2
    before = load_file(DEFAULT_MODEL / "model.safetensors")
    after = load_file(latest / "model" / "model.safetensors")
    assert before.keys() <= after.keys()  # the checkpoint also names the tied lm_head
    assert max((before[k] - after[k]).abs().max().item() for k in before) > 0
    model, tok2 = load_model(latest / "model")
    assert tok2.get_vocab() == tok.get_vocab()
    ids = torch.tensor([tok.encode("def f():")])
    assert torch.isfinite(model(ids).logits).all()

    # results people look at
    assert (out / "learning_curves.png").stat().st_size > 10_000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    for label in ("before", "after"):
        assert (out / "viewer" / label / "index.html").is_file()
    assert "Held-out evaluation" not in proc.stdout  # the table goes to stderr, the JSON line to stdout
