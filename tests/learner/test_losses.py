"""DAPO and SFT losses term by term, against hand-computed values (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from learner.losses import dapo_loss, merge_metrics, sft_loss

F64 = torch.float64


def t(values):
    return torch.tensor(values, dtype=F64)


def test_clipped_surrogate_each_region():
    # token:        0: high clip  1: low clip  2: A>0,r<1  3: A<0,r>1  4: inside  5: A=0   6: observation
    ratios = t([1.5, 0.5, 0.5, 1.5, 1.1, 1.5, 3.0])
    adv = t([1.0, -1.0, 1.0, -1.0, 2.0, 0.0, 100.0])
    mask = t([1, 1, 1, 1, 1, 1, 0])
    old = t([-1.0, -2.0, -0.5, -3.0, -1.2, -0.7, -0.1])
    new = (old + ratios.log()).requires_grad_()

    loss, m = dapo_loss(new, old, adv, mask)

    # min(r A, clip(r, 0.8, 1.28) A) per token: 1.28, -0.8, 0.5, -1.5, 2.2, 0; over 6 model tokens
    assert loss.item() == pytest.approx(-(1.28 - 0.8 + 0.5 - 1.5 + 2.2 + 0.0) / 6, rel=1e-12)
    loss.backward()
    # d loss / d new = -r A / N where the unclipped term is the min, 0 where the clip is active
    expected_grad = t([0.0, 0.0, -0.5 / 6, 1.5 / 6, -2.2 / 6, 0.0, 0.0])
    torch.testing.assert_close(new.grad, expected_grad, rtol=1e-12, atol=1e-15)

    assert m["clip/high_frac"] == pytest.approx(1 / 6)  # token 0 only: A = 0 clips nothing
    assert m["clip/low_frac"] == pytest.approx(1 / 6)  # token 1 only
    assert m["policy/ratio_mean"] == pytest.approx((1.5 + 0.5 + 0.5 + 1.5 + 1.1 + 1.5) / 6)
    k3 = sum(r - 1 - math.log(r) for r in [1.5, 0.5, 0.5, 1.5, 1.1, 1.5]) / 6
    assert m["policy/approx_kl"] == pytest.approx(k3)
    assert m["tokens/model"] == 6
    assert m["loss/policy"] == pytest.approx(loss.item())
    assert "policy/entropy" not in m and "gap/sampler_trainer_abs_mean" not in m


def test_clip_higher_is_asymmetric():
    # r = 1.25 with A > 0 is inside [0.8, 1.28]; r = 0.78 with A < 0 is clipped to 0.8
    old = t([0.0, 0.0])
    new = (old + t([1.25, 0.78]).log()).requires_grad_()
    loss, m = dapo_loss(new, old, t([1.0, -1.0]), t([1, 1]))
    assert loss.item() == pytest.approx(-(1.25 - 0.8) / 2)
    loss.backward()
    torch.testing.assert_close(new.grad, t([-1.25 / 2, 0.0]))
    assert (m["clip/high_frac"], m["clip/low_frac"]) == (0.0, 0.5)

    # and the bounds are the arguments: symmetric 0.2 clips the first token too
    loss, m = dapo_loss(new.detach(), old, t([1.0, -1.0]), t([1, 1]), eps_high=0.2)
    assert loss.item() == pytest.approx(-(1.2 - 0.8) / 2)
    assert m["clip/high_frac"] == 0.5


def test_masked_tokens_contribute_nothing():
    old = t([-1.0, -1.0, -1.0])
    adv = t([1.0, 1.0, 1.0])
    mask = t([1, 0, 1])
    new_a = t([-0.9, -0.5, -1.1]).requires_grad_()
    new_b = t([-0.9, 5.0, -1.1]).requires_grad_()  # only the masked token differs
    adv_b = t([1.0, -50.0, 1.0])
    loss_a, _ = dapo_loss(new_a, old, adv, mask)
    loss_b, m = dapo_loss(new_b, old, adv_b, mask, entropies=t([1.0, 99.0, 3.0]))
    assert loss_a.item() == loss_b.item()
    loss_b.backward()
    assert new_b.grad[1] == 0.0
    assert m["tokens/model"] == 2
    assert m["policy/entropy"] == pytest.approx(2.0)


def test_loss_is_normalised_over_all_tokens_of_the_batch_not_per_sequence():
    # on-policy (ratio 1): sequence 1 has one token with A = +1, sequence 2 three tokens with A = -1
    logp = t([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    adv = t([[1.0, 0.0, 0.0], [-1.0, -1.0, -1.0]])
    mask = t([[1, 0, 0], [1, 1, 1]])
    loss, _ = dapo_loss(logp, logp, adv, mask)
    assert loss.item() == pytest.approx(-(1.0 - 3.0) / 4)  # a mean of sequence means would give 0
    # the batch-wide count, given by the caller for a micro-batch, is the denominator
    loss, m = dapo_loss(logp, logp, adv, mask, num_tokens=8)
    assert loss.item() == pytest.approx(-(1.0 - 3.0) / 8)
    assert m["tokens/model"] == 4


def test_truncated_importance_sampling_weight_is_capped():
    # on-policy in the trainer (ratio 1); sampler disagrees by ln 3 (capped at 2) and ln 0.5
    old = t([-1.0, -2.0])
    sampler = old - t([3.0, 0.5]).log()
    adv = t([1.0, 1.0])
    mask = t([1, 1])
    new = old.clone().requires_grad_()

    loss, m = dapo_loss(new, old, adv, mask, sampler_logprobs=sampler, tis_cap=2.0)
    assert loss.item() == pytest.approx(-(2.0 + 0.5) / 2)
    loss.backward()
    torch.testing.assert_close(new.grad, t([-2.0 / 2, -0.5 / 2]))
    assert m["tis/weight_mean"] == pytest.approx(1.25)
    assert m["tis/capped_frac"] == pytest.approx(0.5)
    assert m["gap/sampler_trainer_abs_mean"] == pytest.approx((math.log(3) + math.log(2)) / 2)
    assert m["gap/sampler_trainer_abs_max"] == pytest.approx(math.log(3))

    # a higher cap lets the weight through; no cap means no correction, but the gap is still measured
    loss, _ = dapo_loss(new, old, adv, mask, sampler_logprobs=sampler, tis_cap=10.0)
    assert loss.item() == pytest.approx(-(3.0 + 0.5) / 2)
    loss, m = dapo_loss(new, old, adv, mask, sampler_logprobs=sampler)
    assert loss.item() == pytest.approx(-1.0)
    assert "tis/weight_mean" not in m and m["gap/sampler_trainer_abs_max"] == pytest.approx(math.log(3))

    with pytest.raises(ValueError, match="sampler_logprobs"):
        dapo_loss(new, old, adv, mask, tis_cap=2.0)


def test_gap_ignores_masked_tokens():
    old = t([-1.0, -1.0])
    loss, m = dapo_loss(old, old, t([0.0, 0.0]), t([1, 0]), sampler_logprobs=t([-1.5, -9.0]))
    assert m["gap/sampler_trainer_abs_max"] == pytest.approx(0.5)
    assert m["gap/sampler_trainer_abs_mean"] == pytest.approx(0.5)


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="one shape"):
        dapo_loss(t([0.0, 0.0]), t([0.0]), t([0.0, 0.0]), t([1, 1]))


def test_sft_loss_is_mean_nll_over_model_tokens():
    logp = t([-1.0, -2.0, -3.0, -4.0]).requires_grad_()
    mask = t([0, 1, 1, 0])
    loss, m = sft_loss(logp, mask)
    assert loss.item() == pytest.approx(2.5)
    loss.backward()
    torch.testing.assert_close(logp.grad, t([0.0, -0.5, -0.5, 0.0]))
    assert m == {"loss/sft": pytest.approx(2.5), "tokens/model": 2.0}
    assert sft_loss(logp, mask, num_tokens=5)[0].item() == pytest.approx(1.0)


def test_merge_metrics_adds_means_and_maxes_maxima():
    a = {"loss/policy": 0.25, "gap/sampler_trainer_abs_max": 0.5, "tokens/model": 3.0}
    b = {"loss/policy": 0.5, "gap/sampler_trainer_abs_max": 0.25, "tokens/model": 4.0}
    assert merge_metrics(merge_metrics({}, a), b) == {
        "loss/policy": 0.75, "gap/sampler_trainer_abs_max": 0.5, "tokens/model": 7.0
    }
