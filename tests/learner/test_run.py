"""`python -m learner.run` end to end on real sandboxes with a tiny random model: the loop, its
outputs, bad configs, Ctrl-C, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from learner import checkpoint as ckpt
from learner.config import ConfigError, load_run_config
from learner.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="ns sandboxes need root")]

CONFIG = """
[run]
out_dir = "{out}"
stages = ["rft", "dapo"]
log_level = "ERROR"
[model]
path = "{model}"
torch_threads = 1
[tasks]
toy_train = 4
toy_heldout = 2
workdir = "{tasks}"
[rollout]
group_size = 2
max_turns = 3
max_context_tokens = 1400
max_turn_tokens = 64
[rft]
steps = 1
batch_tasks = 2
[dapo]
steps = 3
batch_groups = 2
max_sample_rounds = 2
[optim]
lr = 0.01
[eval]
samples = 1
viewer_episodes = 2
"""

TRAINING_KEYS = ("loss/policy", "loss/sft", "rollout/reward_mean", "rollout/response_tokens_mean", "optim/grad_norm",
                 "policy/entropy", "sampling/groups_kept", "policy/version", "tokens/model")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from learner.tiny import save_model, shared_tokenizer, tiny_model

    root = tmp_path_factory.mktemp("run")
    tok = shared_tokenizer()
    save_model(tiny_model(tok, seed=0, init_std=0.5), tok, root / "model")
    return root


def _config(setup: Path, name: str) -> Path:
    path = setup / f"{name}.toml"
    path.write_text(CONFIG.format(out=setup / name, model=setup / "model", tasks=setup / "tasks"))
    return path


def _run(config: Path, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen([sys.executable, str(ROOT / "tests/learner/run_driver.py"), str(config), "--quiet", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def _training_records(out_dir: Path) -> list[dict]:
    return [r for r in read_metrics(out_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def uninterrupted(setup):
    config = _config(setup, "straight")
    out, _ = _finish(_run(config, "--fresh"))
    return setup / "straight", json.loads(out.strip().splitlines()[-1])


def test_loop_trains_logs_checkpoints_and_evaluates(uninterrupted, setup):
    out_dir, summary = uninterrupted
    records = _training_records(out_dir)
    stages = [(r["step"], r["stage"]) for r in records]
    # held-out evaluation before training, after RFT alone, and after DAPO
    assert stages == [(0, "eval"), (1, "rft"), (1, "eval"), (2, "dapo"), (3, "dapo"), (4, "dapo"), (4, "eval")]
    dapo = [r for r in records if r["stage"] == "dapo"]
    trained = [r for r in dapo if r.get("dapo/skipped") == 0.0]
    assert trained, "no DAPO step trained: every group was dropped"
    for r in trained:
        assert r["sampling/groups_kept"] >= 1 and r["tokens/model"] > 0
        assert r["clip/high_frac"] == 0.0 and r["policy/ratio_mean"] == pytest.approx(1.0)  # on-policy, 1 update
        assert 0 <= r["gap/sampler_trainer_abs_mean"] < 1e-3  # embedded server vs trainer, float32
    assert summary["policy_version"] == len(trained) + sum(1 for r in records if r.get("rft/skipped") == 0.0)
    assert records[-1]["policy/version"] if "policy/version" in records[-1] else True
    for r in records:
        if r["stage"] != "eval":
            assert r["policy/version"] <= summary["policy_version"] and r["time/step_s"] > 0
    # the weights changed, and the last checkpoint reloads as a Hugging Face model
    latest = ckpt.find_latest(out_dir / "checkpoints")
    assert latest is not None and latest.name == "step-000004"
    start = load_file(setup / "model" / "model.safetensors")
    end = load_file(latest / "model" / "model.safetensors")
    assert max((start[k] - end[k]).abs().max().item() for k in start) > 1e-4
    from learner.tiny import load_model

    model, tok = load_model(latest / "model")
    assert model(torch.tensor([tok.encode("def f():")])).logits.shape[-1] == len(tok)
    state = json.loads((latest / "state.json").read_text())
    assert state["step"] == 4 and state["policy_version"] == summary["policy_version"]
    assert len(list((out_dir / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints
    # results people look at
    assert (out_dir / "learning_curves.png").stat().st_size > 10_000
    assert list((out_dir / "tensorboard").glob("events.out.tfevents.*"))
    for label in ("before", "after"):
        assert (out_dir / "viewer" / label / "index.html").is_file()
    assert summary["before"] is not None and summary["after"] is not None
    from runtime.store import TrajectoryStore

    assert sum(1 for _ in TrajectoryStore.read(out_dir / "trajectories")) >= 4 + 2 + 2


def test_sigkill_then_restart_resumes_exactly(uninterrupted, setup):
    straight_dir, straight_summary = uninterrupted
    config = _config(setup, "killed")
    proc = _run(config, "--fresh")
    latest = setup / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not (latest.exists() and latest.read_text().strip() == "step-000002"):  # mid-way through step 3
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint of step 2"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out, _ = _finish(_run(config))  # run.resume = "auto"
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["policy_version"] == straight_summary["policy_version"]

    a, b = _training_records(straight_dir), _training_records(setup / "killed")
    assert [(r["step"], r["stage"]) for r in a] == [(r["step"], r["stage"]) for r in b]  # no gap, no duplicate
    for ra, rb in zip(a, b):
        for key in TRAINING_KEYS:
            if key in ra or key in rb:
                assert rb.get(key) == pytest.approx(ra.get(key), abs=1e-6, rel=1e-6), (ra["step"], key)
    wa = load_file(straight_dir / "checkpoints" / "step-000004" / "model" / "model.safetensors")
    wb = load_file(setup / "killed" / "checkpoints" / "step-000004" / "model" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


def test_ctrl_c_saves_and_says_how_to_resume(setup):
    config = _config(setup, "interrupted").read_text().replace("checkpoint_every = 1", "")
    path = setup / "interrupted.toml"
    path.write_text(config.replace("[run]\n", "[run]\ncheckpoint_every = 100\n"))
    proc = _run(path, "--fresh")
    metrics = setup / "interrupted" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while sum(1 for _ in read_metrics(metrics)) < 2:  # the baseline eval and step 1 are logged
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "resume with" in err and "--fresh" in err
    saved = ckpt.find_latest(setup / "interrupted" / "checkpoints")
    assert saved is not None and json.loads((saved / "state.json").read_text())["step"] >= 1
    # resume insists on a checkpoint and finds this one
    out, _ = _finish(_run(path, "--resume"))
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 4


@pytest.mark.parametrize("override, field", [
    ("dapo.batchgroups=2", "dapo.batch_groups"),
    ("dapo.batch_groups=0", "dapo.batch_groups"),
    ("rollout.group_size=1", "rollout.group_size"),
    ("train.micro_batch_tokens=512", "train.micro_batch_tokens"),
    ("optim.lr=fast", "optim.lr"),
    ("run.stages=['rft', 'ppo']", "run.stages[1]"),
    ("train.zero_stage=2", "train.zero_stage"),
    ("model.path=/nonexistent", "model.path"),
    ("dapo.negative_weight=1.5", "dapo.negative_weight"),
])
def test_bad_configs_name_the_field(setup, override, field):
    with pytest.raises(ConfigError) as info:
        load_run_config(_config(setup, "bad"), [override])
    assert field in str(info.value)


def test_cli_reports_a_bad_config_without_a_traceback(setup):
    proc = _run(_config(setup, "bad"), "dapo.eps_low=2")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "dapo.eps_low" in err and "Traceback" not in err


def test_resume_must_fails_clearly_without_checkpoint(setup):
    proc = _run(_config(setup, "nothing"), "--resume")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "no complete checkpoint" in err and "Traceback" not in err


def test_two_ranks_under_torchrun_train_like_one(uninterrupted, setup):
    """`torchrun --nproc_per_node 2 -m learner.run ...` with DeepSpeed ZeRO-2 on CPU (gloo): rank 0 runs
    the loop, each rank trains on half of every batch; the first step equals the one-process step."""
    pytest.importorskip("deepspeed")
    straight_dir, _ = uninterrupted
    config = _config(setup, "ranks")
    port = __import__("socket").socket()
    port.bind(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free), str(ROOT / "tests/learner/run_driver.py"), str(config),
                           "train.backend=deepspeed", "train.zero_stage=2", "--quiet", "--fresh"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summary) == 1 and summary[0]["steps"] == 4  # only rank 0 reports
    one, two = _training_records(straight_dir), _training_records(setup / "ranks")
    assert [(r["step"], r["stage"]) for r in one] == [(r["step"], r["stage"]) for r in two]
    first = next(i for i, r in enumerate(one) if r.get("dapo/skipped") == 0.0)
    for key in ("loss/policy", "tokens/model", "rollout/reward_mean", "policy/entropy"):
        assert two[first][key] == pytest.approx(one[first][key], rel=1e-5, abs=1e-6), key
    assert two[first]["optim/grad_norm"] == pytest.approx(one[first]["optim/grad_norm"], rel=1e-4)
