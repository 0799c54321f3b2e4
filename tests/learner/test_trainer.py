"""The training step on a real (tiny) Qwen2: packed rows match unpacked ones, DAPO and RFT steps
learn in the right direction, and the DeepSpeed ZeRO engines (CPU, gloo) take the same step as torch."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from learner.engine import OptimConfig, make_engine
from learner.packing import Sample, pack
from learner.tiny import shared_tokenizer, tiny_model
from learner.trainer import dapo_step, rft_step, row_logprobs


def _samples(seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, adv in zip([14, 11, 12, 10], [1.2, -0.8, 0.7, -1.1]):
        ids = torch.randint(3, 500, (n,), generator=g).tolist()
        mask = [0] * 4 + [1] * 3 + [0] * 2 + [1] * (n - 9)  # prompt, action, observation, action
        out.append(Sample(ids, mask, [-2.0 * m for m in mask], advantage=adv))
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_model(shared_tokenizer(), seed=1, init_std=0.3)


def test_packed_rows_give_each_sequence_its_own_logprobs(model):
    samples = _samples()
    packed = pack(samples, max_tokens=64)
    alone = [pack([s], max_tokens=64)[0] for s in samples]
    assert len(packed) == 1 and packed[0].cu_seqlens.numel() == 5
    with torch.no_grad():
        lp_packed = row_logprobs(model, packed[0])[0]
        for i, row in zip(packed[0].sample_indices, [alone[i] for i in packed[0].sample_indices]):
            lo, hi = [int(x) for x in packed[0].cu_seqlens[list(packed[0].sample_indices).index(i):][:2]]
            torch.testing.assert_close(lp_packed[lo:hi], row_logprobs(model, row)[0], atol=2e-5, rtol=0)
    # only model-token positions get a logprob (the LM head never sees the others)
    assert torch.all(lp_packed[packed[0].loss_mask == 0] == 0) and torch.all(lp_packed[packed[0].loss_mask == 1] < 0)


def _seq_logprob(model, sample):
    with torch.no_grad():
        row = pack([sample], max_tokens=64)[0]
        return float((row_logprobs(model, row)[0] * row.loss_mask).sum())


def test_dapo_step_moves_positive_up_and_negative_down(model):
    m = copy.deepcopy(model)
    engine = make_engine(m, OptimConfig(lr=3e-3))
    samples = _samples()
    before = [_seq_logprob(m, s) for s in samples]
    metrics = dapo_step(engine, samples, micro_batch_tokens=24)  # several micro-batches
    after = [_seq_logprob(m, s) for s in samples]
    assert metrics["perf/micro_batches"] >= 2 and metrics["tokens/model"] == sum(s.num_loss_tokens for s in samples)
    for s, b, a in zip(samples, before, after):
        assert (a > b) == (s.advantage > 0), (s.advantage, b, a)
    assert metrics["gap/sampler_trainer_abs_mean"] > 0  # the fake sampler logprobs differ from the model's


def test_dapo_updates_split_the_batch_and_make_clipping_bite(model):
    engine = make_engine(copy.deepcopy(model), OptimConfig(lr=5e-2))
    metrics = dapo_step(engine, _samples(), micro_batch_tokens=16, updates=3)
    assert metrics["optim/updates"] == 3
    assert metrics["clip/low_frac"] + metrics["clip/high_frac"] > 0  # later mini-batches are off-policy


def test_rft_step_raises_the_likelihood_of_kept_trajectories(model):
    m = copy.deepcopy(model)
    samples = [Sample(s.token_ids, s.loss_mask, s.sampler_logprobs, 1.0) for s in _samples(1)]
    before = sum(_seq_logprob(m, s) for s in samples)
    metrics = rft_step(make_engine(m, OptimConfig(lr=3e-3)), samples, micro_batch_tokens=32)
    assert sum(_seq_logprob(m, s) for s in samples) > before + 0.5 and metrics["loss/sft"] > 0
    with pytest.raises(ValueError, match="no samples"):
        rft_step(make_engine(m, OptimConfig(lr=3e-3)), [], micro_batch_tokens=32)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_takes_the_torch_step(model, stage, monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    samples = _samples()
    ref = copy.deepcopy(model)
    dapo_step(make_engine(ref, OptimConfig(lr=3e-3)), samples, micro_batch_tokens=24)
    ds_model = copy.deepcopy(model)
    engine = make_engine(ds_model, OptimConfig(lr=3e-3), backend="deepspeed", zero_stage=stage)
    metrics = dapo_step(engine, samples, micro_batch_tokens=24)
    weights = engine.full_weights()
    # Adam's first step moves every weight by about lr * sign(grad): a gradient of ~1e-9 whose sign
    # differs by summation order moves that weight by up to 2 lr. So: nearly every weight equal to
    # 1e-6, and none off by more than 2 lr.
    diffs = torch.cat([(weights[n].float() - p.detach().float()).abs().flatten()
                       for n, p in ref.named_parameters() if n in weights])
    assert diffs.max() <= 2 * 3e-3 and (diffs > 1e-6).float().mean() < 1e-3, diffs.max()
    assert metrics["optim/grad_norm"] > 0
