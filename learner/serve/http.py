"""HTTP for `PolicyServer`: the vLLM routes, an h11 server on trio, and an in-process httpx transport.

`Router.handle(method, target, body)` maps one request to ``(status, JSON)`` and knows nothing about
sockets; `serve_http` drives it with h11 over a trio TCP listener (keep-alive, bounded bodies, idle
timeout), and `InProcessTransport` drives it from an `httpx.AsyncClient` with no socket at all, so the
learner's weight-sync client and the agent's LLM client talk to the embedded server exactly as they
talk to vLLM.

Routes (vLLM names and payloads; `vllm/entrypoints/openai/api_server.py` and
`vllm/entrypoints/serve/dev/rlhf/api_router.py`):

    GET  /health                        200, empty body
    GET  /v1/models                     {"object": "list", "data": [{"id", ..., "policy_version"}]}
    POST /v1/completions                CompletionResponse (non-streaming)
    POST /pause?mode=abort|wait|keep    {"status": "paused"}
    POST /resume                        {"status": "resumed"}
    GET  /is_paused                     {"is_paused": bool}
    GET  /get_world_size                {"world_size": 1}
    POST /init_weight_transfer_engine   {"init_info": {}}                  -> {"message": ...}
    POST /start_weight_update           {"is_checkpoint_format": true}?    -> {"message": ...}
    POST /update_weights                {"update_info": {...}}             -> {"message": ...}
    POST /finish_weight_update          {"weight_version": "7"}?           -> {"message": ...}
    GET  /weight_info                   {"weight_version": "7"}
    GET  /policy_version                {"policy_version": 7}              (extension)

Errors are vLLM's ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import httpx
import trio

from .protocol import BadRequest, ModelNotFound, ServeError, completion_response, error_body, parse_completion_request
from .server import PolicyServer

__all__ = ["InProcessTransport", "Router", "serve_http"]

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 300.0  # a keep-alive connection with no request for this long is closed
_Handler = Callable[["Router", dict[str, str], Any], Awaitable[tuple[int, Any]]]


class Router:
    """Maps (method, target, body) to (status, JSON-able payload or None for an empty body)."""

    def __init__(self, server: PolicyServer) -> None:
        self.server = server
        self.created = int(time.time())

    async def handle(self, method: str, target: str, body: bytes) -> tuple[int, Any]:
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        methods = _ROUTES.get(url.path)
        if methods is None:
            return 404, error_body(ModelNotFound(f"no route {url.path}"))
        handler = methods.get(method)
        if handler is None:
            exc = ServeError(f"{method} is not allowed on {url.path} (allowed: {', '.join(methods)})")
            exc.status = 405
            return 405, error_body(exc)
        try:
            payload = json.loads(body) if body.strip() else {}
        except (ValueError, UnicodeDecodeError) as exc:
            return 400, error_body(BadRequest(f"body is not valid JSON: {exc}"))
        try:
            return await handler(self, query, payload)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an HTTP status, the server serves on
            cause = _first_leaf(exc) if isinstance(exc, BaseExceptionGroup) else exc  # completion nursery
            if isinstance(cause, ServeError):
                return cause.status, error_body(cause)
            if not isinstance(cause, Exception):
                raise
            log.error("internal error on %s %s", method, url.path, exc_info=cause)
            return 500, error_body(ServeError(f"internal error: {cause!r}"))

    # --- handlers --------------------------------------------------------------------------------

    async def _health(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        return 200, None

    async def _models(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        s = self.server
        card = {"id": s.config.model_name, "object": "model", "created": self.created, "owned_by": "swe-dapo",
                "root": s.config.model_name, "parent": None, "max_model_len": s.max_model_len,
                "policy_version": s.policy_version}
        return 200, {"object": "list", "data": [card]}

    async def _completions(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        s = self.server
        req = parse_completion_request(body, model_name=s.config.model_name, vocab_size=s.vocab_size,
                                       max_model_len=s.max_model_len, tokenizer=s.tokenizer)
        jobs = []
        for prompt in req.prompts:
            for j in range(req.n):  # n > 1 with a seed: choice j uses seed + j (vLLM shares one generator)
                seed = req.params.seed
                params = req.params if j == 0 or seed is None else dataclasses.replace(req.params, seed=seed + j)
                jobs.append((prompt, params))
        results: list[Any] = [None] * len(jobs)

        async def one(i: int) -> None:
            results[i] = await s.complete(jobs[i][0], jobs[i][1])

        async with trio.open_nursery() as nursery:
            for i in range(len(jobs)):
                nursery.start_soon(one, i)
        return 200, completion_response(req, results, request_id=f"cmpl-{uuid.uuid4().hex}",
                                        created=int(time.time()), model_name=s.config.model_name,
                                        tokenizer=s.tokenizer)

    async def _pause(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        mode = query.get("mode", "abort")
        if query.get("wait_for_inflight_requests", "").lower() == "true":  # vLLM's deprecated spelling
            mode = "wait"
        await self.server.pause(mode)
        return 200, {"status": "paused"}

    async def _resume(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        await self.server.resume()
        return 200, {"status": "resumed"}

    async def _is_paused(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        return 200, {"is_paused": self.server.is_paused}

    async def _world_size(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        return 200, {"world_size": 1}

    async def _init_transfer(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        _only_keys(body, {"init_info"}, required={"init_info"})
        await self.server.init_weight_transfer_engine(body["init_info"])
        return 200, {"message": "Weight transfer initialized"}

    async def _start_update(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        _only_keys(body, {"is_checkpoint_format"})
        flag = body.get("is_checkpoint_format", True)
        if not isinstance(flag, bool):
            raise BadRequest(f"is_checkpoint_format must be a bool, got {flag!r}", param="is_checkpoint_format")
        await self.server.start_weight_update(is_checkpoint_format=flag)
        return 200, {"message": "Weight update started"}

    async def _update(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        _only_keys(body, {"update_info"}, required={"update_info"})
        await self.server.update_weights(body["update_info"])
        return 200, {"message": "Weights updated"}

    async def _finish_update(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        _only_keys(body, {"weight_version"})
        version = await self.server.finish_weight_update(body.get("weight_version"))
        return 200, {"message": "Weight update finished", "weight_version": str(version)}

    async def _weight_info(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        return 200, {"weight_version": str(self.server.policy_version)}

    async def _policy_version(self, query: dict[str, str], body: Any) -> tuple[int, Any]:
        return 200, {"policy_version": self.server.policy_version}


_ROUTES: dict[str, dict[str, _Handler]] = {
    "/health": {"GET": Router._health},
    "/v1/models": {"GET": Router._models},
    "/v1/completions": {"POST": Router._completions},
    "/pause": {"POST": Router._pause},
    "/resume": {"POST": Router._resume},
    "/is_paused": {"GET": Router._is_paused},
    "/get_world_size": {"GET": Router._world_size},
    "/init_weight_transfer_engine": {"POST": Router._init_transfer},
    "/start_weight_update": {"POST": Router._start_update},
    "/update_weights": {"POST": Router._update},
    "/finish_weight_update": {"POST": Router._finish_update},
    "/weight_info": {"GET": Router._weight_info},
    "/policy_version": {"GET": Router._policy_version},
}


def _only_keys(body: Any, allowed: set[str], required: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    for key in body:
        if key not in allowed:
            raise BadRequest(f"unknown field {key!r} (expected {', '.join(sorted(allowed))})", param=key)
    for key in required:
        if key not in body:
            raise BadRequest(f"missing {key!r} in request body", param=key)


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _dumps(payload: Any) -> bytes:
    return b"" if payload is None else json.dumps(payload).encode()


class InProcessTransport(httpx.AsyncBaseTransport):
    """An httpx transport that hands requests to a `Router` in this process (no socket)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        status, payload = await self.router.handle(request.method, request.url.raw_path.decode("ascii"), body)
        return httpx.Response(status, headers=[("content-type", "application/json")], content=_dumps(payload),
                              request=request)


async def serve_http(server: PolicyServer | Router, host: str = "127.0.0.1", port: int = 0, *,
                     task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the routes on ``host:port`` until cancelled; `task_status.started(port)` gives the bound port."""
    router = server if isinstance(server, Router) else Router(server)
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(functools.partial(_serve_connection, router), listeners)


async def _serve_connection(router: Router, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    limit = router.server.config.max_body_bytes
    try:
        while True:
            request, body = None, bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    with trio.move_on_after(IDLE_TIMEOUT_S):
                        conn.receive_data(await stream.receive_some(1 << 16))
                        continue
                    return  # idle keep-alive connection
                if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > limit:
                        await _respond(stream, conn, 413, error_body(BadRequest(
                            f"request body over {limit} bytes (max_body_bytes)")), close=True)
                        return
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert request is not None
            status, payload = await router.handle(request.method.decode(), request.target.decode(), bytes(body))
            await _respond(stream, conn, status, payload)
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await _respond(stream, conn, exc.error_status_hint, error_body(BadRequest(f"bad HTTP: {exc}")),
                           close=True)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away
    except Exception:  # noqa: BLE001 - one broken connection must not stop the listener
        log.exception("HTTP connection failed")
    finally:
        await stream.aclose()


async def _respond(stream: trio.SocketStream, conn: h11.Connection, status: int, payload: Any, *,
                   close: bool = False) -> None:
    data = _dumps(payload)
    headers = [("content-type", "application/json"), ("content-length", str(len(data)))]
    if close:
        headers.append(("connection", "close"))
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
    await stream.send_all(conn.send(h11.Data(data=data)))
    await stream.send_all(conn.send(h11.EndOfMessage()))
