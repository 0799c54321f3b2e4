"""The pieces together on a tiny model: micro-batch gradient equality and a DAPO step that learns."""

from __future__ import annotations

import pytest
import torch

from learner.advantages import advantages_by_group
from learner.losses import dapo_loss, merge_metrics, sft_loss
from learner.packing import PackedRow, Sample, dapo_samples, pack, rft_samples, total_loss_tokens, unpack_rows
from runtime.records import FinishReason
from tests.learner.helpers import TinyLM, tiny_lm, trajectory


def _samples() -> list[Sample]:
    g = torch.Generator().manual_seed(3)
    out = []
    for n, adv in zip([9, 7, 6, 5, 4, 3], [1.5, -0.5, 1.0, -1.0, 0.5, -1.5]):
        ids = torch.randint(0, 16, (n,), generator=g).tolist()
        mask = [0, 0] + [1] * (n - 3) + [0]
        lps = [(-4.0 if j % 2 else -1.0) * m for j, m in enumerate(mask)]  # some beyond the TIS cap
        out.append(Sample(ids, mask, lps, advantage=adv))
    return out


def _accumulate(model: TinyLM, rows: list[PackedRow], old: list[torch.Tensor], *, batch_denominator=True):
    """Gradient accumulation over micro-batches as the training loop does it: (grads, metrics)."""
    model.zero_grad()
    num_tokens = total_loss_tokens(rows)
    metrics: dict[str, float] = {}
    for row in rows:
        logp, ent = model.row_logprobs(row)  # (T,)
        row_old = torch.cat([old[i] for i in row.sample_indices])  # (T,)
        loss, m = dapo_loss(
            logp, row_old, row.advantages.double(), row.loss_mask.double(),
            num_tokens=num_tokens if batch_denominator else None,
            sampler_logprobs=row.sampler_logprobs.double(), tis_cap=1.5, entropies=ent,
        )
        loss.backward()
        metrics = merge_metrics(metrics, m)
    return [p.grad.clone() for p in model.parameters()], metrics


def test_micro_batches_give_the_big_batch_gradient():
    model = tiny_lm(seed=1)
    samples = _samples()
    big = pack(samples, max_tokens=64)
    small = pack(samples, max_tokens=12)
    assert len(big) == 1 and len(small) == 3

    # old logprobs as after an earlier optimizer step: off-policy enough that both clips and the
    # TIS cap are active somewhere
    with torch.no_grad():
        now = unpack_rows([model.row_logprobs(row)[0] for row in big], big)
    g = torch.Generator().manual_seed(0)
    old = [lp + 0.4 * torch.randn(lp.shape, generator=g, dtype=lp.dtype) for lp in now]

    big_grads, big_m = _accumulate(model, big, old)
    small_grads, small_m = _accumulate(model, small, old)
    assert big_m["clip/low_frac"] > 0 and big_m["clip/high_frac"] > 0 and big_m["tis/capped_frac"] > 0
    for a, b in zip(big_grads, small_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert small_m.keys() == big_m.keys()
    for name in big_m:
        assert small_m[name] == pytest.approx(big_m[name], rel=1e-9, abs=1e-12), name

    # dividing each micro-batch by its own token count is a different (wrong) gradient
    wrong, _ = _accumulate(model, small, old, batch_denominator=False)
    assert max((a - b).abs().max().item() for a, b in zip(big_grads, wrong)) > 1e-3


def _sequence_logprobs(model: TinyLM, rows: list[PackedRow]) -> list[float]:
    """Sum of logprobs over the model tokens of each sample, in sample order."""
    with torch.no_grad():
        per_row = [model.row_logprobs(row)[0] * row.loss_mask for row in rows]
    return [lp.sum().item() for lp in unpack_rows(per_row, rows)]


def test_dapo_step_raises_positive_and_lowers_negative_advantage_tokens():
    good = trajectory([1, 2], [([3, 4], [7]), ([5], [])], reward=1.0, group_id="a")
    bad = trajectory([1, 2], [([6, 8], [7]), ([9], [])], reward=0.0, group_id="a")
    cut = trajectory([1, 2], [([10, 11], [12])], reward=0.0, group_id="a",
                     finish_reason=FinishReason.CONTEXT_OVERFLOW)
    trajs = [good, bad, cut]
    adv = advantages_by_group([t.group_id for t in trajs], [t.reward for t in trajs])
    assert adv[0] > 0 > adv[1]
    samples = dapo_samples(trajs, adv)  # the truncated one is filtered out
    assert len(samples) == 2
    rows = pack(samples, max_tokens=64)

    model = tiny_lm(seed=2)
    before = _sequence_logprobs(model, rows)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    num_tokens = total_loss_tokens(rows)
    for row in rows:
        logp, _ = model.row_logprobs(row)
        loss, m = dapo_loss(logp, logp.detach(), row.advantages.double(), row.loss_mask.double(),
                            num_tokens=num_tokens)
        loss.backward()
    assert m["policy/ratio_mean"] == 1.0 and m["clip/high_frac"] == 0.0  # on-policy
    opt.step()
    after = _sequence_logprobs(model, rows)

    assert after[0] > before[0] + 0.05  # positive advantage: more likely
    assert after[1] < before[1] - 0.05  # negative advantage: less likely


def test_rft_step_raises_resolved_trajectory_logprobs():
    trajs = [
        trajectory([1, 2], [([3, 4], [])], resolved=True),
        trajectory([1, 2], [([5, 6], [])], resolved=False),
    ]
    rows = pack(rft_samples(trajs), max_tokens=64)
    model = tiny_lm(seed=3)
    before = _sequence_logprobs(model, rows)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for row in rows:
        loss, m = sft_loss(model.row_logprobs(row)[0], row.loss_mask.double(),
                           num_tokens=total_loss_tokens(rows))
        loss.backward()
    opt.step()
    assert m["tokens/model"] == 2
    assert _sequence_logprobs(model, rows)[0] > before[0] + 0.05
