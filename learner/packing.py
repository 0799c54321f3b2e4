"""From trajectories to packed training rows, and back.

- `Sample`: one sequence as the learner trains on it: token ids, loss mask, sampler logprobs (all
  aligned with the token ids, as `Trajectory` gives them) and the sequence's advantage.
- `dapo_samples` / `rft_samples`: the trajectory filters of the two programs: DAPO drops
  truncated trajectories (overlong filtering, DAPO section 3.4) when asked; RFT keeps only the
  resolved ones.
- `pack`: first-fit-decreasing packing of samples into rows of at most `max_tokens` tokens. In a
  row, position ids restart at 0 for every sequence and `cu_seqlens` holds the boundaries (the
  flash-attn varlen convention); each row is one micro-batch.
- `block_causal_mask`: the (T, T) attention mask that keeps packed sequences apart for eager or
  SDPA attention (flash-attn varlen takes `cu_seqlens` instead); `additive_mask` turns it into the
  float form. With Hugging Face models (checked with transformers 5 Qwen2): pass
  ``mask[None, None]`` as `attention_mask` plus `position_ids`; SDPA takes the bool mask, eager
  needs the additive one (it silently mis-reads a bool mask), and position ids alone isolate
  nothing outside flash-attn. Its cost is T^2 per row: `learner.trainer.row_hidden` instead runs
  a row of several sequences as a right-padded (S, max_len) batch (sum of len^2), and keeps this
  mask for tests and for code that needs one row as one sequence.
- `unpack` / `unpack_rows`: per-position values of a row back to per-sequence tensors.

Alignment in a row: position t holds ``input_ids[t]`` and predicts ``targets[t]``, the next token
of the same sequence; `loss_mask`, `advantages` and `sampler_logprobs` at t describe
``targets[t]``. A sequence's last position has no next token: its target is `pad_id` and its mask
0. (A sequence's first token is a prompt token, never trained, so the shift loses nothing.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from runtime.records import FinishReason, Trajectory

__all__ = [
    "TRUNCATED",
    "PackedRow",
    "additive_mask",
    "Sample",
    "block_causal_mask",
    "dapo_samples",
    "pack",
    "rft_samples",
    "total_loss_tokens",
    "unpack",
    "unpack_rows",
]

# Finish reasons that mean "cut off, not finished" for overlong filtering. Only the context
# window by default: also masking max_turns / timeout would remove every negative signal for an
# agent that never submits.
TRUNCATED: frozenset[FinishReason] = frozenset({FinishReason.CONTEXT_OVERFLOW})


@dataclass(frozen=True)
class Sample:
    token_ids: list[int]
    loss_mask: list[int]  # 1 on model tokens that carry loss
    sampler_logprobs: list[float]  # sampler logprob of each token; 0.0 where loss_mask is 0
    advantage: float

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if n == 0:
            raise ValueError("Sample.token_ids: must not be empty")
        if len(self.loss_mask) != n or len(self.sampler_logprobs) != n:
            raise ValueError(
                f"Sample: token_ids ({n}), loss_mask ({len(self.loss_mask)}) and sampler_logprobs "
                f"({len(self.sampler_logprobs)}) must have one length"
            )

    @classmethod
    def from_trajectory(cls, trajectory: Trajectory, advantage: float, *, skip_format_errors: bool = False) -> Sample:
        return cls(trajectory.token_ids(), trajectory.loss_mask(skip_format_errors=skip_format_errors),
                   trajectory.sampler_logprobs(skip_format_errors=skip_format_errors), advantage)

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)


def dapo_samples(
    trajectories: Sequence[Trajectory],
    advantages: Sequence[float],
    *,
    overlong_filter: bool = True,
    truncated: Collection[FinishReason] = TRUNCATED,
    mask_positive_format_errors: bool = False,
) -> list[Sample]:
    """One `Sample` per trajectory, less the truncated ones when `overlong_filter` is on.

    Advantages are computed on the whole group first (truncated trajectories included), as in
    DAPO; filtering then removes the truncated trajectories' tokens from the loss and from its
    token count, which is the same as masking them and cheaper. With `mask_positive_format_errors`,
    a trajectory with a positive advantage carries no loss on its malformed tool calls (a success
    does not reinforce them; a failure still pushes them down), as RFT masks them.
    """
    if len(trajectories) != len(advantages):
        raise ValueError(f"{len(trajectories)} trajectories but {len(advantages)} advantages")
    return [
        Sample.from_trajectory(t, a, skip_format_errors=mask_positive_format_errors and a > 0)
        for t, a in zip(trajectories, advantages)
        if not (overlong_filter and t.finish_reason in truncated)
    ]


def rft_samples(trajectories: Sequence[Trajectory], *, mask_format_errors: bool = True) -> list[Sample]:
    """Samples of the resolved trajectories (resolved is True; ungraded ones are left out).

    The advantage is 1.0, so the DAPO loss on fresh samples has the SFT loss's gradient; train
    them with `losses.sft_loss`. `mask_format_errors`: the turns whose tool call did not parse carry no
    loss (a resolved episode may have recovered from one; imitating it would teach the malformed
    call), as in rejection fine-tuning with execution feedback (Golubev et al. 2025).
    """
    return [Sample.from_trajectory(t, 1.0, skip_format_errors=mask_format_errors)
            for t in trajectories if t.resolved is True]


def sequence_mean(samples: Sequence[Sample]) -> list[Sample]:
    """`samples` with advantages rescaled so that the token-level loss (sum over tokens / N, N the
    batch's loss tokens) becomes the sequence-level one (each sample's token mean, then the mean over
    the S samples): advantage_i * N / (S * len_i). A positive factor per sample, so the clipped
    objective's sign and clipping are unchanged. Exact with one optimizer step per batch; with
    mini-batches each keeps the whole batch's weights."""
    total = sum(s.num_loss_tokens for s in samples)
    n = sum(1 for s in samples if s.num_loss_tokens)
    return [dataclasses.replace(s, advantage=s.advantage * total / (n * s.num_loss_tokens)) if s.num_loss_tokens else s
            for s in samples]


@dataclass(frozen=True)
class PackedRow:
    """Several sequences in one row: one micro-batch. T is the sum of the sequence lengths."""

    input_ids: Tensor  # (T,) long
    position_ids: Tensor  # (T,) long, 0..len-1 within each sequence
    targets: Tensor  # (T,) long, next token of the same sequence; pad_id at each sequence's end
    loss_mask: Tensor  # (T,) float32, 1 where targets[t] is a model token that carries loss
    advantages: Tensor  # (T,) float32, the sequence's advantage where loss_mask is 1, else 0
    sampler_logprobs: Tensor  # (T,) float32, sampler logprob of targets[t] where loss_mask is 1, else 0
    cu_seqlens: Tensor  # (S + 1,) int32, sequence s occupies [cu_seqlens[s], cu_seqlens[s + 1])
    sample_indices: tuple[int, ...]  # (S,) index of each sequence in the list given to `pack`

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    @property
    def max_seqlen(self) -> int:
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max().item())

    def attention_mask(self) -> Tensor:
        """(T, T) bool, True where query t may attend to key s (see `block_causal_mask`)."""
        return block_causal_mask(self.cu_seqlens)

    def to(self, device: torch.device | str) -> PackedRow:
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return PackedRow(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in fields.items()})


def _first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep order
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def _build_row(samples: Sequence[Sample], indices: list[int], pad_id: int) -> PackedRow:
    ids, pos, tgt, mask, adv, slp, cu = [], [], [], [], [], [], [0]
    for i in indices:
        s = samples[i]
        n = len(s.token_ids)
        ids += s.token_ids
        pos += range(n)
        tgt += s.token_ids[1:] + [pad_id]
        mask += s.loss_mask[1:] + [0]
        adv += [s.advantage * m for m in s.loss_mask[1:]] + [0.0]
        slp += [lp * m for lp, m in zip(s.sampler_logprobs[1:], s.loss_mask[1:])] + [0.0]
        cu.append(cu[-1] + n)
    return PackedRow(
        input_ids=torch.tensor(ids, dtype=torch.long),
        position_ids=torch.tensor(pos, dtype=torch.long),
        targets=torch.tensor(tgt, dtype=torch.long),
        loss_mask=torch.tensor(mask, dtype=torch.float32),
        advantages=torch.tensor(adv, dtype=torch.float32),
        sampler_logprobs=torch.tensor(slp, dtype=torch.float32),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        sample_indices=tuple(indices),
    )


def pack(samples: Sequence[Sample], max_tokens: int, *, pad_id: int = 0) -> list[PackedRow]:
    """Pack samples into rows of at most `max_tokens` tokens (first-fit decreasing by length).

    Every sample appears in exactly one row; a sample longer than `max_tokens` is an error (raise
    `max_tokens` to the context length). Rows are unpadded: flash-attn varlen takes them as they
    are; for a (R, T) batch, pad with positions that no mask selects.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    lengths = [len(s.token_ids) for s in samples]
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(f"sample {i} has {n} tokens, more than max_tokens={max_tokens}")
    return [_build_row(samples, idx, pad_id) for idx in _first_fit_decreasing(lengths, max_tokens)]


def total_loss_tokens(rows: Sequence[PackedRow]) -> int:
    """Model tokens of the whole batch: the `num_tokens` every micro-batch's loss divides by."""
    return sum(row.num_loss_tokens for row in rows)


def block_causal_mask(cu_seqlens: Tensor | Sequence[int], length: int | None = None) -> Tensor:
    """(T, T) bool attention mask for packed sequences: causal within a sequence, nothing across.

    True means "may attend" (the convention of `F.scaled_dot_product_attention`'s boolean
    `attn_mask`). `length` defaults to the last boundary; positions past it (padding) form one
    more causal block of their own, so no query row is fully masked (which would give NaN).
    Memory is T^2 bytes: for CPU tests and eager attention, not for 32k-token rows.
    """
    cu = torch.as_tensor(cu_seqlens, dtype=torch.long)
    total = int(cu[-1]) if length is None else length
    if total < int(cu[-1]):
        raise ValueError(f"length {total} is shorter than the packed sequences ({int(cu[-1])})")
    positions = torch.arange(total, device=cu.device)
    seq_id = torch.searchsorted(cu[1:], positions, right=True)  # (T,), padding gets id S
    same_seq = seq_id[:, None] == seq_id[None, :]  # (T, T)
    causal = positions[:, None] >= positions[None, :]  # (T, T)
    return same_seq & causal


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean "may attend" mask as the float mask attention adds to its scores: 0 where
    attending, the most negative finite `dtype` value elsewhere (finite, so no row gives NaN)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def unpack(values: Tensor, row: PackedRow) -> list[Tensor]:
    """Split a row's per-position values (T, ...) into one tensor per sequence, in row order."""
    if values.shape[0] != row.num_tokens:
        raise ValueError(f"values have {values.shape[0]} positions, the row has {row.num_tokens}")
    return list(torch.split(values, (row.cu_seqlens[1:] - row.cu_seqlens[:-1]).tolist()))


def unpack_rows(values: Sequence[Tensor], rows: Sequence[PackedRow]) -> list[Tensor]:
    """Per-sequence tensors of all rows, in the order of the samples given to `pack`."""
    if len(values) != len(rows):
        raise ValueError(f"{len(values)} value tensors for {len(rows)} rows")
    out: dict[int, Tensor] = {}
    for v, row in zip(values, rows):
        out.update(zip(row.sample_indices, unpack(v, row)))
    return [out[i] for i in range(len(out))]
