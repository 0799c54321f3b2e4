"""One optimizer step of each program on a Hugging Face causal LM: DAPO and RFT (SFT).

    rows = pack(samples, cfg.micro_batch_tokens)          # packed micro-batches
    metrics = dapo_step(engine, samples, ...)             # or rft_step(engine, samples, ...)

The forward pass of a packed row runs the model's base (``model.model``) with per-sequence position
ids and a block-causal mask, then `learner.ops.token_logprobs` on the final hidden states of the
positions that carry loss only (prompt and observation positions never reach the LM head), so no
[T, V] tensor exists at any point. Every micro-batch's loss is divided by the model tokens of the
whole (mini-)batch, so accumulated gradients equal one big batch's (`learner.losses`).

DAPO with ``updates > 1`` splits the batch into that many mini-batches of whole rows, one optimizer
step each; the old logprobs are computed once before the first, so the ratio and the clip-higher
bounds bite from the second mini-batch on. With ``updates = 1`` (the default) the step is on-policy:
ratio 1, and the gradient is the plain token-level policy gradient.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .losses import dapo_loss, merge_metrics, sft_loss
from .packing import PackedRow, Sample, pack, total_loss_tokens

__all__ = ["dapo_step", "head_logprobs", "rft_step", "row_hidden", "row_logprobs"]


def _base_and_head(model: nn.Module) -> tuple[nn.Module, Tensor]:
    base = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    if base is None or head is None:
        raise TypeError(f"{type(model).__name__}: expected a Hugging Face causal LM with .model and .lm_head")
    return base, head.weight


def row_hidden(model: nn.Module, row: PackedRow) -> Tensor:
    """Final hidden states (T, H) of a packed row.

    A row of one sequence runs with the model's own causal mask. A row of several runs as a right-padded
    (S, max_len) batch with a padding mask and the rows' position ids, and its valid positions are put back
    in row order: attention then costs sum(len_s^2) instead of the T^2 of one block-causal (T, T) mask
    (5x faster on an 8k-token row of 600-token sequences on CPU, and no (T, T) tensor), and every
    attention implementation reads a padding mask the same way.
    """
    base, _ = _base_and_head(model)
    if row.cu_seqlens.numel() <= 2:
        return base(input_ids=row.input_ids[None], position_ids=row.position_ids[None],
                    use_cache=False).last_hidden_state[0]  # (T, H)
    lengths = row.cu_seqlens[1:] - row.cu_seqlens[:-1]
    valid = torch.arange(int(lengths.max()), device=lengths.device)[None, :] < lengths[:, None]  # (S, L)
    input_ids = row.input_ids.new_zeros(valid.shape).masked_scatter(valid, row.input_ids)
    position_ids = row.position_ids.new_zeros(valid.shape).masked_scatter(valid, row.position_ids)
    hidden = base(input_ids=input_ids, position_ids=position_ids, attention_mask=valid.long(),
                  use_cache=False).last_hidden_state  # (S, L, H)
    return hidden[valid]  # (T, H): row-major over `valid` is the row's order


def head_logprobs(model: nn.Module, hidden: Tensor, row: PackedRow, *, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """(logprobs, entropy) of ``row.targets`` from `hidden`, each (T,), nonzero only where the loss mask is.

    Only positions that carry loss reach the LM head (chunked: never a [T, V] tensor). Under ZeRO-3
    call it inside ``engine.gathered([model.lm_head.weight])``, with the backward.
    """
    _, weight = _base_and_head(model)
    where = row.loss_mask.nonzero().squeeze(-1)  # (N,) positions that carry loss
    logp, ent = torch.zeros_like(row.loss_mask), torch.zeros_like(row.loss_mask)
    if where.numel():
        lp, en = _token_logprobs(hidden.index_select(0, where), weight, row.targets.index_select(0, where),
                                 chunk_size)
        logp = logp.to(lp.dtype).index_put((where,), lp)
        ent = ent.to(en.dtype).index_put((where,), en)
    return logp, ent


def row_logprobs(model: nn.Module, row: PackedRow, *, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """(logprobs, entropy) of a packed row's targets, each (T,) float32 (see `head_logprobs`)."""
    return head_logprobs(model, row_hidden(model, row), row, chunk_size=chunk_size)


def _token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    from .ops import token_logprobs

    return token_logprobs(hidden, weight, targets, chunk_size=chunk_size)


def _world(engine: Any) -> int:
    return int(getattr(engine, "world_size", 1))


def _equalize(engine: Any, rows: list[PackedRow], pad_id: int) -> list[PackedRow]:
    """Under data parallelism every rank must run as many forward/backward passes per step (ZeRO's
    collectives run inside them): pad this rank's rows with loss-free ones up to the largest count."""
    if _world(engine) == 1:
        return rows
    import torch.distributed as dist

    count = torch.tensor([len(rows)], dtype=torch.long)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    filler = pack([Sample([pad_id, pad_id], [0, 0], [0.0, 0.0], 0.0)], 2, pad_id=pad_id)[0]
    return rows + [filler] * (int(count.item()) - len(rows))


def _gather_metrics(engine: Any, metrics: dict[str, float]) -> dict[str, float]:
    """Merge every rank's metrics (their means are already over the global token count)."""
    if _world(engine) == 1:
        return metrics
    import torch.distributed as dist

    everyone: list[Any] = [None] * _world(engine)
    dist.all_gather_object(everyone, metrics)
    merged: dict[str, float] = {}
    for part in everyone:
        merged = merge_metrics(merged, part)
    return merged


def _anchor(hidden: Tensor, head: list[Tensor]) -> Tensor:
    """0, attached to every parameter: a row without loss tokens (a rank's padding) still gives every
    parameter a (zero) gradient, so data-parallel gradient reduction sees the same tensors on every rank."""
    return (hidden.sum() + head[0].sum()) * 0.0


def _split(rows: Sequence[PackedRow], parts: int, *, by_count: bool = False) -> list[list[PackedRow]]:
    """Rows into `parts` consecutive mini-batches of about equal loss tokens (each non-empty); with
    `by_count`, of equal row counts (what several ranks must agree on)."""
    parts = max(1, min(parts, len(rows)))
    if by_count:
        return [list(rows[i * len(rows) // parts:(i + 1) * len(rows) // parts]) for i in range(parts)]
    total = total_loss_tokens(rows)
    out: list[list[PackedRow]] = [[]]
    seen = 0
    for row in rows:
        if out[-1] and len(out) < parts and seen >= total * len(out) / parts:
            out.append([])
        out[-1].append(row)
        seen += row.num_loss_tokens
    return out


def _finish(metrics: dict[str, float], rows: Sequence[PackedRow], started: float) -> dict[str, float]:
    elapsed = time.perf_counter() - started
    tokens = sum(r.num_tokens for r in rows)
    metrics.update({"perf/train_tokens": float(tokens), "perf/train_tokens_per_s": tokens / elapsed if elapsed else 0.0,
                    "perf/micro_batches": float(len(rows)), "time/train_s": elapsed})
    return metrics


def dapo_step(engine: Any, samples: Sequence[Sample], *, micro_batch_tokens: int, chunk_size: int = 1024,
              eps_low: float = 0.2, eps_high: float = 0.28, updates: int = 1, tis_cap: float | None = None,
              pad_id: int = 0) -> dict[str, float]:
    """DAPO on `samples` (advantages already set): `updates` optimizer steps; merged metrics."""
    if not samples and _world(engine) == 1:  # a rank of many may hold none: it pads and takes part
        raise ValueError("dapo_step: no samples (every group was dropped or filtered)")
    started = time.perf_counter()
    model = engine.model
    rows = _equalize(engine, pack(samples, micro_batch_tokens, pad_id=pad_id) if samples else [], pad_id)
    model.train()
    old: list[Tensor] | None = None
    head = [_base_and_head(model)[1]]
    if updates > 1:
        with torch.no_grad():
            old = []
            for r in rows:
                hidden = row_hidden(model, r)
                with engine.gathered(head):
                    old.append(head_logprobs(model, hidden, r, chunk_size=chunk_size)[0])
    metrics: dict[str, float] = {}
    index = {id(r): i for i, r in enumerate(rows)}
    parts = _split(rows, updates, by_count=_world(engine) > 1)
    for part in parts:
        num_tokens = engine.global_sum(total_loss_tokens(part))  # the batch's, over every rank
        part_metrics: dict[str, float] = {}
        for row in part:
            hidden = row_hidden(model, row)
            with engine.gathered(head):
                logp, ent = head_logprobs(model, hidden, row, chunk_size=chunk_size)
                row_old = old[index[id(row)]] if old is not None else logp.detach()
                loss, m = dapo_loss(logp, row_old, row.advantages, row.loss_mask, num_tokens=num_tokens,
                                    eps_low=eps_low, eps_high=eps_high, sampler_logprobs=row.sampler_logprobs,
                                    tis_cap=tis_cap, entropies=ent)
                engine.backward(loss + _anchor(hidden, head))
            part_metrics = merge_metrics(part_metrics, m)
        part_metrics = _gather_metrics(engine, part_metrics)
        part_metrics.update(engine.step())
        # means over mini-batches (each is already a mean over its own tokens), maxima kept, counts added
        for name, value in part_metrics.items():
            if name.endswith("_max"):
                metrics[name] = max(metrics.get(name, value), value)
            elif name == "tokens/model":
                metrics[name] = metrics.get(name, 0.0) + value
            else:
                metrics[name] = metrics.get(name, 0.0) + value / len(parts)
    model.eval()
    metrics["optim/updates"] = float(len(parts))
    return _finish(metrics, rows, started)


def rft_step(engine: Any, samples: Sequence[Sample], *, micro_batch_tokens: int, chunk_size: int = 1024,
             pad_id: int = 0) -> dict[str, float]:
    """One SFT optimizer step on the model tokens of `samples` (resolved trajectories)."""
    if not samples and _world(engine) == 1:
        raise ValueError("rft_step: no samples (no trajectory was resolved)")
    started = time.perf_counter()
    model = engine.model
    rows = _equalize(engine, pack(samples, micro_batch_tokens, pad_id=pad_id) if samples else [], pad_id)
    num_tokens = engine.global_sum(total_loss_tokens(rows))
    if num_tokens == 0:
        raise ValueError("rft_step: the resolved trajectories have no model tokens")
    model.train()
    head = [_base_and_head(model)[1]]
    metrics: dict[str, float] = {}
    for row in rows:
        hidden = row_hidden(model, row)
        with engine.gathered(head):
            logp, ent = head_logprobs(model, hidden, row, chunk_size=chunk_size)
            loss, m = sft_loss(logp, row.loss_mask, num_tokens=num_tokens)
            engine.backward(loss + _anchor(hidden, head))
        m["policy/entropy"] = float((ent.detach() * row.loss_mask).sum() / num_tokens)
        metrics = merge_metrics(metrics, m)
    metrics = _gather_metrics(engine, metrics)
    metrics.update(engine.step())
    model.eval()
    return _finish(metrics, rows, started)
