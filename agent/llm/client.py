"""`LLMClient`: token-id completions over many vLLM endpoints, with stickiness, retries and draining.

Endpoint life: *up* -> (`failures_to_drain` consecutive failed attempts: connection errors, timeouts,
5xx, unusable answers; an attempt sent before the endpoint's last success came back does not count, so
a burst of requests sent together and timing out together is one piece of evidence) -> *drained*: no new
assignments, its in-flight requests are cancelled and raise `EndpointDown` (the scheduler requeues those
episodes), and every later request naming it raises `EndpointDown` at once -> every `probe_interval_s`
the prober GETs ``/health`` then ``/v1/models`` -> *up* again.

Per attempt: wait for a slot of the endpoint's `CapacityLimiter` (not counted in the deadline), then one
HTTP request under `timeout_s`. Retried (exponential backoff with jitter, up to `retries` more times):
connection errors, timeouts, 408/429/5xx, bodies that are not JSON, and vLLM's ``finish_reason: abort``.
Not retried: context overflow, other 4xx, a response without token ids.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import trio

from .errors import BadResponse, ContextOverflow, EndpointDown, LLMError, RequestTimeout
from .protocol import ParsedCompletion, classify_error, completion_body, parse_completion
from .transport import LeanTransport

__all__ = ["Completion", "EndpointSampler", "LLMClient"]

log = logging.getLogger("swe_dapo.llm")

_HEADERS = {"content-type": "application/json", "accept": "application/json"}


@dataclass(frozen=True, slots=True)
class Completion:
    """One sampled turn, exactly as the server produced it."""

    token_ids: list[int]
    logprobs: list[float]  # one per token id: log p(token) under the sampler
    finish_reason: str  # "stop" (stop token/string or EOS) or "length" (max_tokens reached)
    stop_reason: int | str | None  # the stop token id or stop string; None for EOS or length
    prompt_tokens: int
    endpoint: str
    latency_s: float  # from the call to the answer: slot wait, attempts and backoff included
    attempts: int = 1
    text: str | None = None  # vLLM's detokenised text (the token ids are the truth)


class _Retry(Exception):
    """One attempt failed in a way worth retrying; `counts` says whether it is held against the endpoint."""

    def __init__(self, kind: Literal["timeout", "connect", "status", "json", "abort"], detail: str,
                 *, counts: bool = True) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.counts = kind, detail, counts


class _Endpoint:
    __slots__ = ("url", "completions_url", "limiter", "transports", "free", "up", "failures", "last_error",
                 "success_tick", "episodes", "pending", "scopes", "next_probe", "max_model_len", "stats")

    def __init__(self, url: str, max_inflight: int) -> None:
        self.url = url
        self.completions_url = httpx.URL(url + "/v1/completions")
        self.limiter = trio.CapacityLimiter(max_inflight)
        self.transports: list[httpx.AsyncBaseTransport] = []  # one shared transport, or this endpoint's shards
        self.free: list[int] | None = None  # sharded pool: free slots, as indexes into `transports`
        self.up = True
        self.failures = 0  # consecutive failed attempts (that count: see LLMClient._failed)
        self.last_error = ""
        self.success_tick = 0  # the client's send counter when this endpoint's last success came back
        self.episodes = 0  # assigned by assign_endpoint and not yet released
        self.pending = 0  # complete() calls in progress (waiting for a slot, in flight, or backing off)
        self.scopes: set[trio.CancelScope] = set()  # attempts in flight, cancelled when drained
        self.next_probe = 0.0
        self.max_model_len: int | None = None
        self.stats = dict.fromkeys(("requests", "completions", "retries", "failures", "drains", "readmits",
                                    "assigned"), 0)


def normalize_endpoint(url: str) -> str:
    """``http://h:8000/v1/`` -> ``http://h:8000`` (OpenAI-style base URLs end in /v1; routes are added here)."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"endpoint {url!r}: expected http://host:port")
    return url


class LLMClient:
    """Token-id completions against OpenAI-compatible (vLLM) endpoints; see the module docstring.

    Use as ``async with LLMClient([...], model=...) as llm:``. `pool` picks the HTTP layer, an httpx
    transport: ``"lean"`` (`LeanTransport`, the default and the fastest measured, see bench/llm_client.py;
    http:// only) or ``"sharded"`` (httpcore pools of `connections_per_shard` connections each).
    `transport` replaces both with one httpx transport (tests pass `agent.fake_llm.FakeTransport`); the
    client closes it when it closes, as httpx.AsyncClient does.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        model: str | None,
        max_inflight_per_endpoint: int = 256,  # requests in flight per endpoint (vLLM's max_num_seqs)
        timeout_s: float = 600.0,  # one attempt, from sending to the whole answer
        retries: int = 3,  # attempts after the first
        backoff_base_s: float = 0.5,  # first retry waits about this long, doubling each time ...
        backoff_max_s: float = 10.0,  # ... up to this; each wait is jittered to [50%, 100%]
        failures_to_drain: int = 5,  # consecutive failed attempts that drain an endpoint
        probe_interval_s: float = 5.0,  # how often a drained endpoint is probed
        probe_timeout_s: float = 5.0,
        connect_timeout_s: float = 10.0,
        max_model_len: int | None = None,  # context budget: max_tokens is clamped to it (else the server's)
        temperature: float = 1.0,  # defaults for complete(); RL samples the policy as it is
        top_p: float = 1.0,
        return_token_ids: bool = True,  # False: ids from "token_id:N" logprobs only (no prompt echo)
        pool: Literal["lean", "sharded"] = "lean",
        connections_per_shard: int = 4,
        transport: httpx.AsyncBaseTransport | None = None,
        seed: int | None = None,  # backoff jitter
    ) -> None:
        if not endpoints:
            raise ValueError("LLMClient needs at least one endpoint")
        for name, value in (("max_inflight_per_endpoint", max_inflight_per_endpoint),
                            ("failures_to_drain", failures_to_drain), ("connections_per_shard", connections_per_shard)):
            if value < 1:
                raise ValueError(f"LLMClient: {name} must be >= 1, got {value}")
        if retries < 0:
            raise ValueError(f"LLMClient: retries must be >= 0, got {retries}")
        for name, value in (("timeout_s", timeout_s), ("probe_interval_s", probe_interval_s),
                            ("probe_timeout_s", probe_timeout_s), ("connect_timeout_s", connect_timeout_s)):
            if not value > 0:
                raise ValueError(f"LLMClient: {name} must be > 0, got {value}")
        if pool not in ("lean", "sharded"):
            raise ValueError(f"LLMClient: pool must be 'lean' or 'sharded', got {pool!r}")
        urls = [normalize_endpoint(u) for u in endpoints]
        if len(set(urls)) != len(urls):
            raise ValueError(f"LLMClient: duplicate endpoints in {list(endpoints)}")
        if pool == "lean" and transport is None and any(u.startswith("https://") for u in urls):
            raise ValueError("LLMClient: pool='lean' speaks http:// only; use pool='sharded' for https://")
        self.model = model
        self.max_inflight_per_endpoint = max_inflight_per_endpoint
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.failures_to_drain = failures_to_drain
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_model_len = max_model_len
        self.temperature = temperature
        self.top_p = top_p
        self.return_token_ids = return_token_ids
        self.pool = pool
        self.connections_per_shard = connections_per_shard
        self._transport = transport
        self._rng = random.Random(seed)
        self._endpoints = {u: _Endpoint(u, max_inflight_per_endpoint) for u in urls}
        self._state: Literal["new", "open", "closed"] = "new"
        self._nursery: trio.Nursery | None = None
        self._down_event = trio.Event()
        self._tick = 0  # attempts sent, all endpoints (a logical clock for LLMClient._failed)
        # Per-phase timeouts for the transport; the whole attempt is bounded by timeout_s (a trio deadline).
        self._timeouts = {"connect": connect_timeout_s, "read": None, "write": None, "pool": None}

    # --- lifecycle ------------------------------------------------------------------------------------

    async def __aenter__(self) -> LLMClient:
        if self._state != "new":
            raise LLMError(f"LLMClient is {self._state}: it can be opened once")
        self._open_http()
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        self._nursery.start_soon(self._probe_loop)
        self._state = "open"
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self._state = "closed"
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        try:
            # Not handed the body's exception: it propagates as it is, not wrapped in an ExceptionGroup.
            await self._nursery_cm.__aexit__(None, None, None)
        finally:
            with trio.CancelScope(shield=True):
                await self._close_http()

    def _open_http(self) -> None:
        # The hot path calls the transport (httpx's transport interface) directly: AsyncClient's auth,
        # redirect, cookie and hook layers cost ~80 us a request here and do nothing for this API.
        if self._transport is not None or self.pool == "lean":
            shared = self._transport or LeanTransport(connect_timeout_s=self.connect_timeout_s)
            for ep in self._endpoints.values():
                ep.transports, ep.free = [shared], None
            return
        # Sharded: each shard is a small httpcore pool that never queues (it has as many connections as
        # the slots handed out for it), so the pool's cost per request stays that of a small pool.
        per = self.connections_per_shard
        shards = -(-self.max_inflight_per_endpoint // per)
        limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
        for ep in self._endpoints.values():
            ep.transports = [httpx.AsyncHTTPTransport(limits=limits) for _ in range(shards)]
            ep.free = [i for _ in range(per) for i in range(shards)]

    async def _close_http(self) -> None:
        seen: set[int] = set()
        for ep in self._endpoints.values():
            for transport in ep.transports:
                if id(transport) not in seen:
                    seen.add(id(transport))
                    await transport.aclose()

    async def _request(self, transport: httpx.AsyncBaseTransport, method: str, url: httpx.URL | str,
                       body: bytes = b"") -> tuple[int, bytes]:
        request = httpx.Request(method, url, content=body or None, headers=_HEADERS if body else None,
                                extensions={"timeout": self._timeouts})
        response = await transport.handle_async_request(request)
        try:
            return response.status_code, await response.aread()
        finally:
            await response.aclose()

    def _check_open(self) -> None:
        if self._state != "open":
            raise LLMError("LLMClient is not open: use `async with LLMClient(...) as llm:`"
                           if self._state == "new" else "LLMClient is closed")

    # --- endpoints: assignment, health --------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    def healthy_endpoints(self) -> list[str]:
        return [u for u, ep in self._endpoints.items() if ep.up]

    def _endpoint(self, url: str) -> _Endpoint:
        ep = self._endpoints.get(url)
        if ep is None:
            ep = self._endpoints.get(normalize_endpoint(url))
            if ep is None:
                raise ValueError(f"unknown endpoint {url!r}; the client has {list(self._endpoints)}")
        return ep

    def assign_endpoint(self) -> str:
        """The healthy endpoint with the fewest episodes assigned (then fewest pending requests)."""
        ups = [ep for ep in self._endpoints.values() if ep.up]
        if not ups:
            raise EndpointDown(f"no healthy endpoint (all {len(self._endpoints)} are drained)")
        ep = min(ups, key=lambda e: (e.episodes, e.pending, e.stats["assigned"]))
        ep.episodes += 1
        ep.stats["assigned"] += 1
        return ep.url

    def release_endpoint(self, endpoint: str) -> None:
        """An episode assigned by `assign_endpoint` has ended (keeps the load count of `assign_endpoint`)."""
        ep = self._endpoint(endpoint)
        ep.episodes = max(0, ep.episodes - 1)

    def report_failure(self, endpoint: str, exc: BaseException) -> None:
        """The scheduler's note that an episode on `endpoint` failed; the client's own health check already
        counted every failed attempt, so this only records it."""
        log.info("episode on %s failed: %r", endpoint, exc)

    def sampler(self, endpoint: str) -> EndpointSampler:
        """`complete` bound to one endpoint (the scaffold's `Sampler`)."""
        return EndpointSampler(self, self._endpoint(endpoint).url)

    def _failed(self, ep: _Endpoint, detail: str, sent_tick: int) -> None:
        """An attempt failed. It counts toward draining only if it was sent after the endpoint's last
        success came back: requests sent together that time out together are one piece of evidence, and
        an endpoint that answered since is alive."""
        ep.stats["failures"] += 1
        ep.last_error = detail
        if sent_tick <= ep.success_tick:
            return
        ep.failures += 1
        if ep.up and ep.failures >= self.failures_to_drain:
            self._drain(ep)

    def _drain(self, ep: _Endpoint) -> None:
        # `episodes` is left as it is: the episodes on it fail over and release it (the scheduler
        # releases every endpoint it was assigned), and one that was in a tool call all along may
        # find it back and stay.
        ep.up = False
        ep.stats["drains"] += 1
        ep.next_probe = trio.current_time() + self.probe_interval_s
        for scope in list(ep.scopes):
            scope.cancel()
        log.warning("endpoint %s drained after %d consecutive failures (last: %s)", ep.url, ep.failures,
                    ep.last_error)
        self._down_event.set()

    def _readmit(self, ep: _Endpoint) -> None:
        ep.up = True
        ep.failures = 0
        ep.stats["readmits"] += 1
        log.warning("endpoint %s is back", ep.url)

    def _down_error(self, ep: _Endpoint) -> EndpointDown:
        return EndpointDown(f"{ep.url} is drained after {ep.failures} consecutive failures "
                            f"(last: {ep.last_error})", endpoint=ep.url)

    async def probe(self, endpoint: str) -> bool:
        """GET /health then /v1/models (which must list `model`, when set); records `max_model_len`."""
        ep = self._endpoint(endpoint)
        transport = ep.transports[0]
        try:
            with trio.fail_after(self.probe_timeout_s):
                status, _ = await self._request(transport, "GET", ep.url + "/health")
                if status != 200:
                    return False
                status, content = await self._request(transport, "GET", ep.url + "/v1/models")
                if status != 200:
                    return False
                cards = json.loads(content).get("data") or []
        except (trio.TooSlowError, httpx.HTTPError, OSError, ValueError, AttributeError):
            return False
        for card in cards:
            if isinstance(card, dict) and (self.model is None or card.get("id") == self.model):
                if isinstance(card.get("max_model_len"), int):
                    ep.max_model_len = card["max_model_len"]
                return True
        return False

    async def check_endpoints(self) -> dict[str, bool]:
        """Probe every endpoint now (at start: learns each one's max_model_len); drains those that fail."""
        self._check_open()
        results: dict[str, bool] = {}

        async def one(ep: _Endpoint) -> None:
            results[ep.url] = ok = await self.probe(ep.url)
            if not ok and ep.up:
                ep.last_error = "probe failed: /health or /v1/models"
                self._drain(ep)
            elif ok and not ep.up:
                self._readmit(ep)

        async with trio.open_nursery() as nursery:
            for ep in self._endpoints.values():
                nursery.start_soon(one, ep)
        return results

    async def _probe_loop(self) -> None:
        while True:
            down = [ep for ep in self._endpoints.values() if not ep.up]
            if not down:
                self._down_event = trio.Event()
                await self._down_event.wait()
                continue
            await trio.sleep_until(min(ep.next_probe for ep in down))
            now = trio.current_time()

            async def probe_one(ep: _Endpoint) -> None:
                if await self.probe(ep.url):
                    self._readmit(ep)
                else:
                    ep.next_probe = trio.current_time() + self.probe_interval_s

            async with trio.open_nursery() as nursery:
                for ep in down:
                    if ep.next_probe <= now:
                        nursery.start_soon(probe_one, ep)

    # --- completions ------------------------------------------------------------------------------------

    async def complete(
        self,
        prompt_ids: Sequence[int],
        *,
        max_tokens: int,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        endpoint: str | None = None,
        seed: int | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Completion:
        """Sample one completion of `prompt_ids` on `endpoint` (the episode's: every attempt goes there),
        or, with None, on the least loaded healthy endpoint (a failed attempt moves on to another one).

        Raises `ContextOverflow` when the prompt leaves no room (max_tokens <= 0, or the context budget
        known from `max_model_len` / `/v1/models` is used up; max_tokens is clamped to what is left),
        `EndpointDown`, `RequestTimeout`, `BadResponse`, `RequestRejected`.
        """
        self._check_open()
        started = time.perf_counter()
        prompt = prompt_ids if type(prompt_ids) is list else list(prompt_ids)
        if not prompt:
            raise ValueError("complete: prompt_ids is empty")
        ep = self._endpoint(endpoint) if endpoint is not None else self._endpoints[self._least_loaded()]
        if max_tokens <= 0:
            raise ContextOverflow(f"no room to generate: max_tokens={max_tokens} (prompt of {len(prompt)} tokens)",
                                  endpoint=ep.url)
        budget = ep.max_model_len or self.max_model_len
        if budget is not None:
            room = budget - len(prompt)
            if room <= 0:
                raise ContextOverflow(f"the prompt of {len(prompt)} tokens fills the context of {budget} tokens",
                                      endpoint=ep.url)
            max_tokens = min(max_tokens, room)
        body = completion_body(prompt, model=self.model, max_tokens=max_tokens,
                               temperature=self.temperature if temperature is None else temperature,
                               top_p=self.top_p if top_p is None else top_p, stop=stop,
                               stop_token_ids=stop_token_ids, seed=seed, return_token_ids=self.return_token_ids,
                               extra=extra)
        sticky = endpoint is not None
        attempt = 0
        while True:
            attempt += 1
            ep.pending += 1
            try:
                parsed = await self._attempt(ep, body, prompt, max_tokens)
            except (_Retry, EndpointDown) as exc:
                failure = exc
            else:
                ep.stats["completions"] += 1
                return Completion(parsed.token_ids, parsed.logprobs, parsed.finish_reason, parsed.stop_reason,
                                  parsed.prompt_tokens, ep.url, time.perf_counter() - started, attempt, parsed.text)
            finally:
                ep.pending -= 1
            if isinstance(failure, EndpointDown) and (sticky or attempt > self.retries):
                raise failure
            if isinstance(failure, _Retry) and attempt > self.retries:
                raise self._final_error(ep, failure, attempt) from None
            if sticky and not ep.up:
                raise self._down_error(ep) from None
            ep.stats["retries"] += 1
            failed = ep
            if not sticky:
                ep = self._endpoints[self._least_loaded(avoid=failed)]
            if ep is failed:  # the same endpoint after a backoff; another one at once
                delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
                await trio.sleep(delay * (0.5 + 0.5 * self._rng.random()))

    def _least_loaded(self, avoid: _Endpoint | None = None) -> str:
        """The healthy endpoint with the fewest pending requests, other than `avoid` if there is one."""
        ups = [ep for ep in self._endpoints.values() if ep.up]
        if not ups:
            raise EndpointDown(f"no healthy endpoint (all {len(self._endpoints)} are drained)")
        others = [ep for ep in ups if ep is not avoid]
        return min(others or ups, key=lambda e: e.pending).url

    def _final_error(self, ep: _Endpoint, retry: _Retry, attempts: int) -> LLMError:
        what = f"{ep.url}: {attempts} attempts failed; last: {retry.detail}"
        if retry.kind == "timeout":
            return RequestTimeout(what, endpoint=ep.url)
        if retry.kind == "json":
            return BadResponse(what, endpoint=ep.url)
        return EndpointDown(what, endpoint=ep.url)

    async def _attempt(self, ep: _Endpoint, body: bytes, prompt: list[int], max_tokens: int) -> ParsedCompletion:
        """One request: raises `_Retry` when another attempt may do better, the final error otherwise."""
        tick = self._tick
        try:
            async with ep.limiter:
                if not ep.up:
                    raise self._down_error(ep)
                ep.stats["requests"] += 1
                self._tick = tick = self._tick + 1
                slot = 0 if ep.free is None else ep.free.pop()  # never empty: the limiter has as many slots
                scope = trio.CancelScope(deadline=trio.current_time() + self.timeout_s)
                ep.scopes.add(scope)
                try:
                    with scope:
                        status, content = await self._request(ep.transports[slot], "POST", ep.completions_url, body)
                except httpx.TimeoutException as exc:
                    raise _Retry("timeout", f"timed out: {exc!r}") from None
                except (httpx.TransportError, OSError) as exc:
                    raise _Retry("connect", f"{type(exc).__name__}: {exc}") from None
                finally:
                    ep.scopes.discard(scope)
                    if ep.free is not None:
                        ep.free.append(slot)
                if scope.cancelled_caught:
                    if not ep.up:  # drained while in flight
                        raise self._down_error(ep)
                    raise _Retry("timeout", f"no answer within timeout_s={self.timeout_s}")
            if status != 200:
                error, message = classify_error(status, content, ep.url)
                if error is not None:
                    raise error
                raise _Retry("status", f"HTTP {status}: {message[:300]}", counts=status != 429)
            try:
                data = json.loads(content)
            except ValueError:
                raise _Retry("json", f"the response is not JSON: {content[:200]!r}") from None
            parsed = parse_completion(data, prompt_ids=prompt, max_tokens=max_tokens, endpoint=ep.url)
        except _Retry as retry:
            if retry.counts:
                self._failed(ep, retry.detail, tick)
            raise
        except BadResponse as exc:
            self._failed(ep, str(exc), tick)
            raise
        ep.failures = 0
        ep.success_tick = self._tick
        if parsed.finish_reason == "abort":  # vLLM dropped it (a pause for a weight update): not a failure
            raise _Retry("abort", "the server aborted the request (finish_reason 'abort')", counts=False)
        return parsed

    # --- observability ------------------------------------------------------------------------------------

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per endpoint: up, consecutive failures, episodes, pending, in flight, and counters."""
        return {u: {"up": ep.up, "failures": ep.failures, "episodes": ep.episodes, "pending": ep.pending,
                    "in_flight": ep.limiter.borrowed_tokens, "max_model_len": ep.max_model_len, **ep.stats}
                for u, ep in self._endpoints.items()}


class EndpointSampler:
    """`LLMClient.complete` bound to one endpoint: what one episode samples its turns from."""

    def __init__(self, client: LLMClient, endpoint: str) -> None:
        self.client = client
        self.endpoint = endpoint

    async def complete(self, prompt_ids: Sequence[int], *, max_tokens: int, stop: Sequence[str] = (),
                       stop_token_ids: Sequence[int] = (), **kwargs: Any) -> Completion:
        return await self.client.complete(prompt_ids, max_tokens=max_tokens, stop=stop,
                                          stop_token_ids=stop_token_ids, endpoint=self.endpoint, **kwargs)
