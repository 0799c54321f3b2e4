"""`PolicyServer`: the embedded policy server's state machine on trio (requests, pause, weight updates).

One trio task, `run()`, owns the decode loop: it admits queued requests into the `DecodeBatch` (up to
`max_num_seqs` rows), runs one `DecodeBatch.step` in a worker thread (so HTTP and the scheduler stay
responsive), and wakes the requests that finished. Requests arriving during a step join at the next
one: continuous batching at token granularity.

Pause modes are vLLM's (`POST /pause?mode=`, `vllm/entrypoints/serve/dev/rlhf/api_router.py`):
``abort`` (default) ends in-flight and queued requests now with ``finish_reason="abort"`` and their
partial tokens; ``wait`` stops admitting and returns once in-flight requests have finished; ``keep``
freezes in-flight requests in place until `resume` (their KV cache is kept; if weights change
meanwhile they continue on the new weights, so their `policy_version` — that of the first token —
understates). Requests that arrive or are queued while paused wait for `resume`, at most
`pause_wait_s` each, then fail with `ServerBusy` (HTTP 503).

Weight updates follow vLLM's four phases: `init_weight_transfer_engine` (nothing to set up here),
`start_weight_update`, one or more `update_weights` (validated and staged, not yet loaded), then
`finish_weight_update(weight_version)`, which loads the staged tensors between two decode steps and
sets `policy_version`. A rejected `update_weights` aborts the session and leaves the old weights.
`load_state_dict(state, version)` is the same sequence for a state dict in memory.
"""

from __future__ import annotations

import collections
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import torch
import trio
from torch import Tensor, nn

from .engine import BatchStats, DecodeBatch, LogprobsMode, SequenceState
from .protocol import BadRequest, Completion, Conflict, SamplingParams, ServeError, ServerBusy, UpdateRejected
from .weights import apply_update, check_update, read_update

__all__ = ["PAUSE_MODES", "PolicyServer", "ServeConfig"]

PAUSE_MODES = ("abort", "wait", "keep")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    model_name: str = "policy"  # the model id at /v1/models; requests naming another model get 404
    max_num_seqs: int = 32  # rows decoded together (vLLM --max-num-seqs)
    max_waiting: int = 1024  # queued requests beyond the batch; one more gets 503
    max_model_len: int | None = None  # context length in tokens; None: config.max_position_embeddings
    logprobs_mode: LogprobsMode = "raw_logprobs"  # vLLM's default; see learner.serve.engine
    pause_wait_s: float = 600.0  # how long a queued request waits through a pause before 503
    seed: int = 0  # seeds the per-request generators of requests that send no seed
    prefix_cache_tokens: int = 65536  # KV of finished sequences kept for the next turn; 0: off
    max_body_bytes: int = 64 << 20  # HTTP request bodies above this get 413

    def __post_init__(self) -> None:
        if self.prefix_cache_tokens < 0:
            raise ValueError(f"ServeConfig.prefix_cache_tokens must be >= 0, got {self.prefix_cache_tokens}")
        for name in ("max_num_seqs", "max_waiting", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"ServeConfig.max_model_len must be >= 2, got {self.max_model_len}")
        if not self.pause_wait_s > 0:
            raise ValueError(f"ServeConfig.pause_wait_s must be > 0, got {self.pause_wait_s}")
        if self.logprobs_mode not in ("raw_logprobs", "processed_logprobs"):
            raise ValueError(f"ServeConfig.logprobs_mode must be 'raw_logprobs' or 'processed_logprobs', "
                             f"got {self.logprobs_mode!r}")


class PolicyServer:
    """A causal LM served for sampling; start `run()` in a nursery, then call `complete()`.

    The model is used in place: `load_state_dict` and `finish_weight_update` write its parameters.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: ServeConfig = ServeConfig(), *,
                 policy_version: int = 0) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        model_config = model.config
        self.max_model_len = config.max_model_len or int(model_config.max_position_embeddings)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        self._batch = DecodeBatch(model, logprobs_mode=config.logprobs_mode,
                                  prefix_cache_tokens=config.prefix_cache_tokens)
        self._waiting: collections.deque[SequenceState] = collections.deque()
        self._model_lock = trio.Lock()  # held while the model runs or its weights change
        self._lot = trio.lowlevel.ParkingLot()  # woken on every state change
        self._admitting = True
        self._frozen = False
        self._paused_since: float | None = None
        self._seeds = random.Random(config.seed)
        self._policy_version = policy_version
        self._staged: dict[str, Tensor] | None = None  # the weight update in progress
        self._running = False
        self.http_url: str | None = None  # set by open_policy_server when it also listens on TCP

    # --- lifecycle -------------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The decode loop and the pause watchdog; runs until cancelled."""
        if self._running:
            raise RuntimeError("PolicyServer.run is already running")
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._expire_paused_requests)
                task_status.started()
                await self._decode_loop()
        finally:
            self._running = False
            for seq in [*self._batch.remove(lambda s: True), *self._waiting]:
                seq.failure = ServerBusy("the policy server stopped")
                seq.waiter.set()
            self._waiting.clear()

    @property
    def policy_version(self) -> int:
        return self._policy_version

    @property
    def is_paused(self) -> bool:
        return not self._admitting

    @property
    def stats(self) -> BatchStats:
        return self._batch.stats

    def transport(self) -> httpx.AsyncBaseTransport:
        """An httpx transport to this server's HTTP routes with no socket (base URL is arbitrary)."""
        from .http import InProcessTransport, Router

        return InProcessTransport(Router(self))

    # --- sampling --------------------------------------------------------------------------------

    async def complete(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                       **sampling: Any) -> Completion:
        """Sample one continuation of `prompt_ids` (token ids). `sampling`: `SamplingParams` fields.

        Raises `BadRequest` for invalid input, `ServerBusy` when the queue is full or a pause outlasts
        `pause_wait_s`. Matches `agent.scaffold.episode.Sampler`, so the server can stand in for one.
        """
        if params is None:
            params = SamplingParams(**{k: tuple(v) if k in ("stop", "stop_token_ids") and not isinstance(v, str)
                                       else v for k, v in sampling.items()})
        elif sampling:
            raise TypeError("pass either params or keyword sampling fields, not both")
        self._check_prompt(prompt_ids, params)
        if not self._running:
            raise RuntimeError("PolicyServer.run() is not running: start it in a nursery first")
        if len(self._waiting) >= self.config.max_waiting:
            raise ServerBusy(f"{len(self._waiting)} requests already waiting (max_waiting)")
        seq = SequenceState(prompt_ids, params, generator=self._generator(params.seed),
                            eos_token_ids=self.eos_token_ids, max_model_len=self.max_model_len,
                            tokenizer=self.tokenizer, policy_version=self._policy_version)
        seq.waiter, seq.enqueued_at = trio.Event(), trio.current_time()
        self._waiting.append(seq)
        self._lot.unpark_all()
        try:
            await seq.waiter.wait()
        except BaseException:
            seq.cancelled = True
            if seq in self._waiting:
                self._waiting.remove(seq)
            raise
        if seq.failure is not None:
            raise seq.failure
        return seq.result()

    def _check_prompt(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise BadRequest("prompt is empty", param="prompt")
        for i, t in enumerate(prompt_ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise BadRequest(f"prompt[{i}]={t!r} is not a token id in [0, {self.vocab_size})", param="prompt")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise BadRequest(f"'max_tokens' is too large: {params.max_tokens}. This model's maximum context "
                             f"length is {self.max_model_len} tokens and the prompt has {len(prompt_ids)}.",
                             param="max_tokens")

    def _generator(self, seed: int | None) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed((self._seeds.getrandbits(63) if seed is None else seed) % 2**63)
        return gen

    async def _decode_loop(self) -> None:
        while True:
            if self._frozen or not (self._batch.rows or (self._admitting and self._waiting)):
                await self._lot.park()
                continue
            admitted: list[SequenceState] = []
            room = self.config.max_num_seqs - len(self._batch.rows)
            while self._admitting and self._waiting and len(admitted) < room:
                seq = self._waiting.popleft()
                if not seq.cancelled:
                    seq.policy_version = self._policy_version
                    admitted.append(seq)
            try:
                async with self._model_lock:
                    finished = await trio.to_thread.run_sync(self._batch.step, admitted)
            except Exception as exc:  # noqa: BLE001 - fail these requests, keep serving the next ones
                log.error("decode step failed; failing %d sequences", len(self._batch.rows) + len(admitted),
                          exc_info=exc)
                finished = list({id(s): s for s in [*self._batch.rows, *admitted]}.values())
                for seq in finished:
                    seq.cancelled = True  # their KV cache is not trusted: keep it out of the prefix cache
                    seq.failure = ServeError(f"decode step failed: {exc!r}")
                self._batch.remove(lambda s: True)
            for seq in finished:
                seq.waiter.set()
            self._lot.unpark_all()
            await trio.lowlevel.checkpoint()  # let new arrivals queue before the next step

    async def _expire_paused_requests(self) -> None:
        """While paused, fail queued requests that have waited `pause_wait_s` (bounded waits)."""
        limit = self.config.pause_wait_s
        while True:
            if self._paused_since is None or not self._waiting:
                await self._lot.park()
                continue
            now = trio.current_time()
            next_expiry = math.inf
            for seq in list(self._waiting):
                since = max(seq.enqueued_at, self._paused_since)
                if now - since >= limit:
                    self._waiting.remove(seq)
                    seq.failure = ServerBusy(f"the server has been paused for over {limit:g} s (pause_wait_s)")
                    seq.waiter.set()
                else:
                    next_expiry = min(next_expiry, since + limit)
            with trio.move_on_at(next_expiry):
                await self._lot.park()

    # --- pause / resume --------------------------------------------------------------------------

    async def pause(self, mode: str = "abort") -> None:
        """Stop generating (vLLM's modes, see the module docstring); returns when no step is running."""
        if mode not in PAUSE_MODES:
            raise BadRequest(f"mode must be one of {', '.join(PAUSE_MODES)}; got {mode!r}", param="mode")
        self._admitting = False
        if self._paused_since is None:
            self._paused_since = trio.current_time()
        self._frozen = self._frozen or mode == "keep"
        self._lot.unpark_all()
        if mode == "wait":
            while self._batch.rows and not self._frozen:
                await self._lot.park()
        async with self._model_lock:  # wait out a step in flight
            if mode == "abort":
                for seq in [*self._batch.remove(lambda s: True), *self._waiting]:
                    seq.abort()
                    seq.waiter.set()
                self._waiting.clear()

    async def resume(self) -> None:
        self._admitting, self._frozen, self._paused_since = True, False, None
        self._lot.unpark_all()

    # --- weight updates (vLLM's four phases) -----------------------------------------------------

    async def init_weight_transfer_engine(self, init_info: Any) -> None:
        """Nothing to set up for the ``ipc`` and ``disk`` backends; NCCL init info is refused."""
        if not isinstance(init_info, Mapping):
            raise BadRequest(f"init_info must be a JSON object, got {init_info!r:.80}", param="init_info")
        if init_info:
            raise BadRequest(f"the embedded server takes the 'ipc' or 'disk' backend, which need no init_info; "
                             f"got keys {sorted(init_info)} (NCCL rendezvous info is for vLLM)", param="init_info")

    async def start_weight_update(self, *, is_checkpoint_format: bool = True) -> None:
        if not is_checkpoint_format:
            raise BadRequest("only checkpoint-format (Hugging Face) names are supported",
                             param="is_checkpoint_format")
        if self._staged is not None:
            raise Conflict("a weight update is already in progress (start_weight_update called twice)")
        self._staged = {}

    async def update_weights(self, update_info: Any) -> None:
        """Read, validate and stage tensors; a rejection aborts the update session."""
        if self._staged is None:
            raise Conflict("no weight update in progress: call start_weight_update first")
        try:
            tensors = await trio.to_thread.run_sync(read_update, update_info)
            staged = await trio.to_thread.run_sync(check_update, self.model, tensors)
        except BaseException:
            self._staged = None
            raise
        self._staged.update(staged)

    async def finish_weight_update(self, weight_version: Any = None) -> int:
        """Load the staged tensors and set `policy_version` (`weight_version`, or the old one + 1)."""
        if self._staged is None:
            raise Conflict("no weight update in progress (it was never started, or was rejected)")
        staged, self._staged = self._staged, None
        version = self._policy_version + 1 if weight_version is None else _parse_version(weight_version)
        if not staged:
            raise UpdateRejected("no weights were sent between start_weight_update and finish_weight_update")
        async with self._model_lock:
            await trio.to_thread.run_sync(apply_update, self.model, staged)
            self._batch.prefix_cache.clear()  # computed with the old weights
            self._policy_version = version
        return version

    async def load_state_dict(self, state: Mapping[str, Tensor], version: int) -> None:
        """Validate `state` (HF names; a subset is fine), then load it and set `policy_version`."""
        await self.start_weight_update()
        try:
            self._staged = await trio.to_thread.run_sync(check_update, self.model, state)
        except BaseException:
            self._staged = None
            raise
        await self.finish_weight_update(version)


def _parse_version(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise BadRequest(f"weight_version must be a non-negative integer (or its string), got {value!r}",
                     param="weight_version")


def _eos_token_ids(model: nn.Module, tokenizer: Any) -> frozenset[int]:
    """EOS of the tokenizer plus the generation config's (vLLM stops on both)."""
    ids = {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [] if extra is None else [extra])
    return frozenset(int(i) for i in ids)
