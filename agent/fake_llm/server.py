"""The fake server's logic (`FakeLLM.handle`: request bytes in, reply out) and its two fronts.

`FakeLLM` knows the routes, vLLM's request fields and response shape, the policy, latency and faults,
and does no I/O of its own: `FakeTransport` calls it as an httpx transport (in process, no socket) and
`serve_http` calls it from a trio + h11 HTTP/1.1 server on a socket. Both turn a `Reply` marked
`disconnect` into a connection dropped in the middle of the response, and a hang into a handler that
never returns (the client's deadline has to end it).
"""

from __future__ import annotations

import inspect
import itertools
import json
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import h11
import httpx
import trio

from .policies import CompletionRequest, Generation, Policy, RandomPolicy, fake_logprob

__all__ = ["Faults", "FakeLLM", "FakeTransport", "Reply", "open_fake_server", "parse_latency", "serve_http"]

Latency = float | Callable[[random.Random], float]
_FAULTS = ("error_rate", "hang_rate", "disconnect_rate", "malformed_rate", "missing_token_ids_rate", "abort_rate")


@dataclass(frozen=True, slots=True)
class Faults:
    """Fractions of `/v1/completions` requests that fail, each in its own way (one draw per request)."""

    error_rate: float = 0.0  # 500 with vLLM's error body
    hang_rate: float = 0.0  # never answered
    disconnect_rate: float = 0.0  # the connection drops halfway through the response body
    malformed_rate: float = 0.0  # 200 with a body that is not JSON
    missing_token_ids_rate: float = 0.0  # 200 with neither choice.token_ids nor "token_id:N" logprob tokens
    abort_rate: float = 0.0  # 200 with finish_reason "abort" (vLLM dropped the request, e.g. for a weight update)

    def __post_init__(self) -> None:
        for name in _FAULTS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Faults.{name} must be in [0, 1], got {value}")
        if self.total > 1.0:
            raise ValueError(f"Faults: the rates add up to {self.total} > 1")

    @property
    def total(self) -> float:
        return sum(getattr(self, name) for name in _FAULTS)

    def draw(self, rng: random.Random) -> str | None:
        """The fault for one request, or None."""
        if not self.total:
            return None
        r = rng.random()
        for name in _FAULTS:
            rate = getattr(self, name)
            if r < rate:
                return name.removesuffix("_rate")
            r -= rate
        return None


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: bytes = b"application/json"
    disconnect: bool = False  # drop the connection after half of the body


def parse_latency(spec: str) -> Latency:
    """``0.05`` (fixed seconds), ``exp:0.05`` (exponential, mean), ``uniform:0.01:0.1``, ``lognormal:mu:sigma``."""
    kind, _, rest = spec.partition(":")
    try:
        if not rest:
            return float(kind)
        args = [float(x) for x in rest.split(":")]
        if kind == "exp" and len(args) == 1:
            return lambda rng: rng.expovariate(1.0 / args[0]) if args[0] > 0 else 0.0
        if kind == "uniform" and len(args) == 2:
            return lambda rng: rng.uniform(args[0], args[1])
        if kind == "lognormal" and len(args) == 2:
            return lambda rng: rng.lognormvariate(args[0], args[1])
    except ValueError:
        pass
    raise ValueError(f"latency: expected SECONDS, exp:MEAN, uniform:LOW:HIGH or lognormal:MU:SIGMA, got {spec!r}")


def _error(status: int, message: str, kind: str, param: str | None = None) -> Reply:
    # vLLM's ErrorResponse (newer releases nest it under "error"; older ones sent the fields at the top).
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return Reply(status, json.dumps(body).encode())


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _int_list(value: Any, name: str) -> list[int]:
    # set(map(type, ...)) and min() run in C: this check is on every prompt token.
    if not isinstance(value, list) or (value and (set(map(type, value)) != {int} or min(value) < 0)):
        raise _BadRequest(f"'{name}' must be a list of non-negative integers", name)
    return value


class FakeLLM:
    """An OpenAI-compatible completions server speaking vLLM's token-id fields; see the package docstring.

    `decode` (token ids -> text) is optional: without it the text is empty and stop strings are ignored;
    `encode` (text -> ids) lets text prompts through. `down = True` makes the server refuse connections
    (in process) or drop them (on a socket) until it is set back.
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        model: str = "fake-model",
        max_model_len: int | None = None,
        latency_s: Latency = 0.0,
        tokens_per_s: float | None = None,  # added latency: generated tokens / this rate
        faults: Faults = Faults(),
        seed: int = 0,
        decode: Callable[[Sequence[int]], str] | None = None,
        encode: Callable[[str], Sequence[int]] | None = None,
        eos_token_id: int | None = None,
        supports_return_token_ids: bool = True,  # False: behave as vLLM < 0.10.2 (the field is ignored)
        keep_alive: bool = True,  # False (socket only): close each connection after answering, unannounced,
        #                           as a server whose keep-alive timer ran out
        history: int = 1024,  # how many parsed requests `seen` keeps
    ) -> None:
        self.policy: Policy = policy if policy is not None else RandomPolicy(seed=seed)
        self.model = model
        self.max_model_len = max_model_len
        self.latency_s = latency_s
        self.tokens_per_s = tokens_per_s
        self.faults = faults
        self.decode = decode
        self.encode = encode
        self.eos_token_id = eos_token_id
        self.supports_return_token_ids = supports_return_token_ids
        self.keep_alive = keep_alive
        self.down = False
        self.seen: deque[CompletionRequest] = deque(maxlen=history)
        self.counts: dict[str, int] = {"requests": 0, "completions": 0, "connections": 0}
        self._rng = random.Random(seed)
        self._ids = itertools.count()

    # --- routes ---------------------------------------------------------------------------------------

    async def handle(self, method: str, path: str, body: bytes) -> Reply:
        self.counts["requests"] += 1
        path = path.partition("?")[0]
        if path == "/v1/completions":
            if method != "POST":
                return _error(405, "Method Not Allowed", "MethodNotAllowed")
            return await self._complete(body)
        if method != "GET":
            return _error(405, "Method Not Allowed", "MethodNotAllowed")
        if path == "/health":
            return Reply(200, b"", b"text/plain")
        if path == "/v1/models":
            card = {"id": self.model, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                    "root": self.model, "parent": None, "max_model_len": self.max_model_len, "permission": []}
            return Reply(200, json.dumps({"object": "list", "data": [card]}).encode())
        return _error(404, f"no route {path}", "NotFoundError")

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    async def _complete(self, body: bytes) -> Reply:
        try:
            request = self.parse_request(body)
        except _BadRequest as exc:
            return _error(400, str(exc), "BadRequestError", exc.param)
        if request.model is not None and request.model != self.model:
            return _error(404, f"The model `{request.model}` does not exist.", "NotFoundError", "model")
        n_prompt = len(request.prompt_ids)
        if self.max_model_len is not None and n_prompt + request.max_tokens > self.max_model_len:
            self._count("context_overflow")
            # The wording of vLLM's renderer (vllm/renderers/params.py, _token_len_check).
            return _error(400, (
                f"You passed {n_prompt} input tokens and requested {request.max_tokens} output tokens. "
                f"However, the model's context length is only {self.max_model_len} tokens, resulting in a "
                f"maximum input length of {self.max_model_len - request.max_tokens} tokens. "
                "Please reduce the length of the input prompt."), "BadRequestError", "input_tokens")
        self.seen.append(request)
        fault = self.faults.draw(self._rng)
        if fault is not None:
            self._count(fault)
        if fault == "hang":
            await trio.sleep_forever()
        result = self.policy(request.prompt_ids, request)
        if inspect.isawaitable(result):
            result = await result
        delay = self.latency_s if isinstance(self.latency_s, (int, float)) else self.latency_s(self._rng)
        response = self._response(request, result, fault == "missing_token_ids")
        if self.tokens_per_s:
            delay += response["usage"]["completion_tokens"] / self.tokens_per_s
        if delay > 0:
            await trio.sleep(delay)
        if fault == "error":
            return _error(500, "fake: injected internal server error", "InternalServerError")
        if fault == "malformed":
            return Reply(200, b'{"id": "cmpl-broken", "choices": [{"text": "trunc')
        if fault == "abort":
            response["choices"][0]["finish_reason"] = "abort"
        self.counts["completions"] += 1
        return Reply(200, json.dumps(response).encode(), disconnect=fault == "disconnect")

    # --- the vLLM protocol ------------------------------------------------------------------------------

    def parse_request(self, body: bytes) -> CompletionRequest:
        """vLLM's CompletionRequest fields (vllm/entrypoints/openai/completion/protocol.py), their defaults."""
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise _BadRequest(f"request body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise _BadRequest("request body must be a JSON object")
        prompt = data.get("prompt")
        if isinstance(prompt, str):
            if self.encode is None:
                raise _BadRequest("this fake server takes token-id prompts only", "prompt")
            prompt = list(self.encode(prompt))
        elif isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            raise _BadRequest("this fake server takes one prompt per request", "prompt")
        prompt_ids = _int_list(prompt, "prompt")
        if not prompt_ids:
            raise _BadRequest("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
        max_tokens = data.get("max_tokens")
        max_tokens = 16 if max_tokens is None else max_tokens
        if type(max_tokens) is not int or max_tokens < 1:
            raise _BadRequest(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
        if data.get("n", 1) != 1 or data.get("stream"):
            raise _BadRequest("this fake server answers n=1, stream=false only")
        stop = data.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        logprobs = data.get("logprobs")
        if logprobs is not None and (type(logprobs) is not int or logprobs < 0):
            raise _BadRequest("`logprobs` must be a non-negative integer", "logprobs")
        return CompletionRequest(
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            temperature=data.get("temperature"),
            top_p=data.get("top_p"),
            seed=data.get("seed"),
            stop=stop,
            stop_token_ids=tuple(_int_list(data.get("stop_token_ids") or [], "stop_token_ids")),
            logprobs=logprobs,
            return_token_ids=bool(data.get("return_token_ids")) and self.supports_return_token_ids,
            return_tokens_as_token_ids=bool(data.get("return_tokens_as_token_ids")),
            include_stop_str_in_output=bool(data.get("include_stop_str_in_output")),
            skip_special_tokens=data.get("skip_special_tokens", True),
            model=data.get("model"),
            raw=data,
        )

    def _finish(self, request: CompletionRequest, ids: list[int]) -> tuple[list[int], str, int | str | None, str]:
        """Cut the policy's tokens the way vLLM stops: stop token ids (kept), stop strings, max_tokens."""
        window = ids[: request.max_tokens]
        stops = set(request.stop_token_ids)
        if self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        for i, token in enumerate(window):
            if token in stops:
                reason = None if token == self.eos_token_id and token not in request.stop_token_ids else token
                return window[: i + 1], "stop", reason, self._text(window[: i + 1])
        if request.stop and self.decode is not None:
            for i in range(len(window)):
                text = self.decode(window[: i + 1])
                for s in request.stop:
                    at = text.find(s)
                    if at >= 0:
                        cut = at + len(s) if request.include_stop_str_in_output else at
                        return window[: i + 1], "stop", s, text[:cut]
        finish = "length" if len(ids) > request.max_tokens else "stop"
        return window, finish, None, self._text(window)

    def _text(self, ids: list[int]) -> str:
        return self.decode(ids) if self.decode is not None else ""

    def _response(self, request: CompletionRequest, result: Sequence[int] | Generation,
                  drop_token_ids: bool) -> dict[str, Any]:
        """vLLM's CompletionResponse for one choice."""
        if isinstance(result, Generation):
            ids, given = list(result.token_ids), result.logprobs
        else:
            ids, given = list(result), None
        if given is not None and len(given) != len(ids):
            raise ValueError(f"policy returned {len(ids)} token ids but {len(given)} logprobs")
        ids, finish, stop_reason, text = self._finish(request, ids)
        choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                                  "stop_reason": stop_reason, "prompt_logprobs": None,
                                  "token_ids": None, "prompt_token_ids": None}
        if request.logprobs is not None:
            lps = list(given[: len(ids)]) if given is not None else [fake_logprob(t, i) for i, t in enumerate(ids)]
            if request.return_tokens_as_token_ids and not drop_token_ids:
                tokens = [f"token_id:{t}" for t in ids]
            elif self.decode is not None:
                tokens = [self.decode([t]) for t in ids]
            else:
                tokens = [f"<{t}>" for t in ids]
            offsets, top = [], []
            for i, (tok, lp) in enumerate(zip(tokens, lps)):
                offsets.append(i)
                top.append({tok: lp})
            choice["logprobs"] = {"text_offset": offsets, "token_logprobs": lps, "tokens": tokens,
                                  "top_logprobs": top}
        if request.return_token_ids and not drop_token_ids:
            choice["token_ids"] = ids
            choice["prompt_token_ids"] = request.prompt_ids
        n_prompt = len(request.prompt_ids)
        return {"id": f"cmpl-{next(self._ids)}", "object": "text_completion", "created": int(time.time()),
                "model": self.model, "choices": [choice],
                "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt + len(ids),
                          "completion_tokens": len(ids), "prompt_tokens_details": None}}


# --- front 1: an httpx transport (in process) ---------------------------------------------------------


def _origin(url: httpx.URL | str) -> tuple[str, str, int | None]:
    url = httpx.URL(url)
    port = url.port or {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, port


class FakeTransport(httpx.AsyncBaseTransport):
    """Routes requests to in-process `FakeLLM`s by origin: ``FakeTransport({"http://a:8000": fake})``."""

    def __init__(self, servers: Mapping[str, FakeLLM]) -> None:
        self.servers = {_origin(url): fake for url, fake in servers.items()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        fake = self.servers.get(_origin(request.url))
        if fake is None or fake.down:
            raise httpx.ConnectError(f"[Errno 111] Connection refused ({request.url.host})", request=request)
        body = await request.aread()
        reply = await fake.handle(request.method, request.url.raw_path.decode(), body)
        if fake.down or reply.disconnect:
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body",
                                            request=request)
        return httpx.Response(reply.status, headers=[(b"content-type", reply.content_type)],
                              content=reply.body, request=request)


# --- front 2: an HTTP/1.1 server on a socket (trio + h11) --------------------------------------------


async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(65536)
        conn.receive_data(data)  # b"" means EOF: h11 answers ConnectionClosed or raises


async def _serve_connection(fake: FakeLLM, stream: trio.SocketStream) -> None:
    fake.counts["connections"] += 1
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    try:
        while True:
            event = await _next_event(conn, stream)
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed
            method, target = event.method.decode(), event.target.decode()
            chunks = []
            while True:
                event = await _next_event(conn, stream)
                if isinstance(event, h11.EndOfMessage):
                    break
                if not isinstance(event, h11.Data):
                    return
                chunks.append(event.data)
            if fake.down:
                return
            reply = await fake.handle(method, target, b"".join(chunks))
            if fake.down:
                return
            head = conn.send(h11.Response(status_code=reply.status, headers=[
                (b"content-type", reply.content_type), (b"content-length", b"%d" % len(reply.body))]))
            if reply.disconnect:
                await stream.send_all(head + reply.body[: len(reply.body) // 2])
                return
            await stream.send_all(head + conn.send(h11.Data(data=reply.body)) + conn.send(h11.EndOfMessage()))
            if not fake.keep_alive or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return
    finally:
        await trio.aclose_forcefully(stream)


async def serve_http(fake: FakeLLM, port: int = 0, host: str = "127.0.0.1", *,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `fake` over HTTP/1.1 on ``host:port`` until cancelled; `started()` with the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=4096)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(trio.serve_listeners, partial(_serve_connection, fake), listeners))
        task_status.started(bound)


@asynccontextmanager
async def open_fake_server(fake: FakeLLM, port: int = 0, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve `fake` on a socket for the block; yields its base URL (``http://127.0.0.1:PORT``)."""
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(serve_http, fake, port, host)
        try:
            yield f"http://{host}:{bound}"
        finally:
            nursery.cancel_scope.cancel()
