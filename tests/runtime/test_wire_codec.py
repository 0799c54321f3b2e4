"""The pure codec: round trips, framing, limits, and every kind of bad input (no sockets)."""

from __future__ import annotations

import os
import struct

import msgpack
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.wire.codec import (
    CLOSED,
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
from runtime.wire.errors import LocalProtocolError, RemoteProtocolError

# Values msgpack can carry and compare exactly after a round trip.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
params = st.dictionaries(st.text(max_size=12), values, max_size=6)
ids = st.integers(min_value=0, max_value=2**64 - 1)


def pair(token: str | None = None, **kw) -> tuple[Connection, Connection]:
    """A client and a server codec that have exchanged hellos."""
    client = Connection(Role.CLIENT, **kw)
    server = Connection(Role.SERVER, expected_token=token, **kw)
    server.receive_data(client.send(Hello(token=token)))
    assert isinstance(server.next_event(), Hello)
    client.receive_data(server.send(Hello()))
    assert isinstance(client.next_event(), Hello)
    return client, server


def feed_in_chunks(conn: Connection, data: bytes, cuts: list[int]) -> list:
    """Feed `data` split at `cuts`, collecting every event."""
    events = []
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in zip(bounds, bounds[1:]):
        conn.receive_data(data[start:end])
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
    return events


@settings(max_examples=200, deadline=None)
@given(call_id=ids, method=st.text(min_size=1, max_size=20), p=params, cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_any_request_round_trips_through_any_split(call_id, method, p, cuts):
    client, server = pair()
    data = client.send(Request(call_id, method, p))
    assert feed_in_chunks(server, data, cuts) == [Request(call_id, method, p)]


@settings(max_examples=200, deadline=None)
@given(call_id=ids, result=values, stream=st.text(max_size=10), note=values)
def test_any_response_and_notification_round_trip(call_id, result, stream, note):
    client, server = pair()
    data = server.send(Notification(call_id, stream, note)) + server.send(Response(call_id, result))
    assert feed_in_chunks(client, data, [7, 13]) == [Notification(call_id, stream, note), Response(call_id, result)]


@settings(max_examples=100, deadline=None)
@given(call_id=ids, code=st.sampled_from(["bad_request", "not_found", "timeout", "limit", "busy", "internal"]),
       message=st.text(), data=values)
def test_any_error_round_trips(call_id, code, message, data):
    client, server = pair()
    client.receive_data(server.send(ErrorResponse(call_id, code, message, data)))
    assert client.next_event() == ErrorResponse(call_id, code, message, data)


def test_many_frames_in_one_read_and_one_frame_byte_by_byte():
    client, server = pair()
    blob = b"".join(client.send(Request(i, "m", {"i": i})) for i in range(100))
    server.receive_data(blob)
    got = [server.next_event() for _ in range(100)]
    assert [e.params["i"] for e in got] == list(range(100))
    assert server.next_event() is NEED_DATA
    frame = client.send(Cancel(5))
    for byte in frame[:-1]:
        server.receive_data(bytes([byte]))
        assert server.next_event() is NEED_DATA
    server.receive_data(frame[-1:])
    assert server.next_event() == Cancel(5)


def test_large_compressible_bodies_are_compressed_and_random_ones_are_not():
    client, server = pair(compress_threshold=1024)
    text = b"PASSED tests/test_x.py::test_y\n" * 10_000
    frame = client.send(Request(1, "put", {"data": text}))
    length, flags = struct.unpack(">IB", frame[:5])
    assert flags == 1 and length < len(text) // 10
    noise = os.urandom(100_000)
    frame2 = client.send(Request(2, "put", {"data": noise}))
    assert frame2[4] == 0  # incompressible: sent raw
    server.receive_data(frame + frame2)
    assert server.next_event().params["data"] == text
    assert server.next_event().params["data"] == noise


def test_bodies_at_or_below_threshold_are_not_compressed():
    client, _ = pair(compress_threshold=1 << 16)
    assert client.send(Request(1, "m", {"data": b"a" * 1000}))[4] == 0


def raw_frame(body: bytes, flags: int = 0) -> bytes:
    return struct.pack(">IB", len(body), flags) + body


def test_oversized_frame_is_refused_from_its_header_alone():
    _, server = pair(max_frame=1 << 20)
    server.receive_data(struct.pack(">IB", (1 << 20) + 1, 0))  # no body sent at all
    with pytest.raises(RemoteProtocolError, match="exceeds max_frame") as info:
        server.next_event()
    assert info.value.code == "limit" and info.value.whose == "remote"


def test_decompression_bomb_is_refused():
    _, server = pair(max_frame=1 << 20)
    bomb = zstandard.ZstdCompressor().compress(msgpack.packb({"id": 1, "method": "m", "params": {"x": b"\0" * (4 << 20)}}))
    assert len(bomb) < 1 << 20
    server.receive_data(raw_frame(bomb, flags=1))
    with pytest.raises(RemoteProtocolError, match="inflates") as info:
        server.next_event()
    assert info.value.code == "limit"


def test_bomb_without_content_size_is_refused():
    _, server = pair(max_frame=1 << 16)
    cctx = zstandard.ZstdCompressor(write_content_size=False)
    bomb = cctx.compress(msgpack.packb({"id": 1, "method": "m", "params": {"x": b"\0" * (1 << 20)}}))
    server.receive_data(raw_frame(bomb, flags=1))
    with pytest.raises(RemoteProtocolError):
        server.next_event()


@pytest.mark.parametrize(
    "frame, match",
    [
        (raw_frame(b"\xc1\xc1\xc1"), "not valid msgpack"),
        (raw_frame(msgpack.packb([1, 2, 3])), "must be a map"),
        (raw_frame(msgpack.packb({"id": 1}) + b"\x00"), "more than one msgpack object"),
        (raw_frame(b"not zstd at all", flags=1), "zstd"),
        (raw_frame(msgpack.packb({"id": 1, "method": "m"}), flags=0x80), "unknown flag"),
        (raw_frame(msgpack.packb({"id": "1", "method": "m"})), "'id' must be"),
        (raw_frame(msgpack.packb({"id": -1, "method": "m"})), "'id' must be"),
        (raw_frame(msgpack.packb({"what": 1})), "none of the keys"),
        (raw_frame(msgpack.packb({"hello": "swe-dapo", "version": 1})), "hello sent twice"),
        (raw_frame(msgpack.packb({"id": 3, "result": 1})), "may not receive Response"),
        (raw_frame(msgpack.packb({"id": None, "error": {"code": "internal", "message": "x"}})), "may not send errors"),
        (raw_frame(b"\x91" * 100_000 + b"\xc0"), "msgpack"),  # nested past msgpack's depth limit
    ],
)
def test_garbage_frames_are_remote_protocol_errors(frame, match):
    _, server = pair()
    server.receive_data(frame)
    with pytest.raises(RemoteProtocolError, match=match):
        server.next_event()


@pytest.mark.parametrize(
    "body, code, field",
    [
        ({"id": 4, "method": "m", "params": {}, "extra": 1}, "bad_request", "extra"),
        ({"id": 4, "method": 7, "params": {}}, "bad_request", "method"),
        ({"id": 4, "method": "m", "params": [1]}, "bad_request", "method"),
        ({"id": 4, "cancel": False}, "bad_request", "cancel"),
    ],
)
def test_bad_messages_with_a_usable_id_are_answerable(body, code, field):
    _, server = pair()
    server.receive_data(raw_frame(msgpack.packb(body)))
    event = server.next_event()
    assert isinstance(event, BadMessage)
    assert (event.id, event.code, event.field) == (4, code, field)
    # The connection goes on.
    server.receive_data(raw_frame(msgpack.packb({"id": 5, "method": "ok", "params": {}})))
    assert server.next_event() == Request(5, "ok", {})


@pytest.mark.parametrize(
    "hello, token, match, code",
    [
        ({"hello": "swe-dapo", "version": PROTOCOL_VERSION + 1}, None, "unsupported protocol version", "bad_request"),
        ({"hello": "other", "version": 1}, None, "first frame must be a hello", "bad_request"),
        ({"id": 1, "method": "m", "params": {}}, None, "first frame must be a hello", "bad_request"),
        ({"hello": "swe-dapo", "version": 1, "token": "wrong"}, "right", "wrong token", "unauthorized"),
        ({"hello": "swe-dapo", "version": 1}, "right", "missing token", "unauthorized"),
        ({"hello": "swe-dapo", "version": 1, "token": 5}, "right", "token", "unauthorized"),
        ({"hello": "swe-dapo", "version": 1, "zzz": 1}, None, "unknown field 'zzz'", "bad_request"),
    ],
)
def test_bad_hellos(hello, token, match, code):
    server = Connection(Role.SERVER, expected_token=token)
    server.receive_data(raw_frame(msgpack.packb(hello)))
    with pytest.raises(RemoteProtocolError, match=match) as info:
        server.next_event()
    assert info.value.code == code


def test_right_token_is_accepted():
    server = Connection(Role.SERVER, expected_token="s3cret")
    server.receive_data(Connection(Role.CLIENT).send(Hello(token="s3cret")))
    assert server.next_event() == Hello(token="s3cret")


def test_eof_between_frames_is_clean_and_mid_frame_is_an_error():
    client, server = pair()
    server.receive_data(b"")
    assert server.next_event() is CLOSED
    client2, server2 = pair()
    server2.receive_data(client2.send(Request(1, "m", {}))[:-2])
    server2.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        server2.next_event()


def test_local_protocol_errors_name_our_mistake():
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError, match="first frame must be a hello"):
        client.send(Request(1, "m", {}))
    client.send(Hello())
    with pytest.raises(LocalProtocolError, match="hello already sent"):
        client.send(Hello())
    with pytest.raises(LocalProtocolError, match="may not send Response"):
        client.send(Response(1, None))
    with pytest.raises(LocalProtocolError, match="cannot be encoded"):
        client.send(Request(1, "m", {"x": object()}))
    small = Connection(Role.CLIENT, max_frame=1024)
    small.send(Hello())
    with pytest.raises(LocalProtocolError, match="exceeds max_frame") as info:
        small.send(Request(1, "m", {"x": os.urandom(4096)}))
    assert info.value.code == "limit" and info.value.whose == "local"


def test_connection_level_error_closes_our_side():
    server = Connection(Role.SERVER)
    frame = server.send(ErrorResponse(None, "unauthorized", "wrong token"))
    with pytest.raises(LocalProtocolError, match="already closed"):
        server.send(Hello())
    client = Connection(Role.CLIENT)
    client.send(Hello())
    client.receive_data(frame)
    # A server may refuse the hello with a connection-level error instead of its own hello.
    assert client.next_event() == ErrorResponse(None, "unauthorized", "wrong token")
    assert client.their_closed


def test_event_validation():
    with pytest.raises(TypeError, match="id"):
        Request(-1, "m", {})
    with pytest.raises(TypeError, match="method"):
        Request(1, "", {})
    with pytest.raises(TypeError, match="params"):
        Request(1, "m", [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="error code"):
        ErrorResponse(1, "teapot", "x")
    with pytest.raises(ValueError, match="max_frame"):
        Connection(Role.CLIENT, max_frame=1)


def test_nothing_big_is_buffered_before_the_hello():
    server = Connection(Role.SERVER, max_frame=64 << 20)
    server.receive_data(b"GET / HTTP/1.1\r\n")
    with pytest.raises(RemoteProtocolError, match="not a swe-dapo hello.*GET") as info:
        server.next_event()
    assert info.value.code == "bad_request"
