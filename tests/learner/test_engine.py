"""The optimisation engines: TorchEngine against a hand-written AdamW, LR schedules, exact resume,
gradient checkpointing, and DeepSpeed ZeRO-2/3 on CPU (gloo) against TorchEngine.

DeepSpeed tolerance: ZeRO computes the global grad norm in another order (and in float64 under
ZeRO-3) and clips with ``g / ((norm + 1e-6) / clip)`` instead of ``g * (clip / (norm + 1e-6))``, so
the clipped gradients differ from TorchEngine's in the last float32 bits; Adam's normalised update
turns that into weight differences of about 1e-7 per step at lr 1e-3 (measured max 1e-6 here).
The tests allow 2e-6 on weights and AdamW moments and 1e-6 relative on losses; resume of the same
backend is bit-identical.
"""

from __future__ import annotations

import math
import os
import pickle
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from learner.engine import OptimConfig, TorchEngine, lr_factor, make_engine
from learner.losses import dapo_loss
from learner.ops import token_logprobs
from learner.packing import PackedRow, Sample, pack, total_loss_tokens
from tests.learner.helpers import tiny_lm

REPO = Path(__file__).resolve().parents[2]
VOCAB = 64


class _Tok:
    """Just what `learner.tiny.tiny_config` reads from a tokenizer."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self) -> int:
        return VOCAB


def qwen(seed: int = 0):
    from learner.tiny import tiny_model

    return tiny_model(_Tok(), seed=seed, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)


def batches(num_steps: int = 3, seed: int = 0) -> list[list[PackedRow]]:
    """`num_steps` DAPO batches of two packed rows each (two micro-batches per step)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_steps):
        samples = []
        for n, adv in zip([14, 10, 9, 7], [1.0, -0.5, 0.7, -1.2]):
            ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
            mask = [0, 0, 0] + [1] * (n - 3)
            samples.append(Sample(ids, mask, [0.0] * n, adv))
        rows = pack(samples, max_tokens=24)
        assert len(rows) == 2
        out.append(rows)
    return out


def row_loss(engine, row: PackedRow, num_tokens: float) -> torch.Tensor:
    """The DAPO loss of one packed row, as the training loop computes it (chunked logprobs)."""
    model = engine.model
    hidden = model.model(
        input_ids=row.input_ids[None], position_ids=row.position_ids[None],
        attention_mask=row.attention_mask()[None, None],
    ).last_hidden_state[0]  # (T, H)
    with engine.gathered([model.lm_head.weight]):
        logp, _ = token_logprobs(hidden, model.lm_head.weight, row.targets, chunk_size=8)
        loss, _ = dapo_loss(logp, logp.detach() - 0.05, row.advantages, row.loss_mask, num_tokens=num_tokens)
        engine.backward(loss)
    return loss.detach()


def train(engine, steps: list[list[PackedRow]], rows_of_rank=None) -> list[tuple[float, float, float]]:
    """(batch loss, grad norm, lr) per step; `rows_of_rank` picks this rank's micro-batches."""
    out = []
    for rows in steps:
        num_tokens = total_loss_tokens(rows)  # the whole batch, every rank
        mine = rows if rows_of_rank is None else rows_of_rank(rows)
        loss = sum(float(row_loss(engine, row, num_tokens)) for row in mine)
        m = engine.step()
        out.append((engine.global_sum(loss), m["optim/grad_norm"], m["optim/lr"]))
    return out


CFG = OptimConfig(lr=1e-3, weight_decay=0.1, grad_clip=0.05, warmup_steps=2, schedule="cosine", total_steps=5)


# --- TorchEngine --------------------------------------------------------------------------------


def _tiny_lm_loss(model, step: int, micro: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + micro)
    row = pack([Sample(torch.randint(0, 16, (9,), generator=g).tolist(), [0, 0] + [1] * 7, [0.0] * 9,
                       1.0 - 2 * micro)], max_tokens=16)[0]
    logp, _ = model.row_logprobs(row)
    return -(logp * row.advantages.double() * row.loss_mask.double()).sum() / 14


def test_torch_engine_matches_hand_written_adamw():
    cfg = OptimConfig(lr=0.05, weight_decay=0.3, betas=(0.8, 0.95), eps=1e-6, grad_clip=0.5,
                      warmup_steps=2, schedule="cosine", total_steps=4)
    model, ref = tiny_lm(seed=1), tiny_lm(seed=1)
    engine = make_engine(model, cfg)
    params = list(ref.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    clipped = 0
    for step in range(4):
        for micro in range(2):
            engine.backward(_tiny_lm_loss(model, step, micro))
            _tiny_lm_loss(ref, step, micro).backward()
        got = engine.step()

        # AdamW (Loshchilov & Hutter) with decoupled decay on matrices only, global-norm clipping
        grads = [p.grad for p in params]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        scale = min(1.0, 0.5 / (float(norm) + 1e-6))
        clipped += scale < 1
        lr = 0.05 * [0.5, 1.0, 1.0, 0.5][step]  # warmup 2 then cosine over 2 steps
        b1, b2 = 0.8, 0.95
        with torch.no_grad():
            for i, p in enumerate(params):
                g = p.grad * scale
                if p.dim() >= 2:
                    p.mul_(1 - lr * 0.3)
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                m_hat = m[i] / (1 - b1 ** (step + 1))
                v_hat = v[i] / (1 - b2 ** (step + 1))
                p.sub_(lr * m_hat / (v_hat.sqrt() + 1e-6))
                p.grad = None
        assert got["optim/lr"] == pytest.approx(lr, rel=1e-12)
        assert got["optim/grad_norm"] == pytest.approx(float(norm), rel=1e-9)
        assert all(p.grad is None for p in model.parameters())  # step zeroes the grads
    assert clipped >= 2  # the clip was active, so it is tested
    for (name, a), b in zip(model.named_parameters(), params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


def test_lr_schedules():
    const = OptimConfig(lr=2.0, warmup_steps=4)
    assert [const.lr * lr_factor(const, s) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    cos = OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine", total_steps=6)
    expected = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0, 0.0]
    assert [lr_factor(cos, s) for s in range(8)] == pytest.approx(expected, abs=1e-12)
    # the engine applies it: the LR each step reports is the one it stepped with
    engine = make_engine(tiny_lm(), cos)
    seen = []
    for step in range(8):
        engine.backward(_tiny_lm_loss(engine.model, step, 0))
        seen.append(engine.step()["optim/lr"])
    assert seen == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("bad", [dict(schedule="linear"), dict(schedule="cosine", total_steps=0),
                                 dict(lr=0.0), dict(grad_clip=-1.0), dict(betas=(0.9, 1.0))])
def test_bad_optim_config_names_the_field(bad):
    field = next(iter(bad)) if "total_steps" not in bad else "total_steps"
    with pytest.raises(ValueError, match=f"OptimConfig.{field}"):
        OptimConfig(**bad)


def test_state_dict_round_trip_continues_bit_identically():
    steps = batches(num_steps=4)
    engine = make_engine(qwen(seed=0), CFG)
    train(engine, steps[:2])
    state = engine.state_dict()
    frozen = pickle.loads(pickle.dumps(state))
    after = train(engine, steps[2:])
    # the saved state is a copy: training on did not change it
    for key, value in frozen["model"].items():
        assert torch.equal(state["model"][key], value), key
    assert all(t.device.type == "cpu" for t in state["model"].values())

    resumed = make_engine(qwen(seed=7), CFG)  # other initial weights: everything must come from state
    resumed.load_state_dict(frozen)
    assert train(resumed, steps[2:]) == after
    for (name, a), (_, b) in zip(engine.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(engine.optimizer.state.values(), resumed.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def _nan_step_is_skipped(engine) -> None:
    before = {n: w.clone() for n, w in engine.full_weights().items()}
    steps_before = engine.steps
    lr_before = engine.scheduler.last_epoch
    rows = batches(num_steps=1)[0]
    row_loss(engine, rows[0], float("nan"))  # a NaN loss: every gradient is NaN
    got = engine.step()
    assert got["optim/skipped"] == 1.0 and not math.isfinite(got["optim/grad_norm"])  # NaN here, inf on ZeRO
    for n, w in engine.full_weights().items():
        assert torch.equal(w, before[n]), n
    assert engine.steps == steps_before and engine.scheduler.last_epoch == lr_before
    row_loss(engine, rows[0], total_loss_tokens(rows))  # the next step is a normal one
    assert engine.step()["optim/skipped"] == 0.0 and engine.steps == steps_before + 1


def test_non_finite_gradient_skips_the_update():
    _nan_step_is_skipped(make_engine(qwen(), CFG))


def test_full_weights_drop_tied_duplicates():
    engine = make_engine(qwen(), CFG)
    weights = engine.full_weights()
    assert "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights
    assert weights.keys() == {n for n, _ in engine.model.named_parameters()}


def test_gradient_checkpointing_gives_the_same_grads():
    rows = batches(num_steps=1)[0]
    grads, recomputed = [], []
    for checkpointing in (False, True):
        engine = make_engine(qwen(seed=3), CFG, gradient_checkpointing=checkpointing)
        calls = []
        mlp = engine.model.model.layers[0].mlp
        forward = mlp.forward  # wrapped, not hooked: torch does not run forward hooks when it recomputes
        mlp.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
        for row in rows:
            row_loss(engine, row, total_loss_tokens(rows))
        grads.append({n: p.grad.clone() for n, p in engine.model.named_parameters()})
        recomputed.append(len(calls) - len(rows))  # layer forwards beyond one per micro-batch
    assert recomputed == [0, len(rows)]  # checkpointing is on: backward re-ran the layer
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-7, msg=name)


def test_engine_rejects_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        make_engine(qwen(), CFG, backend="fsdp")
    with pytest.raises(ValueError, match="zero_stage"):
        make_engine(qwen(), CFG, zero_stage=2)
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        make_engine(tiny_lm(), CFG, gradient_checkpointing=True)
    with pytest.raises(ValueError, match="missing 'optimizer'"):
        make_engine(qwen(), CFG).load_state_dict({"model": {}, "scheduler": {}, "step": 0})


# --- DeepSpeed ZeRO on CPU ----------------------------------------------------------------------


def _assert_close_states(a: dict, b: dict, atol: float) -> None:
    assert a["step"] == b["step"] and a["scheduler"] == b["scheduler"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=atol, msg=key)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa[i][k], sb[i][k], rtol=0, atol=atol, msg=f"{i}.{k}")
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


@pytest.fixture(scope="module")
def torch_reference():
    steps = batches(num_steps=4)
    engine = make_engine(qwen(seed=0), CFG)
    first = train(engine, steps[:2])
    mid = engine.state_dict()
    rest = train(engine, steps[2:])
    return steps, first + rest, mid, engine.state_dict()


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_torch_engine_and_resumes(stage, torch_reference, monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    steps, ref_metrics, ref_mid, ref_end = torch_reference

    engine = make_engine(qwen(seed=0), CFG, backend="deepspeed", zero_stage=stage)
    assert type(engine).__name__ == "DeepSpeedEngine"
    metrics = train(engine, steps[:2])
    mid = engine.state_dict()
    metrics += train(engine, steps[2:])
    for (loss, norm, lr), (ref_loss, ref_norm, ref_lr) in zip(metrics, ref_metrics):
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        assert norm == pytest.approx(ref_norm, rel=1e-5)
        assert lr == pytest.approx(ref_lr, rel=1e-12)
    _assert_close_states(mid, ref_mid, atol=2e-6)
    end = engine.state_dict()
    _assert_close_states(end, ref_end, atol=2e-6)
    weights = engine.full_weights()
    assert weights.keys() == ref_end["model"].keys() - {"lm_head.weight"}

    # resume from the DeepSpeed state: on DeepSpeed, bit-identical ...
    resumed = make_engine(qwen(seed=5), CFG, backend="deepspeed", zero_stage=stage)
    resumed.load_state_dict(mid)
    assert train(resumed, steps[2:]) == metrics[2:]
    _assert_close_states(resumed.state_dict(), end, atol=0)
    _nan_step_is_skipped(resumed)
    # ... and on TorchEngine (the checkpoint layout is backend-neutral)
    on_torch = make_engine(qwen(seed=5), CFG)
    on_torch.load_state_dict(mid)
    train(on_torch, steps[2:])
    _assert_close_states(on_torch.state_dict(), end, atol=2e-6)


_WORKER = """
import os, sys, torch
sys.path.insert(0, {repo!r})
from learner.engine import make_engine
from tests.learner.test_engine import CFG, batches, qwen, train
rank = int(os.environ["RANK"])
stage = int(sys.argv[1])
steps = batches(num_steps=3)
mine = lambda rows: [rows[rank]]  # one micro-batch per rank
engine = make_engine(qwen(seed=0), CFG, backend="deepspeed", zero_stage=stage)
assert engine.world_size == 2 and engine.rank == rank
metrics = train(engine, steps[:2], rows_of_rank=mine)
mid = engine.state_dict()  # a collective: every rank calls it
metrics += train(engine, steps[2:], rows_of_rank=mine)
end = engine.state_dict()
resumed = make_engine(qwen(seed=5), CFG, backend="deepspeed", zero_stage=stage)
resumed.load_state_dict(mid)  # every rank loads the full state and keeps its partition
again = train(resumed, steps[2:], rows_of_rank=mine)
if rank == 0:
    torch.save({{"metrics": metrics, "state": end, "again": again, "resumed": resumed.state_dict()}}, sys.argv[2])
else:
    resumed.state_dict()
# Leave the group, then exit without interpreter teardown: a rank once aborted there ("terminate called
# without an active exception", exit -6) with DeepSpeed's shared-memory comm op still holding a thread.
torch.distributed.barrier()
torch.distributed.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3])
def test_deepspeed_two_ranks_equal_one_process(stage, tmp_path):
    """World size 2 (two processes, gloo): each rank runs half the micro-batches; the update is the
    whole batch's, as on one process (the loss is scaled back up by the world size); the gathered
    state resumes on two ranks bit-identically."""
    pytest.importorskip("deepspeed")
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(repo=str(REPO)))
    out = tmp_path / "rank0.pt"
    port = str(_free_port())
    procs = []
    try:
        for rank in range(2):
            env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
                       RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port)
            procs.append(subprocess.Popen([sys.executable, str(script), str(stage), str(out)], env=env,
                                          cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, start_new_session=True))
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    got = torch.load(out, weights_only=False)

    steps = batches(num_steps=3)
    ref = make_engine(qwen(seed=0), CFG)
    ref_metrics = train(ref, steps)
    for (loss, norm, _), (ref_loss, ref_norm, _) in zip(got["metrics"], ref_metrics):
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        assert norm == pytest.approx(ref_norm, rel=1e-5)
    _assert_close_states(got["state"], ref.state_dict(), atol=2e-6)
    # resumed on two ranks from the gathered state: bit-identical
    assert got["again"] == got["metrics"][2:]
    _assert_close_states(got["resumed"], got["state"], atol=0)
