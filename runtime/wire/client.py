"""The trio client of the wire protocol: many concurrent calls over one connection, with deadlines.

::

    async with open_client("unix:/run/sandboxd.sock", token=token) as client:
        info = await client.call("node.stats")                   # default deadline: call_timeout_s
        res = await client.call("sandbox.exec", {...}, timeout_s=30)
        async with client.stream("sandbox.exec", {...}) as call:  # notifications, then the result
            async for note in call:
                print(note.stream, note.data)
        print(call.result)

Every call has a deadline; when it passes the client sends a cancel to the server and raises
`RpcTimeout`. A dropped connection fails the calls in flight with `ConnectionLost` (they may or may not
have run: retrying is the caller's policy); the next call reconnects, with exponential backoff and
jitter, within its own deadline. A wrong token or protocol version is not retried.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import outcome
import trio

from .codec import (
    CLOSED,
    DEFAULT_COMPRESS_THRESHOLD,
    DEFAULT_MAX_FRAME,
    NEED_DATA,
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
from .errors import (
    BadRequest,
    ConnectionLost,
    RemoteProtocolError,
    RpcTimeout,
    WireError,
    error_from_code,
)
from .transport import Address, Outbox, open_stream, parse_address

__all__ = ["CallStream", "WireClient", "open_client"]

log = logging.getLogger("swe_dapo.wire")

_READ_SIZE = 64 << 10
_MAX_READ_SIZE = 4 << 20
_STREAM_BUFFER = 256  # notifications buffered per streaming call before the reader waits


# Call deadlines are kept in buckets of this many seconds, checked by one timer task per connection:
# a CancelScope per call costs more than the rest of a small call put together. Deadlines are
# therefore honoured to within one tick.
_DEADLINE_TICK_S = 0.02


class _Pending:
    __slots__ = ("task", "channel", "method", "timeout", "tick")

    def __init__(self, channel: trio.MemorySendChannel | None = None, method: str = "", timeout: float = 0.0) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.channel = channel  # streaming calls: notifications and the final outcome go here
        self.method = method
        self.timeout = timeout
        self.tick = 0  # deadline bucket of a plain call (0: none)


class _ClientConnection:
    """One live connection: the reader task, the writer (`Outbox`) and the calls waiting on it."""

    def __init__(self, address: Address, stream: trio.SocketStream, codec: Connection, high_water: int) -> None:
        self.address = address
        self.stream = stream
        self.codec = codec
        self.scope = trio.CancelScope()
        self.outbox = Outbox(stream, high_water=high_water, on_error=lambda exc: self.scope.cancel())
        self.pending: dict[int, _Pending] = {}
        self.deadlines: dict[int, set[int]] = {}  # tick -> ids of plain calls due then
        self._timer: trio.CancelScope | None = None  # the deadline task's sleep
        self.ids = itertools.count(1)
        self.usable = True
        self.error: BaseException | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.outbox.run)  # never raises: it records errors and cancels us
                    nursery.start_soon(self._expire_deadlines)
                    task_status.started()
                    try:
                        await self._read_loop()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, WireError) as exc:
                        self.error = exc
                        log.info("connection to %s lost: %s", self.address, exc)
                    nursery.cancel_scope.cancel()
        finally:
            self.usable = False
            reason = self.error or self.outbox.error or "connection closed"
            self._fail_all(ConnectionLost(f"connection to {self.address} lost: {reason}"))
            await trio.aclose_forcefully(self.stream)

    def close(self) -> None:
        self.usable = False
        self.scope.cancel()

    async def _expire_deadlines(self) -> None:
        # Sleeps until the earliest bucket is due (forever while no call is in flight): a thousand
        # idle connections cost no wake-ups. `call` pulls the wake-up earlier when it must.
        while True:
            due = min(self.deadlines) * _DEADLINE_TICK_S if self.deadlines else math.inf
            with trio.CancelScope(deadline=due) as scope:
                self._timer = scope
                await trio.sleep_forever()
            self._timer = None
            now = int(trio.current_time() / _DEADLINE_TICK_S)
            for tick in [t for t in self.deadlines if t <= now]:
                for call_id in self.deadlines.pop(tick):
                    p = self.pending.get(call_id)
                    if p is not None and p.task is not None:
                        self.cancel_call(call_id)  # tells the server to stop working on it
                        trio.lowlevel.reschedule(p.task, outcome.Error(RpcTimeout(
                            f"{p.method}: no answer from {self.address} within {p.timeout:g} s")))

    def _done(self, call_id: int, p: _Pending) -> None:
        if p.tick:
            bucket = self.deadlines.get(p.tick)
            if bucket is not None:
                bucket.discard(call_id)
                if not bucket:
                    del self.deadlines[p.tick]

    async def _read_loop(self) -> None:
        codec = self.codec
        pending = self.pending
        reschedule = trio.lowlevel.reschedule
        while True:
            event = codec.next_event()
            if event is NEED_DATA:
                size = min(max(codec.bytes_wanted, _READ_SIZE), _MAX_READ_SIZE)
                codec.receive_data(await self.stream.receive_some(size))
                continue
            if event is CLOSED:
                self.error = ConnectionLost("server closed the connection")
                return
            cls = type(event)
            if cls is Response:
                p = pending.pop(event.id, None)
                if p is None:
                    continue  # the caller gave up (deadline) before the answer came
                if p.channel is None:
                    self._done(event.id, p)
                    reschedule(p.task, outcome.Value(event.result))
                else:
                    await self._deliver(p, ("result", event.result))
            elif cls is Notification:
                p = pending.get(event.id)
                if p is not None and p.channel is not None:
                    await self._deliver(p, ("note", event), close=False)
            elif cls is ErrorResponse:
                if event.id is None:  # about the connection itself: the server closes after it
                    self.error = error_from_code(event.code, event.message, event.data)
                    return
                p = pending.pop(event.id, None)
                if p is not None:
                    exc = error_from_code(event.code, event.message, event.data)
                    if p.channel is None:
                        self._done(event.id, p)
                        reschedule(p.task, outcome.Error(exc))
                    else:
                        await self._deliver(p, ("error", exc))
            elif cls is BadMessage:
                raise RemoteProtocolError(f"server sent an invalid message for call {event.id}: {event.message}")

    async def _deliver(self, p: _Pending, item: tuple, *, close: bool = True) -> None:
        # Waits while the consumer is behind: backpressure reaches the server through TCP. A consumer
        # that went away (closed its end) just loses the rest.
        try:
            await p.channel.send(item)
            if close:
                p.channel.close()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _fail_all(self, exc: ConnectionLost) -> None:
        pending, self.pending = self.pending, {}
        self.deadlines.clear()
        for p in pending.values():
            if p.channel is None:
                if p.task is not None:
                    trio.lowlevel.reschedule(p.task, outcome.Error(exc))
            else:
                try:
                    p.channel.send_nowait(("error", exc))
                except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                p.channel.close()

    # -- calls -------------------------------------------------------------------------------------

    async def start_call(self, method: str, params: dict[str, Any], p: _Pending) -> int:
        if self.outbox.queued_bytes > self.outbox.high_water:
            await self.outbox.wait_writable()
        if not self.usable:
            raise ConnectionLost(f"connection to {self.address} lost: {self.error}")
        call_id = next(self.ids)
        frame = self.codec.send(Request(call_id, method, params))
        self.pending[call_id] = p
        self.outbox.put_nowait(frame)
        return call_id

    def cancel_call(self, call_id: int) -> None:
        p = self.pending.pop(call_id, None)
        if p is not None:
            self._done(call_id, p)
        if p is not None and self.usable:
            try:
                self.outbox.put_nowait(self.codec.send(Cancel(call_id)))
            except WireError:
                pass

    async def call(self, method: str, params: dict[str, Any], timeout: float) -> Any:
        p = _Pending(None, method, timeout)
        call_id = await self.start_call(method, params, p)
        p.task = trio.lowlevel.current_task()
        p.tick = int((trio.current_time() + timeout) / _DEADLINE_TICK_S) + 1
        bucket = self.deadlines.get(p.tick)
        if bucket is None:
            bucket = self.deadlines[p.tick] = set()
            timer = self._timer
            due = p.tick * _DEADLINE_TICK_S
            if timer is not None and due < timer.deadline:
                timer.deadline = due
        bucket.add(call_id)

        def abort(_: Any) -> trio.lowlevel.Abort:
            self.cancel_call(call_id)
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)


class CallStream:
    """A streaming call: iterate for its notifications; `result` holds the final result afterwards."""

    def __init__(self, method: str, receive: trio.MemoryReceiveChannel) -> None:
        self.method = method
        self._receive = receive
        self._done = False
        self.result: Any = None

    def __aiter__(self) -> CallStream:
        return self

    async def __anext__(self) -> Notification:
        if self._done:
            raise StopAsyncIteration
        try:
            kind, value = await self._receive.receive()
        except trio.EndOfChannel:
            self._done = True
            raise ConnectionLost(f"{self.method}: connection lost before the result arrived") from None
        if kind == "note":
            return value
        self._done = True
        if kind == "error":
            raise value
        self.result = value
        raise StopAsyncIteration

    async def finish(self) -> Any:
        """Skip the remaining notifications and return the result."""
        async for _ in self:
            pass
        return self.result


class WireClient:
    """A client of one server address. Create it with `open_client`, which owns its tasks."""

    def __init__(
        self,
        address: str,
        nursery: trio.Nursery,
        *,
        token: str | None = None,
        name: str = "swe-dapo-client",
        call_timeout_s: float = 60.0,
        connect_timeout_s: float = 10.0,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD,
        send_high_water: int = 8 << 20,
    ) -> None:
        for field, value in (("call_timeout_s", call_timeout_s), ("connect_timeout_s", connect_timeout_s)):
            if not value > 0:
                raise ValueError(f"{field} must be > 0, got {value!r}")
        self.address = parse_address(address)
        self.token = token
        self.name = name
        self.call_timeout_s = call_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.max_frame = max_frame
        self.compress_threshold = compress_threshold
        self.send_high_water = send_high_water
        self._nursery = nursery
        self._conn: _ClientConnection | None = None
        self._connect_lock = trio.Lock()
        self._closed = False
        self.server_info: dict[str, Any] = {}
        self.connects = 0

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.usable

    def _deadline(self, timeout_s: float | None) -> float:
        timeout = self.call_timeout_s if timeout_s is None else timeout_s
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise BadRequest(f"timeout_s must be > 0 seconds, got {timeout!r}", field="timeout_s")
        return timeout

    async def call(self, method: str, params: dict[str, Any] | None = None, *, timeout_s: float | None = None) -> Any:
        """Call `method` and return its result; raises the typed error the server answered with."""
        timeout = self._deadline(timeout_s)
        conn = self._conn
        if conn is None or not conn.usable:  # (re)connecting: the slow path may use a cancel scope
            start = trio.current_time()
            with trio.move_on_after(timeout):
                conn = await self._connection()
            if conn is None or not conn.usable:
                raise RpcTimeout(f"{method}: could not connect to {self.address} within {timeout} s")
            timeout = max(timeout - (trio.current_time() - start), _DEADLINE_TICK_S)
        return await conn.call(method, params or {}, timeout)

    @asynccontextmanager
    async def stream(self, method: str, params: dict[str, Any] | None = None, *,
                     timeout_s: float | None = None) -> AsyncIterator[CallStream]:
        """A call whose notifications are iterated before its result (see `CallStream`)."""
        timeout = self._deadline(timeout_s)
        send, receive = trio.open_memory_channel(_STREAM_BUFFER)
        call_id = None
        conn = None
        with trio.move_on_after(timeout) as scope:
            try:
                conn = await self._connection()
                call_id = await conn.start_call(method, params or {}, _Pending(send))
                async with receive:
                    yield CallStream(method, receive)
            finally:
                if conn is not None and call_id is not None:
                    conn.cancel_call(call_id)  # no-op when the result already arrived
        if scope.cancelled_caught:
            raise RpcTimeout(f"{method}: stream from {self.address} not finished within {timeout} s")

    async def _connection(self) -> _ClientConnection:
        conn = self._conn
        if conn is not None and conn.usable:
            return conn
        async with self._connect_lock:
            conn = self._conn
            if conn is not None and conn.usable:
                return conn
            if self._closed:
                raise ConnectionLost("client is closed")
            delay = self.backoff_initial_s
            while True:
                try:
                    self._conn = await self._connect_once()
                    return self._conn
                except (OSError, ConnectionLost, RemoteProtocolError, trio.TooSlowError) as exc:
                    if isinstance(exc, RemoteProtocolError) and exc.code == "unauthorized":
                        raise
                    log.info("connecting to %s failed (%s); retrying in %.2f s", self.address, exc, delay)
                    await trio.sleep(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, self.backoff_max_s)

    async def _connect_once(self) -> _ClientConnection:
        with trio.fail_after(self.connect_timeout_s):
            stream = await open_stream(self.address)
            try:
                codec = Connection(Role.CLIENT, max_frame=self.max_frame, compress_threshold=self.compress_threshold)
                await stream.send_all(codec.send(Hello(token=self.token, info={"client": self.name})))
                while True:
                    event = codec.next_event()
                    if event is NEED_DATA:
                        codec.receive_data(await stream.receive_some(_READ_SIZE))
                        continue
                    if event is CLOSED:
                        raise ConnectionLost(f"{self.address} closed the connection during the hello")
                    if isinstance(event, ErrorResponse):
                        err = error_from_code(event.code, event.message, event.data)
                        if event.code in ("unauthorized", "bad_request"):
                            raise err  # wrong token or version: retrying cannot help
                        raise ConnectionLost(f"{self.address} refused the connection: {err}") from err
                    assert isinstance(event, Hello)
                    self.server_info = event.info
                    break
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        conn = _ClientConnection(self.address, stream, codec, self.send_high_water)
        await self._nursery.start(conn.run)
        self.connects += 1
        return conn

    async def aclose(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.close()


@asynccontextmanager
async def open_client(address: str, **kwargs: Any) -> AsyncIterator[WireClient]:
    """A `WireClient` whose connection tasks live in this block (see `WireClient` for the options)."""
    try:
        async with trio.open_nursery() as nursery:
            client = WireClient(address, nursery, **kwargs)
            try:
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The connection tasks never raise, so a group holds the caller's own exception: give it back
        # unwrapped, so that `except NotFound` around the block works.
        if len(group.exceptions) == 1:
            exc = group.exceptions[0]
            raise exc from exc.__cause__
        raise

