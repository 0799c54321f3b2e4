"""Reward-side math of DAPO, with no model in sight: shaping, group advantages, dynamic sampling.

- `soft_overlong_penalty`: DAPO eq. 13, a length penalty added to the reward.
- `group_advantages` / `advantages_by_group`: GRPO/DAPO outcome advantages,
  A_i = (r_i - mean(r_group)) / (std(r_group) + eps), one number per trajectory that the packer
  broadcasts over the trajectory's model tokens (`token_advantages` does the same for a padded
  (B, T) batch).
- `is_informative` / `BatchFiller`: DAPO dynamic sampling. A group whose rewards are all equal has
  all advantages zero and gives no gradient; it is dropped and more groups are sampled until the
  batch holds B groups. The sampling loop lives with the scheduler; this only keeps the count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

from torch import Tensor

__all__ = [
    "BatchFiller",
    "advantages_by_group",
    "group_advantages",
    "is_informative",
    "soft_overlong_penalty",
    "token_advantages",
]

Item = TypeVar("Item")


def soft_overlong_penalty(length: int, max_len: int, cache_len: int) -> float:
    """DAPO eq. 13, the soft overlong punishment R_length(y) for a response of `length` tokens.

        0                                     if |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
        -1                                    if L_max < |y|

    It ramps linearly from 0 to -1 over the last `cache_len` tokens before `max_len` and is added
    to the task reward before advantages. What |y| counts (model tokens, or the whole context for
    a multi-turn agent that is truncated by its context window) is the caller's choice.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    soft_start = max_len - cache_len
    if length <= soft_start:
        return 0.0
    if length <= max_len:
        return (soft_start - length) / cache_len
    return -1.0


def group_advantages(rewards: Sequence[float], *, eps: float = 1e-6, unbiased: bool = True) -> list[float]:
    """(r_i - mean(r)) / (std(r) + eps) for one group of rollouts of the same task.

    `unbiased=True` uses the sample std (divide by G - 1), as verl's GRPO/DAPO and TRL do;
    `unbiased=False` the population std. A group of one has std 0 by convention (advantage 0).
    """
    g = len(rewards)
    if g == 0:
        raise ValueError("group_advantages: empty group")
    mean = math.fsum(rewards) / g
    dof = g - 1 if unbiased else g
    var = math.fsum((r - mean) ** 2 for r in rewards) / dof if dof > 0 else 0.0
    std = math.sqrt(var)
    return [(r - mean) / (std + eps) for r in rewards]


def advantages_by_group(
    group_ids: Sequence[Hashable], rewards: Sequence[float], *, eps: float = 1e-6, unbiased: bool = True
) -> list[float]:
    """Group-normalised advantage of each item, grouping by id (order of items is kept).

    For trajectories: ``advantages_by_group([t.group_id for t in ts], [t.reward for t in ts])``,
    with rewards already shaped (e.g. plus `soft_overlong_penalty`).
    """
    if len(group_ids) != len(rewards):
        raise ValueError(f"{len(group_ids)} group ids but {len(rewards)} rewards")
    members: dict[Hashable, list[int]] = {}
    for i, gid in enumerate(group_ids):
        members.setdefault(gid, []).append(i)
    out = [0.0] * len(rewards)
    for idx in members.values():
        for i, a in zip(idx, group_advantages([rewards[i] for i in idx], eps=eps, unbiased=unbiased)):
            out[i] = a
    return out


def token_advantages(advantages: Tensor, loss_mask: Tensor) -> Tensor:
    """Broadcast per-sequence advantages (B,) over the model tokens of a (B, T) batch; 0 elsewhere."""
    if advantages.dim() != 1 or loss_mask.dim() != 2 or loss_mask.shape[0] != advantages.shape[0]:
        raise ValueError(f"need advantages (B,) and loss_mask (B, T), got {tuple(advantages.shape)}, "
                         f"{tuple(loss_mask.shape)}")
    return advantages[:, None] * loss_mask.to(advantages.dtype)  # (B, T)


def is_informative(rewards: Sequence[float]) -> bool:
    """True when a group's rewards are not all equal, i.e. its advantages are not all zero."""
    return len(rewards) > 0 and max(rewards) > min(rewards)


class BatchFiller(Generic[Item]):
    """Accumulates informative groups until `num_groups` are kept (DAPO dynamic sampling).

        filler = BatchFiller(num_groups=cfg.batch_groups)
        while not filler.full:
            filler.offer(sample_group())   # a group of G trajectories; kept or dropped
        trajectories = filler.items()

    Groups offered after the batch is full are not kept and count as `surplus` (a sampling loop
    that runs groups concurrently overshoots; the extras are wasted rollouts worth logging).
    """

    def __init__(self, num_groups: int, reward: Callable[[Item], float] = lambda item: item.reward):
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self.num_groups = num_groups
        self._reward = reward  # how to read an item's (shaped) reward when rewards are not given
        self.groups: list[list[Item]] = []
        self.dropped = 0  # groups whose rewards were all equal
        self.surplus = 0  # informative groups offered after the batch was full

    @property
    def full(self) -> bool:
        return len(self.groups) >= self.num_groups

    def offer(self, group: Sequence[Item], rewards: Sequence[float] | None = None) -> bool:
        """Keep `group` if it is informative and there is room; return whether it was kept.

        `rewards` defaults to ``[reward(item) for item in group]``.
        """
        if rewards is None:
            rewards = [self._reward(item) for item in group]
        if len(rewards) != len(group):
            raise ValueError(f"group of {len(group)} items but {len(rewards)} rewards")
        if not is_informative(rewards):
            self.dropped += 1
            return False
        if self.full:
            self.surplus += 1
            return False
        self.groups.append(list(group))
        return True

    def items(self) -> list[Item]:
        """The kept groups, flattened in the order they were kept."""
        return [item for group in self.groups for item in group]

    def metrics(self) -> dict[str, float]:
        offered = len(self.groups) + self.dropped + self.surplus
        return {
            "sampling/groups_kept": float(len(self.groups)),
            "sampling/groups_dropped": float(self.dropped),
            "sampling/groups_surplus": float(self.surplus),
            "sampling/drop_frac": self.dropped / offered if offered else 0.0,
        }
