"""`LeanTransport`: HTTP/1.1 keep-alive on trio TCP streams with h11, under httpx's transport interface.

Why not httpcore's pool: its cost per request grows with the pool (measured here: one AsyncClient on trio
serves 2,061 req/s over 1 connection, 258 over 64 and 81 over 256), because every request and every
release walks the pool and its queue. This transport keeps idle connections on a stack per origin: taking
one and giving it back are O(1), and it never queues; the caller bounds concurrency (`LLMClient` holds a
`trio.CapacityLimiter` per endpoint), so the number of connections follows the number of callers.

Connections idle longer than `keepalive_expiry_s` are closed (vLLM's uvicorn closes them after 5 s).
A request that fails on a reused connection before any byte of the answer came back (the server closed
it while idle) is sent once more on a new connection. Errors are httpx's: `ConnectError`,
`ConnectTimeout`, `ReadError`, `WriteError`, `ReadTimeout`, `RemoteProtocolError`, `UnsupportedProtocol`.
"""

from __future__ import annotations

import time
from collections import deque

import h11
import httpx
import trio

__all__ = ["LeanTransport"]

_Origin = tuple[str, int]


class _Stale(Exception):
    """A reused connection was closed by the server before it answered: safe to send again."""


class _Connection:
    __slots__ = ("stream", "h11", "idle_since")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0


class LeanTransport(httpx.AsyncBaseTransport):
    """See the module docstring. Plain ``http://`` only (inference endpoints on a cluster network)."""

    def __init__(self, *, connect_timeout_s: float | None = 10.0, keepalive_expiry_s: float = 4.0,
                 max_idle_per_origin: int = 4096) -> None:
        if not keepalive_expiry_s > 0:
            raise ValueError(f"LeanTransport: keepalive_expiry_s must be > 0, got {keepalive_expiry_s}")
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_expiry_s = keepalive_expiry_s
        self.max_idle_per_origin = max_idle_per_origin
        self._idle: dict[_Origin, deque[_Connection]] = {}  # newest on the right
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("LeanTransport is closed")
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"LeanTransport speaks http:// only, got {url.scheme}://", request=request)
        origin = (url.host, url.port or 80)
        timeouts = request.extensions.get("timeout", {})
        body = await request.aread()
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < self.keepalive_expiry_s:
                try:
                    return await self._round_trip(conn, origin, request, body, timeouts, reused=True)
                except _Stale:
                    break
            await trio.aclose_forcefully(conn.stream)
        conn = await self._connect(origin, request, timeouts.get("connect", self.connect_timeout_s))
        return await self._round_trip(conn, origin, request, body, timeouts, reused=False)

    async def _connect(self, origin: _Origin, request: httpx.Request, timeout_s: float | None) -> _Connection:
        try:
            with trio.fail_after(timeout_s if timeout_s is not None else float("inf")):
                stream = await trio.open_tcp_stream(*origin)
        except trio.TooSlowError:
            raise httpx.ConnectTimeout(f"connect to {origin[0]}:{origin[1]} timed out", request=request) from None
        except OSError as exc:
            raise httpx.ConnectError(f"connect to {origin[0]}:{origin[1]}: {exc}", request=request) from exc
        return _Connection(stream)

    async def _round_trip(self, conn: _Connection, origin: _Origin, request: httpx.Request, body: bytes,
                          timeouts: dict, *, reused: bool) -> httpx.Response:
        machine, stream = conn.h11, conn.stream
        answered = False  # any byte of the answer seen: from then on a failure is not "stale"
        kept = False
        read_timeout = timeouts.get("read")
        try:
            try:
                data = machine.send(h11.Request(method=request.method, target=request.url.raw_path,
                                                headers=request.headers.raw))
                data += machine.send(h11.Data(data=body)) if body else b""
                data += machine.send(h11.EndOfMessage())
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                if reused:
                    raise _Stale from exc
                raise httpx.WriteError(f"send to {origin[0]}:{origin[1]}: {exc}", request=request) from exc
            head: h11.Response | None = None
            chunks: list[bytes] = []
            while True:
                event = machine.next_event()
                if event is h11.NEED_DATA:
                    try:
                        if read_timeout is None:
                            chunk = await stream.receive_some(65536)
                        else:
                            with trio.fail_after(read_timeout):
                                chunk = await stream.receive_some(65536)
                    except trio.TooSlowError:
                        raise httpx.ReadTimeout("read timed out", request=request) from None
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                        if reused and not answered:
                            raise _Stale from exc
                        raise httpx.ReadError(f"receive from {origin[0]}:{origin[1]}: {exc}", request=request) from exc
                    if not chunk and reused and not answered:
                        raise _Stale
                    answered = True
                    machine.receive_data(chunk)
                elif isinstance(event, h11.Response):
                    head = event
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.InformationalResponse):
                    continue
                else:  # ConnectionClosed before the end of the answer
                    raise httpx.RemoteProtocolError("server closed the connection mid-response", request=request)
            assert head is not None
            response = httpx.Response(head.status_code, headers=head.headers, content=b"".join(chunks),
                                      request=request, extensions={"http_version": b"HTTP/1.1",
                                                                   "reason_phrase": head.reason})
            if machine.our_state is h11.DONE and machine.their_state is h11.DONE and not self._closed:
                idle = self._idle.get(origin)
                if idle is None:
                    idle = self._idle[origin] = deque()
                if len(idle) < self.max_idle_per_origin:
                    machine.start_next_cycle()
                    conn.idle_since = now = time.monotonic()
                    idle.append(conn)
                    kept = True
                    # The oldest idle connections, on the left, are never taken (LIFO): close them here
                    # once expired instead of holding sockets the server has already closed.
                    while idle and now - idle[0].idle_since >= self.keepalive_expiry_s:
                        idle.popleft().stream.socket.close()
            return response
        except h11.RemoteProtocolError as exc:
            if reused and not answered:
                raise _Stale from exc
            raise httpx.RemoteProtocolError(f"{origin[0]}:{origin[1]}: {exc}", request=request) from exc
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc), request=request) from exc
        finally:
            if not kept:  # failed, cancelled, or not reusable: never give back a connection in doubt
                await trio.aclose_forcefully(stream)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await trio.aclose_forcefully(conn.stream)
