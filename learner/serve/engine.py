"""The decode engine: sequences decoded together, one token per step, over a shared KV cache.

Synchronous torch code with no trio in it; `learner.serve.server` calls `DecodeBatch.step` in a worker
thread between requests arriving and leaving (continuous batching at token granularity):

- A step first decodes one token for every row already in the batch, in one forward pass of shape
  (B, 1) over the batch's KV cache, then prefills the sequences admitted this step and samples their
  first token. Admitted sequences with the same prompt (the G rollouts of one task) share one prefill.
- The KV cache is one (B, kv_heads, T, head_dim) tensor pair per layer, each row left-padded to the
  longest row; the attention mask hides the padding and `position_ids` carry each row's own positions,
  so a row's logits equal those of the same sequence run alone (to float32 rounding: GEMMs of another
  batch shape sum in another order; measured up to ~1.5e-5 on logprobs).
  Rows join by left-padding (the cache grows to the longer of the two), leave by `index_select`, and
  columns that only hold padding are trimmed.
- A finished sequence leaves its KV cache in a `PrefixCache` (LRU, bounded in tokens): the next turn of
  the same episode (its prompt extends the previous prompt + completion) prefills only the new tokens.
  The server clears it whenever the weights change.
- Sampling uses one `torch.Generator` per sequence (seeded from the request's `seed`), so a sequence's
  tokens do not depend on what else is in the batch: the exponential-race trick (argmax of p / q with
  q ~ Exp(1)) that vLLM's sampler uses, drawn from the row's own generator.

Logprobs follow vLLM's default ``logprobs_mode="raw_logprobs"`` (`vllm/v1/sample/sampler.py`): the
log-softmax of the model's float32 logits *before* temperature, top-k and top-p, i.e. what a
teacher-forced forward pass of the learner computes at temperature 1. ``"processed_logprobs"`` gives the
log-probability under the distribution actually sampled from (logits / T, then top-k/top-p).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .protocol import Completion, IncrementalDetokenizer, SamplingParams, check_stop_strings

__all__ = ["BatchStats", "DecodeBatch", "LogprobsMode", "PrefixCache", "SequenceState"]

LogprobsMode = Literal["raw_logprobs", "processed_logprobs"]


class SequenceState:
    """One sequence being generated: its tokens, logprobs, text, and why it stopped (vLLM's rules)."""

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, *, generator: torch.Generator,
                 eos_token_ids: Iterable[int], max_model_len: int, tokenizer: Any, policy_version: int) -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.generator = generator
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.policy_version = policy_version
        self.output_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] | None = [] if params.logprobs else None
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=params.skip_special_tokens)
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self._truncate_to = -1
        self.cancelled = False  # the caller went away; drop without a result
        self.waiter: Any = None  # the owner's completion signal (a trio.Event in the server)
        self.enqueued_at = 0.0  # when the owner queued it (trio clock, seconds)
        self.failure: BaseException | None = None  # set instead of a result when the request failed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, logprob: float, top: dict[int, float] | None) -> None:
        """Record a sampled token, then apply vLLM's stop checks in vLLM's order.

        Scheduler checks (`vllm/v1/core/sched/utils.py:check_stop`): EOS (unless `ignore_eos`), then
        `stop_token_ids` (`stop_reason` = the id), then the length cap (`max_tokens`, or the context
        `max_model_len`). The stopping token stays in `token_ids`, as in vLLM; its text is left out
        unless `include_stop_str_in_output`. Then the detokenizer's stop strings, which override a
        length finish on the same token (vLLM's output processor does the same).
        """
        self.output_ids.append(token)
        self.logprobs.append(logprob)
        if self.top_logprobs is not None:
            self.top_logprobs.append(top or {})
        p = self.params
        stop_terminated = False
        if not p.ignore_eos and token in self.eos_token_ids:
            self.finish_reason, stop_terminated = "stop", True
        elif token in p.stop_token_ids:
            self.finish_reason, self.stop_reason, stop_terminated = "stop", token, True
        elif (len(self.output_ids) >= p.max_tokens
              or len(self.prompt_ids) + len(self.output_ids) >= self.max_model_len):
            self.finish_reason = "length"
        if stop_terminated and not p.include_stop_str_in_output:
            return
        new_chars = self.detokenizer.push(token)
        match = check_stop_strings(self.detokenizer.text, new_chars, p.stop, p.include_stop_str_in_output)
        if match is not None:
            self.finish_reason, self.stop_reason = "stop", match[0]
            self._truncate_to = match[1]

    def abort(self) -> None:
        if not self.finished:
            self.finish_reason = "abort"

    def result(self) -> Completion:
        text = self.detokenizer.text
        if self._truncate_to >= 0:
            text = text[:self._truncate_to]
        return Completion(token_ids=list(self.output_ids), logprobs=list(self.logprobs),
                          finish_reason=self.finish_reason or "abort", stop_reason=self.stop_reason, text=text,
                          prompt_token_ids=self.prompt_ids, policy_version=self.policy_version,
                          top_logprobs=self.top_logprobs)


@dataclass
class BatchStats:
    """Counters of what the model was asked to do (for tests, metrics and benchmarks)."""

    steps: int = 0
    decode_forwards: int = 0
    prefill_forwards: int = 0
    prefill_shared: int = 0  # admitted sequences that reused another's prefill (same prompt)
    prefill_tokens: int = 0  # prompt tokens run through the model
    prefix_tokens_reused: int = 0  # prompt tokens whose KV came from the prefix cache
    tokens: int = 0
    max_decode_rows: int = 0
    decode_rows: list[int] = field(default_factory=list, repr=False)  # rows per decode forward, last 1024

    def record_decode(self, rows: int) -> None:
        self.decode_forwards += 1
        self.max_decode_rows = max(self.max_decode_rows, rows)
        self.decode_rows.append(rows)
        del self.decode_rows[:-1024]


class DecodeBatch:
    """The sequences decoded together and their left-padded KV cache. Not thread-safe: one caller."""

    def __init__(self, model: nn.Module, *, logprobs_mode: LogprobsMode = "raw_logprobs",
                 prefix_cache_tokens: int = 0) -> None:
        if logprobs_mode not in ("raw_logprobs", "processed_logprobs"):
            raise ValueError(f"logprobs_mode must be 'raw_logprobs' or 'processed_logprobs', got {logprobs_mode!r}")
        self.model = model
        self.logprobs_mode = logprobs_mode
        self.device = next(model.parameters()).device
        self.rows: list[SequenceState] = []
        self._kv: list[tuple[Tensor, Tensor]] = []  # per layer, (B, kv_heads, T, head_dim)
        self._pad: list[int] = []  # left padding of each row in the cache
        self.prefix_cache = PrefixCache(prefix_cache_tokens)
        self.stats = BatchStats()

    def step(self, admitted: Sequence[SequenceState] = ()) -> list[SequenceState]:
        """Decode one token for every row, prefill `admitted`; return the sequences that finished."""
        done = self.remove(lambda s: s.cancelled or s.finished)
        with torch.inference_mode():
            if self.rows:
                self._sample(self.rows, self._decode())
            groups: dict[tuple[int, ...], list[SequenceState]] = {}
            for seq in admitted:
                groups.setdefault(tuple(seq.prompt_ids), []).append(seq)
            for prompt, group in groups.items():
                kv, logits = self._prefill(prompt)
                self.stats.prefill_shared += len(group) - 1
                self._sample(group, logits.expand(len(group), -1))
                self._join(kv, group)
        self.stats.steps += 1
        return done + self.remove(lambda s: s.cancelled or s.finished)

    def remove(self, predicate: Callable[[SequenceState], bool]) -> list[SequenceState]:
        """Drop the rows matching `predicate` from the batch and cache; returns them."""
        keep = [i for i, s in enumerate(self.rows) if not predicate(s)]
        gone = [s for s in self.rows if predicate(s)]
        if not gone:
            return []
        for i, s in enumerate(self.rows):
            if s in gone and not s.cancelled and self.prefix_cache.max_tokens:
                # the row's cache covers prompt + output[:-1]: the last sampled token never went through
                pad = self._pad[i]
                row_kv = [(k[i:i + 1, :, pad:].clone(), v[i:i + 1, :, pad:].clone()) for k, v in self._kv]
                self.prefix_cache.store(s.prompt_ids + s.output_ids[:-1], row_kv)
        if not keep:
            self.rows, self._kv, self._pad = [], [], []
            return gone
        index = torch.tensor(keep, device=self.device)
        kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self._kv]
        pad = [self._pad[i] for i in keep]
        trim = min(pad)  # columns that are padding in every remaining row
        self._kv = [(k[:, :, trim:], v[:, :, trim:]) for k, v in kv] if trim else kv
        self._pad = [p - trim for p in pad]
        self.rows = [self.rows[i] for i in keep]
        return gone

    def _decode(self) -> Tensor:
        from transformers import DynamicCache

        rows = len(self.rows)
        cached = self._kv[0][0].shape[2]
        pad = torch.tensor(self._pad, device=self.device)
        columns = torch.arange(cached + 1, device=self.device)
        attention_mask = (columns[None, :] >= pad[:, None]).long()  # (B, T + 1)
        position_ids = (cached - pad)[:, None]  # (B, 1): tokens already in each row's cache
        input_ids = torch.tensor([[s.output_ids[-1]] for s in self.rows], device=self.device)  # (B, 1)
        cache = DynamicCache(ddp_cache_data=self._kv, config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        self._kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self.stats.record_decode(rows)
        return out.logits[:, -1, :]  # (B, V)

    def _prefill(self, prompt: Sequence[int]) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        from transformers import DynamicCache

        reused, kv = self.prefix_cache.lookup(prompt)
        input_ids = torch.tensor([list(prompt[reused:])], device=self.device)  # (1, L - reused)
        cache = DynamicCache(ddp_cache_data=kv, config=self.model.config) if kv else None
        position_ids = torch.arange(reused, len(prompt), device=self.device)[None, :]
        out = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        self.stats.prefill_forwards += 1
        self.stats.prefill_tokens += len(prompt) - reused
        self.stats.prefix_tokens_reused += reused
        return [(layer.keys, layer.values) for layer in out.past_key_values.layers], out.logits[:, -1, :]

    def _join(self, kv: list[tuple[Tensor, Tensor]], group: list[SequenceState]) -> None:
        n, length = len(group), kv[0][0].shape[2]
        kv = [(k.expand(n, -1, -1, -1).contiguous(), v.expand(n, -1, -1, -1).contiguous()) for k, v in kv]
        if not self.rows:
            self._kv, self._pad = kv, [0] * n
        else:
            cached = self._kv[0][0].shape[2]
            width = max(cached, length)
            self._kv = [(torch.cat([_pad_left(k0, width - cached), _pad_left(k1, width - length)]),
                         torch.cat([_pad_left(v0, width - cached), _pad_left(v1, width - length)]))
                        for (k0, v0), (k1, v1) in zip(self._kv, kv)]
            self._pad = [p + width - cached for p in self._pad] + [width - length] * n
        self.rows.extend(group)

    def _sample(self, rows: Sequence[SequenceState], logits: Tensor) -> None:
        logits = logits.float()  # (B, V)
        raw = torch.log_softmax(logits, dim=-1)
        for i, seq in enumerate(rows):
            p = seq.params
            if p.greedy:
                token, processed = int(torch.argmax(logits[i])), raw[i]
            else:
                processed = torch.log_softmax(_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p), dim=-1)
                race = torch.empty_like(processed).exponential_(generator=seq.generator)
                token = int(torch.argmax(processed.exp() / race))
            scores = raw[i] if self.logprobs_mode == "raw_logprobs" else processed
            top = None
            if p.logprobs:
                values, ids = torch.topk(scores, min(p.logprobs, scores.shape[-1]))
                top = dict(zip(ids.tolist(), values.tolist()))
            seq.append(token, float(scores[token]), top)
            self.stats.tokens += 1


class PrefixCache:
    """KV caches of finished sequences by token prefix, least recently used evicted past `max_tokens`.

    `lookup(prompt)` returns the longest stored prefix shorter than the prompt (at least one token
    must still go through the model to give the next-token logits). 0 tokens disables the cache.
    """

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._entries: collections.OrderedDict[tuple[int, ...], list[tuple[Tensor, Tensor]]] = (
            collections.OrderedDict())
        self._tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def store(self, tokens: Sequence[int], kv: list[tuple[Tensor, Tensor]]) -> None:
        key = tuple(tokens)
        if not key or len(key) > self.max_tokens or key in self._entries:
            return
        self._entries[key] = kv
        self._tokens += len(key)
        while self._tokens > self.max_tokens:
            old, _ = self._entries.popitem(last=False)
            self._tokens -= len(old)

    def lookup(self, prompt: Sequence[int]) -> tuple[int, list[tuple[Tensor, Tensor]]]:
        prompt = tuple(prompt)
        best: tuple[int, ...] = ()
        for key in self._entries:
            if len(best) < len(key) < len(prompt) and prompt[:len(key)] == key:
                best = key
        if not best:
            return 0, []
        self._entries.move_to_end(best)
        return len(best), self._entries[best]

    def clear(self) -> None:
        self._entries.clear()
        self._tokens = 0


def _pad_left(x: Tensor, columns: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, 0, columns, 0)) if columns else x


def _top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Mask logits outside the top-k / the top-p nucleus with -inf (vLLM's `apply_top_k_top_p`)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, index = torch.sort(logits)  # ascending
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1.0 - top_p
        drop[-1] = False  # keep at least the most likely token
        logits = logits.clone()
        logits[index[drop]] = float("-inf")
    return logits
