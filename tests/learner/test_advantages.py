"""Reward shaping, group advantages and dynamic sampling, against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from learner.advantages import (
    BatchFiller,
    advantages_by_group,
    group_advantages,
    is_informative,
    soft_overlong_penalty,
    token_advantages,
)

EPS = 1e-6


def test_group_advantages_one_success_in_four():
    # mean 0.25; sample variance (0.75^2 + 3 * 0.25^2) / 3 = 0.25, std 0.5
    assert group_advantages([1.0, 0.0, 0.0, 0.0]) == pytest.approx(
        [0.75 / (0.5 + EPS), -0.25 / (0.5 + EPS), -0.25 / (0.5 + EPS), -0.25 / (0.5 + EPS)], rel=1e-12
    )
    # population variance 0.75 / 4 = 0.1875
    pop_std = 0.1875**0.5
    assert group_advantages([1.0, 0.0, 0.0, 0.0], unbiased=False)[0] == pytest.approx(0.75 / (pop_std + EPS))


def test_group_advantages_zero_when_all_equal_and_for_a_group_of_one():
    assert group_advantages([0.3, 0.3, 0.3]) == [0.0, 0.0, 0.0]
    assert group_advantages([1.0]) == [0.0]
    with pytest.raises(ValueError):
        group_advantages([])


def test_advantages_by_group_normalises_within_each_group_and_keeps_order():
    ids = ["a", "b", "a", "b", "a", "b"]
    rewards = [1.0, 2.0, 0.0, 2.0, 0.0, 5.0]
    out = advantages_by_group(ids, rewards)
    a = group_advantages([1.0, 0.0, 0.0])
    b = group_advantages([2.0, 2.0, 5.0])
    assert out == [a[0], b[0], a[1], b[1], a[2], b[2]]
    assert sum(out[0::2]) == pytest.approx(0.0, abs=1e-12)


def test_token_advantages_broadcast_over_model_tokens_only():
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])
    expected = torch.tensor([[0.0, 2.0, 2.0, 0.0], [0.0, 0.0, -1.0, -1.0]])
    assert torch.equal(token_advantages(adv, mask), expected)


@pytest.mark.parametrize(
    "length, expected",
    [(0, 0.0), (16, 0.0), (17, -0.25), (18, -0.5), (19, -0.75), (20, -1.0), (21, -1.0), (1000, -1.0)],
)
def test_soft_overlong_penalty_piecewise(length, expected):
    # L_max = 20, L_cache = 4: free up to 16 tokens, linear to -1 at 20, -1 beyond
    assert soft_overlong_penalty(length, max_len=20, cache_len=4) == expected


def test_soft_overlong_penalty_rejects_bad_limits():
    with pytest.raises(ValueError):
        soft_overlong_penalty(5, max_len=20, cache_len=0)
    with pytest.raises(ValueError):
        soft_overlong_penalty(5, max_len=20, cache_len=21)


def test_is_informative():
    assert is_informative([0.0, 1.0])
    assert is_informative([1.0, 1.0, 0.9])
    assert not is_informative([1.0, 1.0, 1.0])
    assert not is_informative([0.5])
    assert not is_informative([])


class _Rollout:
    def __init__(self, reward: float):
        self.reward = reward


def test_batch_filler_keeps_informative_groups_until_full():
    filler: BatchFiller[_Rollout] = BatchFiller(num_groups=2)
    solved_all = [_Rollout(1.0), _Rollout(1.0)]
    mixed_1 = [_Rollout(1.0), _Rollout(0.0)]
    mixed_2 = [_Rollout(0.0), _Rollout(0.5)]
    mixed_3 = [_Rollout(0.2), _Rollout(0.0)]

    assert not filler.offer(solved_all)
    assert filler.offer(mixed_1)
    assert not filler.full
    assert not filler.offer([_Rollout(0.0), _Rollout(0.0)])
    assert filler.offer(mixed_2)
    assert filler.full
    assert not filler.offer(mixed_3)  # informative, but the batch is full

    assert filler.groups == [mixed_1, mixed_2]
    assert filler.items() == mixed_1 + mixed_2
    assert filler.metrics() == {
        "sampling/groups_kept": 2.0,
        "sampling/groups_dropped": 2.0,
        "sampling/groups_surplus": 1.0,
        "sampling/drop_frac": 2 / 5,
    }


def test_batch_filler_uses_given_rewards_over_item_rewards():
    # shaped rewards (e.g. with the overlong penalty) decide, not the items' raw rewards
    filler = BatchFiller(num_groups=1)
    group = [_Rollout(1.0), _Rollout(1.0)]
    assert filler.offer(group, rewards=[1.0, 0.75])
    with pytest.raises(ValueError):
        BatchFiller(num_groups=1).offer(group, rewards=[1.0])
