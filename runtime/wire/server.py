"""The trio server of the wire protocol: many connections, many calls per connection.

Each connection has one reader (this module, driving the pure codec) and one writer (`Outbox`). Inline
handlers answer from the reader; async handlers run in tasks owned by the connection, cancelled when the
client sends a cancel or goes away. A peer that breaks the protocol gets a connection-level error frame
and is closed; nothing it sends can crash the server or leak the connection's resources.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import trio

from .codec import (
    CLOSED,
    DEFAULT_COMPRESS_THRESHOLD,
    DEFAULT_MAX_FRAME,
    NEED_DATA,
    PROTOCOL_VERSION,
    BadMessage,
    Cancel,
    Connection,
    ErrorResponse,
    Hello,
    Notification,
    Request,
    Response,
    Role,
)
from .errors import ERROR_CODES, LocalProtocolError, RemoteProtocolError, RpcError
from .router import CallContext, Method, Router
from .transport import Outbox, open_listener, parse_address

__all__ = ["WireServer"]

log = logging.getLogger("swe_dapo.wire")

_READ_SIZE = 64 << 10
_MAX_READ_SIZE = 4 << 20
_ACCEPT_CAPACITY_ERRNOS = {24, 23, 12, 105}  # EMFILE, ENFILE, ENOMEM, ENOBUFS: back off, keep serving
# Refused connections are logged one line each, up to this many a second; past it they are counted
# and summed up once a second (a flood of connections must not become a flood of log lines).
_REFUSAL_LOG_BURST = 20


def _error_fields(exc: BaseException, method: str) -> tuple[str, str, Any]:
    """Map a handler's exception to (code, message, data): typed errors keep their code."""
    if isinstance(exc, RpcError):
        return exc.code, exc.message, exc.data
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in ERROR_CODES:  # e.g. sandboxd's errors, which know the codes
        field = getattr(exc, "field", None)
        return code, str(exc), ({"field": field} if isinstance(field, str) else None)
    log.error("method %s failed", method, exc_info=exc)
    return "internal", f"{method} failed: {type(exc).__name__}: {exc}", None


class WireServer:
    """Serves a `Router` on one or more listeners.

    `token`: required in every client's hello when set; TCP listeners refuse to start without one.
    `max_connections`: connections over it get a `busy` error and are closed.
    `max_calls_per_connection`: async calls in flight per connection; more get `busy`.
    `hello_timeout_s`: a connection that has not said hello by then is closed (slow-loris defence).
    """

    def __init__(
        self,
        router: Router,
        *,
        token: str | None = None,
        name: str = "swe-dapo",
        max_frame: int = DEFAULT_MAX_FRAME,
        compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD,
        max_connections: int = 16384,
        max_calls_per_connection: int = 4096,
        hello_timeout_s: float = 10.0,
        send_high_water: int = 8 << 20,
    ) -> None:
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError("token must be a non-empty string or None")
        self.router = router
        self.token = token
        self.name = name
        self.max_frame = max_frame
        self.compress_threshold = compress_threshold
        self.max_connections = max_connections
        self.max_calls_per_connection = max_calls_per_connection
        self.hello_timeout_s = hello_timeout_s
        self.send_high_water = send_high_water
        self.connections = 0
        # connections_total, calls, errors.<code>, protocol_errors, refused.<code>
        self.counters: Counter[str] = Counter()
        self._logged_this_second = 0  # refusal log lines; reset every second by the reporter
        self._unlogged: Counter[str] = Counter()  # refusals counted but not logged yet, by code
        self.addresses: list[str] = []
        if router.get("wire.ping") is None:
            router.add("wire.ping", _ping)

    def stats(self) -> dict[str, Any]:
        return {"connections": self.connections, **self.counters}

    async def serve(self, listen: Sequence[str], *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind every address in `listen`, report the bound addresses through `task_status`, serve forever."""
        parsed = [parse_address(a) for a in listen]
        if not parsed:
            raise ValueError("serve: at least one listen address is required")
        if self.token is None and any(a.kind == "tcp" for a in parsed):
            raise ValueError("serve: TCP listeners require a token (anyone on the network could connect)")
        listeners: list[trio.SocketListener] = []
        unix_paths: list[str] = []
        try:
            for address in parsed:
                listener, bound = await open_listener(address)
                listeners.append(listener)
                self.addresses.append(bound)
                if address.kind == "unix":
                    unix_paths.append(address.path)
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
                nursery.start_soon(self._report_unlogged_refusals)
                log.info("serving on %s", ", ".join(self.addresses))
                task_status.started(list(self.addresses))
        finally:
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()
            for path in unix_paths:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def log_refusal(self, peer: str, code: str, message: str, *, after_hello: bool = False) -> None:
        """Log a refused (or, `after_hello`, a closed) connection with its error code; rate-limited."""
        self.counters[f"refused.{code}"] += 1
        if self._logged_this_second >= _REFUSAL_LOG_BURST:
            self._unlogged[code] += 1
            return
        self._logged_this_second += 1
        if after_hello:
            log.info("closed connection from %s: %s: %s", peer, code, message)
        else:
            log.warning("refused connection from %s: %s: %s", peer, code, message)

    async def _report_unlogged_refusals(self) -> None:
        while True:
            await trio.sleep(1.0)
            if self._unlogged:
                counts = ", ".join(f"{code} {n}" for code, n in sorted(self._unlogged.items()))
                log.warning("refused %d more connections in the last second, not logged one by one (%s)",
                            sum(self._unlogged.values()), counts)
                self._unlogged.clear()
            self._logged_this_second = 0

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        # One fd held back: out of fds, it is let go to accept the waiting connection and tell it
        # why it is refused (otherwise clients would wait in the backlog without an answer).
        reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE) and reserve >= 0:
                        os.close(reserve)
                        reserve = -1
                        await self._refuse_one(listener, f"server is out of file descriptors ({exc.strerror})")
                        try:
                            reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                        except OSError:
                            await trio.sleep(0.1)
                        continue
                    if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                        log.error("accept failed (%s); retrying in 100 ms", exc)
                        await trio.sleep(0.1)
                        continue
                    raise
                nursery.start_soon(self.handle_stream, stream)
        finally:
            if reserve >= 0:
                os.close(reserve)

    async def _refuse_one(self, listener: trio.SocketListener, message: str) -> None:
        try:
            stream = await listener.accept()
        except OSError:
            await trio.sleep(0.1)  # still no fd: the connection waits in the backlog
            return
        await self._refuse(stream, _peer_name(stream), "busy", message)

    async def _refuse(self, stream: trio.abc.Stream, peer: str, code: str, message: str) -> None:
        """Answer a connection-level error before any hello, and close."""
        self.counters[f"errors.{code}"] += 1
        self.log_refusal(peer, code, message)
        try:
            with trio.move_on_after(1.0):
                await stream.send_all(Connection(Role.SERVER, max_frame=self.max_frame).send(
                    ErrorResponse(None, code, message)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def handle_stream(self, stream: trio.abc.Stream, peer: str = "") -> None:
        """Serve one connection until it closes. Never raises (but for cancellation)."""
        if not peer:
            peer = _peer_name(stream)
        self.counters["connections_total"] += 1
        self.connections += 1
        try:
            if self.connections > self.max_connections:
                await self._refuse(stream, peer, "busy", f"too many connections (max {self.max_connections})")
                return
            await _ServerConnection(self, stream, peer).run()
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(stream)


async def _ping(ctx: CallContext) -> dict[str, Any]:
    return {"version": PROTOCOL_VERSION, "time": time.time()}


def _peer_name(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "memory"
    try:
        name = sock.getpeername()
    except OSError:
        return "unknown"
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}"
    return "unix"


class _ServerConnection:
    def __init__(self, server: WireServer, stream: trio.abc.Stream, peer: str) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.codec = Connection(
            Role.SERVER,
            expected_token=server.token,
            max_frame=server.max_frame,
            compress_threshold=server.compress_threshold,
        )
        self.scope = trio.CancelScope()
        self.outbox = Outbox(stream, high_water=server.send_high_water, on_error=lambda exc: self.scope.cancel())
        self.inflight: dict[int, trio.CancelScope] = {}

    async def run(self) -> None:
        counters = self.server.counters
        with self.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.outbox.run)
                try:
                    await self._serve(nursery)
                except RemoteProtocolError as exc:
                    counters["protocol_errors"] += 1
                    counters[f"errors.{exc.code}"] += 1
                    self.server.log_refusal(self.peer, exc.code, str(exc),
                                            after_hello=self.codec.their_hello is not None)
                    await self._close_with_error(exc.code, str(exc))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    log.debug("connection from %s lost: %s", self.peer, exc)
                except trio.TooSlowError:
                    counters["errors.timeout"] += 1
                    message = f"no hello within {self.server.hello_timeout_s} s"
                    self.server.log_refusal(self.peer, "timeout", message)
                    await self._close_with_error("timeout", message)
                nursery.cancel_scope.cancel()

    async def _close_with_error(self, code: str, message: str) -> None:
        try:
            self.outbox.put_nowait(self.codec.send(ErrorResponse(None, code, message)))
        except Exception:  # the connection is already broken: nothing to tell
            return
        with trio.move_on_after(1.0):
            await self.outbox.drain()

    async def _receive(self) -> bool:
        """Read more bytes into the codec; False at EOF."""
        size = min(max(self.codec.bytes_wanted, _READ_SIZE), _MAX_READ_SIZE)
        data = await self.stream.receive_some(size)
        self.codec.receive_data(data)
        return bool(data)

    async def _serve(self, nursery: trio.Nursery) -> None:
        codec = self.codec
        with trio.fail_after(self.server.hello_timeout_s):
            while True:
                event = codec.next_event()
                if event is NEED_DATA:
                    await self._receive()
                    continue
                if event is CLOSED:
                    return
                break
        assert isinstance(event, Hello)
        self.outbox.put_nowait(codec.send(Hello(info={"server": self.server.name})))
        server = self.server
        router = server.router
        counters = server.counters
        while True:
            event = codec.next_event()
            if event is NEED_DATA:
                # Backpressure: stop reading requests while our answers are not being read.
                await self.outbox.wait_writable()
                await self._receive()
                continue
            if event is CLOSED:
                return
            cls = type(event)
            if cls is Request:
                counters["calls"] += 1
                method = router.get(event.method)
                if method is None:
                    self._answer_error(event.id, "not_found", f"unknown method {event.method!r}", {"field": "method"})
                elif event.id in self.inflight:
                    self._answer_error(event.id, "bad_request", f"call id {event.id} is already in flight", {"field": "id"})
                elif method.is_async:
                    if len(self.inflight) >= server.max_calls_per_connection:
                        self._answer_error(event.id, "busy", f"too many calls in flight (max {server.max_calls_per_connection})", None)
                    else:
                        scope = trio.CancelScope()
                        self.inflight[event.id] = scope
                        nursery.start_soon(self._run_async, method, event, scope)
                else:
                    self._run_inline(method, event)
            elif cls is Cancel:
                scope = self.inflight.get(event.id)
                if scope is not None:
                    scope.cancel()
            elif cls is BadMessage:
                self._answer_error(event.id, event.code, event.message, {"field": event.field} if event.field else None)
            else:  # pragma: no cover - the codec only returns what a server may receive
                raise RemoteProtocolError(f"unexpected {cls.__name__}")

    def _answer_error(self, call_id: int, code: str, message: str, data: Any) -> None:
        self.server.counters[f"errors.{code}"] += 1
        self.outbox.put_nowait(self.codec.send(ErrorResponse(call_id, code, message, data)))

    def _encode_result(self, call_id: int, method: str, result: Any) -> bytes:
        try:
            return self.codec.send(Response(call_id, result))
        except LocalProtocolError as exc:
            code = "limit" if exc.code == "limit" else "internal"  # an unencodable result is our bug
            self.server.counters[f"errors.{code}"] += 1
            return self.codec.send(ErrorResponse(call_id, code, f"{method}: result cannot be sent: {exc}"))

    def _run_inline(self, method: Method, req: Request) -> None:
        try:
            method.check(req.params)
            result = method.fn(CallContext(req.id, req.method, self.peer, None), **req.params)
        except Exception as exc:
            code, message, data = _error_fields(exc, req.method)
            self._answer_error(req.id, code, message, data)
            return
        self.outbox.put_nowait(self._encode_result(req.id, req.method, result))

    async def _notify(self, call_id: int, stream: str, data: Any) -> None:
        await self.outbox.put(self.codec.send(Notification(call_id, stream, data)))

    async def _run_async(self, method: Method, req: Request, scope: trio.CancelScope) -> None:
        try:
            with scope:
                try:
                    method.check(req.params)
                    result = await method.fn(CallContext(req.id, req.method, self.peer, self._notify), **req.params)
                except Exception as exc:
                    code, message, data = _error_fields(exc, req.method)
                    self._answer_error(req.id, code, message, data)
                    return
                frame = self._encode_result(req.id, req.method, result)
                await self.outbox.put(frame)
            # Cancelled by the client (it stopped waiting) or by the connection closing: no answer.
        except Exception as exc:  # the connection broke while answering
            log.debug("could not answer %s: %s", req.method, exc)
        finally:
            self.inflight.pop(req.id, None)
