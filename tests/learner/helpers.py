"""Helpers for the learner tests: a tiny causal LM that takes packed rows, and a trajectory builder."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from learner.ops import token_logprobs
from learner.packing import PackedRow
from runtime.records import FinishReason, Trajectory, Turn


class TinyLM(nn.Module):
    """One attention block over learned positions: enough to see packing leaks and learning."""

    def __init__(self, vocab: int = 16, dim: int = 8, max_len: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def hidden(self, input_ids: Tensor, position_ids: Tensor, attn_mask: Tensor) -> Tensor:
        x = self.embed(input_ids) + self.pos(position_ids)  # (T, H)
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (T, H) each
        att = (q @ k.T) / math.sqrt(q.shape[-1])  # (T, T)
        att = att.masked_fill(~attn_mask, float("-inf")).softmax(dim=-1)
        return torch.tanh(x + self.proj(att @ v))  # (T, H)

    def row_logprobs(self, row: PackedRow, chunk_size: int = 5) -> tuple[Tensor, Tensor]:
        h = self.hidden(row.input_ids, row.position_ids, row.attention_mask())
        return token_logprobs(h, self.head.weight, row.targets, chunk_size=chunk_size)


def tiny_lm(seed: int = 0, dtype: torch.dtype = torch.float64) -> TinyLM:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TinyLM().to(dtype)


def trajectory(
    prompt: list[int],
    turns: list[tuple[list[int], list[int]]],
    *,
    reward: float = 0.0,
    group_id: str = "g0",
    finish_reason: FinishReason = FinishReason.SUBMITTED,
    resolved: bool | None = None,
    logprob: float = -1.0,
    episode_id: str = "e",
) -> Trajectory:
    """A trajectory from (action_ids, observation_ids) turns; every sampler logprob is `logprob`."""
    return Trajectory(
        episode_id=episode_id,
        task_id="t",
        group_id=group_id,
        prompt_ids=prompt,
        turns=[Turn(action_ids=a, action_logprobs=[logprob] * len(a), observation_ids=o) for a, o in turns],
        reward=reward,
        finish_reason=finish_reason,
        policy_version=0,
        resolved=resolved,
    )
