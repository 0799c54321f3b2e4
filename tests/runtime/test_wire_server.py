"""The trio server and client over real Unix and TCP sockets: calls, errors, deadlines, reconnects,
fuzzing with bad peers while a good client keeps being served, and many connections at once."""

from __future__ import annotations

import os
import resource
import stat
import struct

import msgpack
import pytest
import trio

from runtime.wire import (
    BadRequest,
    Busy,
    ConnectionLost,
    InternalError,
    LimitExceeded,
    NotFound,
    Router,
    RpcTimeout,
    Unauthorized,
    WireServer,
    open_client,
)
from runtime.wire.codec import NEED_DATA, Connection, ErrorResponse, Hello, Request, Response, Role

TOKEN = "test-token"


class CodedError(Exception):
    """Like sandboxd's errors: not an RpcError, but carries a documented code and field."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = "not_found"
        self.field = "sandbox"


def make_router(state: dict) -> Router:
    router = Router()

    @router.method("echo")
    def echo(ctx, *, data=None):
        return data

    @router.method("add")
    def add(ctx, *, a: int, b: int = 1) -> int:
        return a + b

    @router.method("sleep")
    async def sleep(ctx, *, seconds: float):
        state["sleeping"] = state.get("sleeping", 0) + 1
        try:
            await trio.sleep(seconds)
        finally:
            state["sleeping"] -= 1
            state["finished_or_cancelled"] = state.get("finished_or_cancelled", 0) + 1
        return "woke"

    @router.method("count")
    async def count(ctx, *, n: int):
        for i in range(n):
            await ctx.notify("progress", i)
        return n

    @router.method("missing")
    def missing(ctx, *, name: str):
        raise NotFound(f"no sandbox {name!r}", field="name")

    @router.method("coded")
    def coded(ctx):
        raise CodedError("sandbox sb-1 does not exist")

    @router.method("crash")
    async def crash(ctx):
        raise ZeroDivisionError("boom")

    @router.method("unencodable")
    def unencodable(ctx):
        return object()

    @router.method("big")
    def big(ctx, *, n: int):
        return os.urandom(n)

    return router


@pytest.fixture
async def server(nursery, tmp_path):
    state: dict = {}
    srv = WireServer(make_router(state), token=TOKEN, hello_timeout_s=0.5, max_frame=1 << 20)
    addresses = await nursery.start(srv.serve, [f"unix:{tmp_path / 'wire.sock'}", "tcp://127.0.0.1:0"])
    srv.state = state
    yield srv
    nursery.cancel_scope.cancel()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("transport", [0, 1], ids=["unix", "tcp"])
async def test_calls_results_and_typed_errors(server, transport):
    async with open_client(server.addresses[transport], token=TOKEN) as client:
        assert await client.call("echo", {"data": {"k": [1, b"\x00", None]}}) == {"k": [1, b"\x00", None]}
        assert await client.call("add", {"a": 2}) == 3
        with pytest.raises(NotFound, match="unknown method 'nope'"):
            await client.call("nope")
        with pytest.raises(BadRequest) as info:
            await client.call("add", {"a": "2"})
        assert info.value.field == "params.a" and "must be int" in str(info.value)
        with pytest.raises(BadRequest, match="unknown parameter 'c'") as info:
            await client.call("add", {"a": 1, "c": 3})
        assert info.value.field == "params.c"
        with pytest.raises(BadRequest, match="missing required parameter 'a'"):
            await client.call("add", {})
        with pytest.raises(NotFound, match="no sandbox 'x'") as info:
            await client.call("missing", {"name": "x"})
        assert info.value.field == "name"
        with pytest.raises(NotFound, match="sb-1") as info:
            await client.call("coded")
        assert info.value.field == "sandbox"
        with pytest.raises(InternalError, match="ZeroDivisionError: boom"):
            await client.call("crash")
        with pytest.raises(InternalError, match="cannot be sent"):
            await client.call("unencodable")
        with pytest.raises(LimitExceeded, match="max_frame"):
            await client.call("big", {"n": 2 << 20})
        # After all of that, the same connection still works.
        assert await client.call("add", {"a": 40, "b": 2}) == 42
        assert client.connects == 1


async def test_concurrent_calls_multiplex_on_one_connection(server):
    async with open_client(server.addresses[0], token=TOKEN) as client:
        results = {}

        async def one(i):
            results[i] = await client.call("add", {"a": i, "b": i})

        async with trio.open_nursery() as nursery:
            for i in range(500):
                nursery.start_soon(one, i)
        assert results == {i: 2 * i for i in range(500)}
        assert client.connects == 1


async def test_streaming_notifications_then_result(server):
    async with open_client(server.addresses[0], token=TOKEN) as client:
        async with client.stream("count", {"n": 1000}) as call:
            seen = [note.data async for note in call if note.stream == "progress"]
        assert seen == list(range(1000))
        assert call.result == 1000


async def test_deadline_raises_timeout_and_cancels_the_handler(server):
    async with open_client(server.addresses[0], token=TOKEN) as client:
        with pytest.raises(RpcTimeout, match="sleep"):
            await client.call("sleep", {"seconds": 30}, timeout_s=0.2)
        with trio.fail_after(5):
            while server.state.get("sleeping"):
                await trio.sleep(0.01)
        assert server.state["finished_or_cancelled"] == 1
        # Outer cancel scopes work too (style: callers use trio's time limits).
        with trio.move_on_after(0.1) as scope:
            await client.call("sleep", {"seconds": 30})
        assert scope.cancelled_caught
        assert await client.call("echo", {"data": 1}) == 1
        with pytest.raises(BadRequest, match="timeout_s"):
            await client.call("echo", timeout_s=-1)


async def test_wrong_or_missing_token_is_refused(server):
    for token in ("wrong", None):
        async with open_client(server.addresses[1], token=token, connect_timeout_s=2) as client:
            with pytest.raises(Unauthorized):
                await client.call("echo", timeout_s=5)


async def test_tcp_requires_a_token_and_unix_socket_is_private(tmp_path):
    with pytest.raises(ValueError, match="TCP listeners require a token"):
        await WireServer(Router()).serve(["tcp://127.0.0.1:0"])
    async with trio.open_nursery() as nursery:
        path = tmp_path / "private.sock"
        await nursery.start(WireServer(Router()).serve, [f"unix:{path}"])
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        async with open_client(f"unix:{path}") as client:  # no token needed on the private socket
            assert (await client.call("wire.ping"))["version"] == 1
        nursery.cancel_scope.cancel()
    assert not path.exists()  # removed on shutdown


async def test_reconnect_after_server_restart(tmp_path):
    path = f"unix:{tmp_path / 'r.sock'}"
    state: dict = {}
    async with open_client(path, backoff_initial_s=0.01, call_timeout_s=10) as client:
        async with trio.open_nursery() as nursery:
            await nursery.start(WireServer(make_router(state)).serve, [path])
            assert await client.call("echo", {"data": 1}) == 1

            async def in_flight():
                with pytest.raises(ConnectionLost):
                    await client.call("sleep", {"seconds": 30})

            nursery.start_soon(in_flight)
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()  # the server goes away mid-call
        assert not client.connected

        async def restart_later(task_status=trio.TASK_STATUS_IGNORED):
            task_status.started()
            await trio.sleep(0.3)
            await WireServer(make_router(state)).serve([path])

        async with trio.open_nursery() as nursery:
            await nursery.start(restart_later)
            # The call is made while the server is down: it reconnects with backoff within its deadline.
            assert await client.call("echo", {"data": 2}) == 2
            assert client.connects == 2
            nursery.cancel_scope.cancel()


async def test_connect_failure_within_deadline(tmp_path):
    async with open_client(f"unix:{tmp_path / 'nobody.sock'}", backoff_initial_s=0.01) as client:
        with pytest.raises(RpcTimeout):
            await client.call("echo", timeout_s=0.3)


async def test_too_many_async_calls_in_flight_get_busy(nursery, tmp_path):
    srv = WireServer(make_router({}), max_calls_per_connection=4)
    (address,) = await nursery.start(srv.serve, [f"unix:{tmp_path / 'b.sock'}"])
    async with open_client(address) as client:
        outcomes = []

        async def sleeper():
            try:
                outcomes.append(await client.call("sleep", {"seconds": 0.3}))
            except Busy as exc:
                outcomes.append(type(exc))

        async with trio.open_nursery() as inner:
            for _ in range(6):
                inner.start_soon(sleeper)
        assert sorted(map(str, outcomes)) == sorted(["woke"] * 4 + [str(Busy)] * 2)


async def test_max_connections_gets_busy(nursery, tmp_path):
    srv = WireServer(make_router({}), max_connections=2)
    (address,) = await nursery.start(srv.serve, [f"unix:{tmp_path / 'c.sock'}"])
    async with open_client(address) as a, open_client(address) as b:
        await a.call("echo")
        await b.call("echo")
        async with open_client(address, backoff_initial_s=0.01) as c:
            with pytest.raises(RpcTimeout):  # refused with busy, retried until its deadline
                await c.call("echo", timeout_s=0.3)
    assert srv.counters["errors.busy"] >= 1


# --- fuzzing with bad peers ------------------------------------------------------------------------


async def raw_exchange(address: str, data: bytes, *, close_write: bool = False) -> list:
    """Send raw bytes, then read until the server closes; returns the events it sent."""
    host_port = address[len("tcp://"):]
    host, port = host_port.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    codec = Connection(Role.CLIENT)
    codec.send(Hello())  # we speak raw bytes; the codec only decodes the answers
    events = []
    async with stream:
        try:
            await stream.send_all(data)
            if close_write:
                await stream.send_eof()
        except trio.BrokenResourceError:
            pass
        with trio.fail_after(5):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                codec.receive_data(chunk)
                while True:
                    try:
                        event = codec.next_event()
                    except Exception:
                        event = NEED_DATA
                    if event is NEED_DATA or not hasattr(event, "__dataclass_fields__"):
                        break
                    events.append(event)
                if not chunk:
                    break
    return events


def frame(body, flags: int = 0) -> bytes:
    raw = body if isinstance(body, bytes) else msgpack.packb(body, use_bin_type=True)
    return struct.pack(">IB", len(raw), flags) + raw


HELLO = frame({"hello": "swe-dapo", "version": 1, "token": TOKEN})

BAD_PEERS = {
    "garbage": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad_request"),
    "oversized_before_hello": (struct.pack(">IB", 1 << 30, 0), "bad_request"),
    "oversized_after_hello": (HELLO + struct.pack(">IB", (1 << 20) + 1, 0) + b"x" * 100, "limit"),
    "wrong_version": (frame({"hello": "swe-dapo", "version": 99, "token": TOKEN}), "bad_request"),
    "wrong_token": (frame({"hello": "swe-dapo", "version": 1, "token": "nope"}), "unauthorized"),
    "no_token": (frame({"hello": "swe-dapo", "version": 1}), "unauthorized"),
    "request_before_hello": (frame({"id": 1, "method": "echo", "params": {}}), "bad_request"),
    "bad_msgpack_after_hello": (HELLO + frame(b"\xc1\xc1"), "bad_request"),
    "unknown_flags": (HELLO + frame({"id": 1, "method": "echo", "params": {}}, flags=0xF0), "bad_request"),
    "not_a_map": (HELLO + frame([1, 2]), "bad_request"),
    "bad_zstd": (HELLO + frame(b"\x28\xb5\x2f\xfd garbage", flags=1), "bad_request"),
    "silent": (b"", "timeout"),  # says nothing: closed after hello_timeout_s
}


async def test_fuzz_bad_peers_get_documented_errors_while_a_good_client_is_served(server):
    fds_before = open_fds()
    good_calls = 0
    stop = trio.Event()

    async def good_client():
        nonlocal good_calls
        async with open_client(server.addresses[0], token=TOKEN) as client:
            while not stop.is_set():
                assert await client.call("add", {"a": good_calls, "b": 1}, timeout_s=5) == good_calls + 1
                good_calls += 1
                await trio.sleep(0.001)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(good_client)
        for name, (data, code) in BAD_PEERS.items():
            events = await raw_exchange(server.addresses[1], data)
            errors = [e for e in events if isinstance(e, ErrorResponse)]
            assert errors, f"{name}: no error frame"
            assert errors[-1].id is None and errors[-1].code == code, (name, errors)
        # Truncated frames: the peer stops mid-frame and closes; no answer needed, nothing may leak.
        for cut in (3, 7, len(HELLO) - 1):
            await raw_exchange(server.addresses[1], HELLO[:cut], close_write=True)
        # Unknown methods and bad params on an otherwise fine connection: per-call errors, still open.
        events = await raw_exchange(
            server.addresses[1],
            HELLO
            + frame({"id": 1, "method": "no.such", "params": {}})
            + frame({"id": 2, "method": "add", "params": {"a": "x"}})
            + frame({"id": 3, "method": "add", "params": {}, "bogus": 1})
            + frame({"id": 4, "method": "add", "params": {"a": 1}}),
            close_write=True,
        )
        by_id = {e.id: e for e in events if isinstance(e, (ErrorResponse, Response))}
        assert by_id[1].code == "not_found"
        assert by_id[2].code == "bad_request" and by_id[2].data == {"field": "params.a"}
        assert by_id[3].code == "bad_request" and by_id[3].data == {"field": "bogus"}
        assert by_id[4] == Response(4, 2)
        stop.set()
    assert good_calls > 10
    assert server.counters["protocol_errors"] >= len(BAD_PEERS) - 1
    with trio.fail_after(5):
        while server.connections:
            await trio.sleep(0.01)
    assert open_fds() == fds_before


async def test_a_thousand_simultaneous_connections(server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    fds_before = open_fds()
    ready = 0
    all_connected = trio.Event()
    results = []

    async def one(i: int) -> None:
        nonlocal ready
        async with open_client(server.addresses[i % 2], token=TOKEN, call_timeout_s=30) as client:
            assert await client.call("add", {"a": i, "b": 0}) == i
            ready += 1
            if ready == 1000:
                all_connected.set()
            await all_connected.wait()  # every connection is open at the same time here
            results.append(await client.call("echo", {"data": i}))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(1000):
                nursery.start_soon(one, i)
    assert sorted(results) == list(range(1000))
    assert server.counters["connections_total"] >= 1000
    with trio.fail_after(10):
        while server.connections:
            await trio.sleep(0.01)
    assert open_fds() == fds_before
