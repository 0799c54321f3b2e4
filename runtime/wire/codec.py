"""The pure codec of the wire protocol: bytes in, events out, no I/O (in the manner of h11).

A frame is a 5-byte header and a body::

    +---------------------+----------+--------------------------------+
    | length: u32, big-end| flags: u8| body: `length` bytes (msgpack) |
    +---------------------+----------+--------------------------------+

`length` counts the body only. Flag bit 0 marks a zstd-compressed body; the other bits must be zero.
Bodies over `compress_threshold` bytes (64 KiB by default) are compressed when that makes them smaller.
A frame whose length or decompressed size exceeds `max_frame` (64 MiB by default) is a protocol error,
detected from the header before the body is buffered.

Bodies are msgpack maps; the first frame each way is a hello:

    hello          {"hello": "swe-dapo", "version": 1, "token": str | None, "info": map}
    request        {"id": n, "method": str, "params": map}
    response       {"id": n, "result": any}
    error          {"id": n | None, "error": {"code": str, "message": str, "data": any}}
    notification   {"id": n, "stream": str, "data": any}      streaming output of call n
    cancel         {"id": n, "cancel": True}                  client gave up on call n

An error with id None is about the connection itself: the sender closes after it. Request ids are the
client's; many calls share one connection and may complete in any order.

`Connection` is the state machine: `receive_data(bytes)`, `next_event() -> event | NEED_DATA |
CLOSED`, `send(event) -> bytes`. A frame that cannot be decoded raises `RemoteProtocolError` (the driver
answers with a connection-level error and closes). A well-framed message with a usable id but bad content
(unknown key, wrong type) becomes a `BadMessage` event so the driver can answer that one call and go on.
"""

from __future__ import annotations

import enum
import hmac
import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zstandard

from .errors import ERROR_CODES, LocalProtocolError, RemoteProtocolError

__all__ = [
    "CLOSED",
    "DEFAULT_COMPRESS_THRESHOLD",
    "DEFAULT_MAX_FRAME",
    "HEADER_SIZE",
    "NEED_DATA",
    "PROTOCOL_NAME",
    "PROTOCOL_VERSION",
    "BadMessage",
    "Cancel",
    "Connection",
    "ErrorResponse",
    "Event",
    "Hello",
    "Notification",
    "Request",
    "Response",
    "Role",
]

PROTOCOL_NAME = "swe-dapo"
PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME = 64 << 20
DEFAULT_COMPRESS_THRESHOLD = 64 << 10

_HEADER = struct.Struct(">IB")
HEADER_SIZE = _HEADER.size
FLAG_ZSTD = 0x01
_KNOWN_FLAGS = FLAG_ZSTD
# Request ids are unsigned 64-bit integers (msgpack's largest); the client counts up from 1.
_MAX_ID = (1 << 64) - 1
# zstd level 1: large payloads are mostly logs and token arrays; speed matters more than ratio.
_ZSTD_LEVEL = 1
# A hello is a few hundred bytes; anything bigger before authentication is refused unread.
_MAX_HELLO = 64 << 10
_SMALL_BODY = 4096


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
"""`next_event` needs more bytes before it can return an event."""
CLOSED = _Sentinel("CLOSED")
"""The peer closed the stream cleanly, between frames."""


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


# --- events ----------------------------------------------------------------------------------------


def _check_id(value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if type(value) is not int or not 0 <= value <= _MAX_ID:
        raise TypeError(f"id must be an unsigned 64-bit integer, got {value!r}")


@dataclass(frozen=True, slots=True)
class Hello:
    version: int = PROTOCOL_VERSION
    token: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if type(self.version) is not int:
            raise TypeError(f"version must be an int, got {self.version!r}")
        if self.token is not None and not isinstance(self.token, str):
            raise TypeError("token must be a str or None")
        if not isinstance(self.info, dict):
            raise TypeError("info must be a map")


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_id(self.id)
        if not isinstance(self.method, str) or not self.method:
            raise TypeError(f"method must be a non-empty str, got {self.method!r}")
        if not isinstance(self.params, dict):
            raise TypeError(f"params must be a map, got {type(self.params).__name__}")


@dataclass(frozen=True, slots=True)
class Response:
    id: int
    result: Any = None

    def __post_init__(self) -> None:
        _check_id(self.id)


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    id: int | None
    code: str
    message: str
    data: Any = None

    def __post_init__(self) -> None:
        _check_id(self.id, optional=True)
        if self.code not in ERROR_CODES:
            raise ValueError(f"error code must be one of {sorted(ERROR_CODES)}, got {self.code!r}")
        if not isinstance(self.message, str):
            raise TypeError("message must be a str")


@dataclass(frozen=True, slots=True)
class Notification:
    id: int
    stream: str
    data: Any = None

    def __post_init__(self) -> None:
        _check_id(self.id)
        if not isinstance(self.stream, str):
            raise TypeError(f"stream must be a str, got {self.stream!r}")


@dataclass(frozen=True, slots=True)
class Cancel:
    id: int

    def __post_init__(self) -> None:
        _check_id(self.id)


@dataclass(frozen=True, slots=True)
class BadMessage:
    """A well-framed message for call `id` whose content is invalid. Not sent; only received."""

    id: int
    code: str
    message: str
    field: str | None = None


Event = Hello | Request | Response | ErrorResponse | Notification | Cancel | BadMessage

# Which events each role may send once the hello is done. The server sends id-None errors too.
_SENDABLE = {
    Role.CLIENT: (Request, Cancel),
    Role.SERVER: (Response, ErrorResponse, Notification),
}
_RECEIVABLE = {Role.CLIENT: _SENDABLE[Role.SERVER], Role.SERVER: _SENDABLE[Role.CLIENT]}

# message kind -> (discriminating key, allowed keys)
_KINDS: dict[str, frozenset[str]] = {
    "hello": frozenset({"hello", "version", "token", "info"}),
    "method": frozenset({"id", "method", "params"}),
    "result": frozenset({"id", "result"}),
    "error": frozenset({"id", "error"}),
    "stream": frozenset({"id", "stream", "data"}),
    "cancel": frozenset({"id", "cancel"}),
}


# --- the state machine -----------------------------------------------------------------------------


class Connection:
    """Protocol state of one side of one connection.

    `expected_token` is used by the server role: when it is not None, the client's hello must carry
    exactly that token. Comparison is constant-time.
    """

    def __init__(
        self,
        role: Role,
        *,
        expected_token: str | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD,
    ) -> None:
        if max_frame < 64:
            raise ValueError(f"max_frame must be at least 64 bytes, got {max_frame}")
        if compress_threshold < 0:
            raise ValueError(f"compress_threshold must be >= 0, got {compress_threshold}")
        self.role = role
        self.max_frame = max_frame
        self.compress_threshold = compress_threshold
        self._expected_token = expected_token
        self._buf = bytearray()
        self._pos = 0  # start of unparsed bytes in _buf; compacted lazily
        self._eof = False
        self.our_hello_sent = False
        self.their_hello: Hello | None = None
        self.our_closed = False  # we sent a connection-level error: nothing more may be sent
        self.their_closed = False
        self._packer = msgpack.Packer(use_bin_type=True)
        # zstd contexts are made on first use: ~30 KB and ~0.1 ms each, times every connection a
        # daemon holds (most never send a frame large enough to compress).
        self._zc: zstandard.ZstdCompressor | None = None
        self._zd: zstandard.ZstdDecompressor | None = None
        self._receivable = _RECEIVABLE[role]
        # Look for the kinds this role receives most first.
        self._kind_order = ("method", "cancel", "hello", "result", "stream", "error") if role is Role.SERVER else (
            "result", "stream", "error", "hello", "method", "cancel")

    # -- receiving ---------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; `b""` means the peer closed its side."""
        if not data:
            self._eof = True
            return
        if self._pos and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def bytes_wanted(self) -> int:
        """How many more bytes complete the frame being received (a read-size hint, >= 1)."""
        avail = len(self._buf) - self._pos
        if avail < HEADER_SIZE:
            return HEADER_SIZE - avail
        length, _ = _HEADER.unpack_from(self._buf, self._pos)
        return max(1, HEADER_SIZE + length - avail)

    def next_event(self) -> Event | _Sentinel:
        """The next event, `NEED_DATA`, or `CLOSED` (peer closed cleanly between frames)."""
        body = self._next_body()
        if body is NEED_DATA:
            if self._eof:
                if len(self._buf) > self._pos:
                    raise RemoteProtocolError(
                        f"connection closed in the middle of a frame ({len(self._buf) - self._pos} bytes pending)"
                    )
                self.their_closed = True
                return CLOSED
            return NEED_DATA
        return self._to_event(body)

    def _next_body(self) -> Any:
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < HEADER_SIZE:
            return NEED_DATA
        length, flags = _HEADER.unpack_from(buf, pos)
        if self.their_hello is None and length > _MAX_HELLO:
            # Before the hello nobody is authenticated: never buffer more than a hello's worth.
            raise RemoteProtocolError(
                f"first frame is not a {PROTOCOL_NAME} hello (it starts {bytes(buf[pos:pos + 8])!r})"
            )
        if length > self.max_frame:
            raise RemoteProtocolError(
                f"frame of {length} bytes exceeds max_frame of {self.max_frame} bytes", code="limit"
            )
        if flags & ~_KNOWN_FLAGS:
            raise RemoteProtocolError(f"frame has unknown flag bits 0x{flags:02x}")
        end = pos + HEADER_SIZE + length
        if len(buf) < end:
            return NEED_DATA
        self._pos = end
        if length <= _SMALL_BODY and not flags:
            return self._unpack(buf[pos + HEADER_SIZE : end])  # copying a small body beats two views
        # Decode large bodies straight from the receive buffer, without copying them. The views must
        # be released before the buffer is resized by the next receive_data.
        with memoryview(buf) as view, view[pos + HEADER_SIZE : end] as piece:
            if flags & FLAG_ZSTD:
                return self._unpack(self._decompress(piece))
            return self._unpack(piece)

    def _decompress(self, raw: memoryview) -> bytes:
        # Before the hello nobody is authenticated: a compressed hello may inflate to a hello's worth
        # at most (a 2 KB zstd frame inflates to 60 MB, which msgpack would turn into half a GB).
        limit, what = (self.max_frame, "max_frame") if self.their_hello is not None else (_MAX_HELLO, "a hello's")
        try:
            size = zstandard.frame_content_size(raw)
        except zstandard.ZstdError as exc:
            raise RemoteProtocolError(f"compressed frame body is not a zstd frame: {exc}") from exc
        if size > limit:
            raise RemoteProtocolError(
                f"compressed frame inflates to {size} bytes, over {what} limit of {limit} bytes", code="limit"
            )
        try:
            # With an unknown content size (-1), max_output_size bounds the output buffer, so a
            # decompression bomb fails instead of allocating without limit.
            if self._zd is None:
                self._zd = zstandard.ZstdDecompressor()
            return self._zd.decompress(raw, max_output_size=limit)
        except zstandard.ZstdError as exc:
            raise RemoteProtocolError(f"cannot decompress frame body: {exc}") from exc

    @staticmethod
    def _unpack(raw: Any) -> Any:
        try:
            return msgpack.unpackb(raw, raw=False)
        except msgpack.ExtraData as exc:
            raise RemoteProtocolError("frame body holds more than one msgpack object") from exc
        except msgpack.StackError as exc:  # a ValueError with no message
            raise RemoteProtocolError("frame body is not valid msgpack: nested too deeply") from exc
        except (ValueError, TypeError, UnicodeDecodeError, msgpack.UnpackException) as exc:
            raise RemoteProtocolError(f"frame body is not valid msgpack: {exc}") from exc
        except RecursionError as exc:  # pragma: no cover - msgpack bounds nesting itself
            raise RemoteProtocolError("frame body is nested too deeply") from exc

    def _to_event(self, body: Any) -> Event:
        if not isinstance(body, dict):
            raise RemoteProtocolError(f"frame body must be a map, got {type(body).__name__}")
        if self.their_hello is None:
            if self.role is Role.CLIENT and "error" in body and body.get("id") is None:
                self.their_closed = True  # the server refused our hello (token, version, busy)
                return self._error_event(body, None)
            return self._receive_hello(body)
        for kind in self._kind_order:
            if kind in body:
                break
        else:
            raise RemoteProtocolError(f"message has none of the keys {sorted(_KINDS)}: {sorted(map(str, body))}")
        allowed = _KINDS[kind]
        if kind == "hello":
            raise RemoteProtocolError("hello sent twice")
        msg_id = body.get("id")
        if kind == "error" and msg_id is None:
            event: Event = self._error_event(body, None)
            if self.role is Role.SERVER:
                raise RemoteProtocolError("a client may not send errors")
            self.their_closed = True
            return event
        if type(msg_id) is not int or not 0 <= msg_id <= _MAX_ID:
            raise RemoteProtocolError(f"message 'id' must be an unsigned 64-bit integer, got {msg_id!r}")
        if not body.keys() <= allowed:
            name = sorted(map(str, body.keys() - allowed))[0]
            return BadMessage(msg_id, "bad_request", f"unknown field {name!r} in {kind} message", field=name)
        try:
            if kind == "method":
                event = Request(msg_id, body["method"], body.get("params") or {})
            elif kind == "result":
                event = Response(msg_id, body["result"])
            elif kind == "error":
                event = self._error_event(body, msg_id)
            elif kind == "stream":
                event = Notification(msg_id, body["stream"], body.get("data"))
            else:
                if body["cancel"] is not True:
                    return BadMessage(msg_id, "bad_request", "'cancel' must be true", field="cancel")
                event = Cancel(msg_id)
        except (TypeError, ValueError) as exc:
            return BadMessage(msg_id, "bad_request", f"invalid {kind} message: {exc}", field=kind)
        if not isinstance(event, self._receivable):
            raise RemoteProtocolError(f"a {self.role.value} may not receive {type(event).__name__} messages")
        return event

    @staticmethod
    def _error_event(body: dict, msg_id: int | None) -> ErrorResponse:
        err = body["error"]
        if not isinstance(err, dict):
            raise RemoteProtocolError("'error' must be a map")
        code = err.get("code")
        if code not in ERROR_CODES:
            # Keep the message: an unknown code from a newer peer is still worth reporting.
            return ErrorResponse(msg_id, "internal", f"unknown error code {code!r}: {err.get('message')}", err.get("data"))
        return ErrorResponse(msg_id, code, str(err.get("message", "")), err.get("data"))

    def _receive_hello(self, body: dict) -> Hello:
        if body.get("hello") != PROTOCOL_NAME:
            raise RemoteProtocolError(f"first frame must be a hello with 'hello': {PROTOCOL_NAME!r}")
        unknown = body.keys() - _KINDS["hello"]
        if unknown:
            raise RemoteProtocolError(f"unknown field {sorted(map(str, unknown))[0]!r} in hello")
        version = body.get("version")
        if version != PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"unsupported protocol version {version!r}: this peer speaks version {PROTOCOL_VERSION}"
            )
        token = body.get("token")
        if token is not None and not isinstance(token, str):
            raise RemoteProtocolError("hello 'token' must be a str", code="unauthorized")
        info = body.get("info") or {}
        if not isinstance(info, dict):
            raise RemoteProtocolError("hello 'info' must be a map")
        if self.role is Role.SERVER and self._expected_token is not None:
            if token is None or not hmac.compare_digest(token.encode(), self._expected_token.encode()):
                raise RemoteProtocolError(
                    "missing token" if token is None else "wrong token", code="unauthorized"
                )
        hello = Hello(version, token, info)
        self.their_hello = hello
        return hello

    # -- sending -----------------------------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """Encode `event` as one frame. Raises `LocalProtocolError` if it may not be sent now."""
        if self.our_closed:
            raise LocalProtocolError("connection already closed by a connection-level error")
        if not self.our_hello_sent:
            if not isinstance(event, Hello):
                # A server may reject a bad hello before sending its own.
                if not (self.role is Role.SERVER and isinstance(event, ErrorResponse) and event.id is None):
                    raise LocalProtocolError(f"the first frame must be a hello, not {type(event).__name__}")
            else:
                self.our_hello_sent = True
                return self.frame(
                    {"hello": PROTOCOL_NAME, "version": event.version, "token": event.token, "info": event.info}
                )
        elif isinstance(event, Hello):
            raise LocalProtocolError("hello already sent")
        cls = type(event)
        if cls is Request:
            body: dict[str, Any] = {"id": event.id, "method": event.method, "params": event.params}
        elif cls is Response:
            body = {"id": event.id, "result": event.result}
        elif cls is Notification:
            body = {"id": event.id, "stream": event.stream, "data": event.data}
        elif cls is ErrorResponse:
            if event.id is None:
                self.our_closed = True
            elif self.role is Role.CLIENT:
                raise LocalProtocolError("a client may not send errors")
            body = {"id": event.id, "error": {"code": event.code, "message": event.message, "data": event.data}}
            return self.frame(body)
        elif cls is Cancel:
            body = {"id": event.id, "cancel": True}
        else:
            raise LocalProtocolError(f"cannot send {cls.__name__}")
        if cls not in _SENDABLE[self.role]:
            raise LocalProtocolError(f"a {self.role.value} may not send {cls.__name__} messages")
        return self.frame(body)

    def frame(self, body: Any) -> bytes:
        """Pack and frame one message body (no state checks: `send` is the checked entry point)."""
        try:
            packed = self._packer.pack(body)
        except (TypeError, ValueError, OverflowError) as exc:
            raise LocalProtocolError(f"message cannot be encoded as msgpack: {exc}") from exc
        flags = 0
        if len(packed) > self.compress_threshold:
            if self._zc is None:
                self._zc = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
            compressed = self._zc.compress(packed)
            # Random payloads do not shrink: sending them raw saves the peer a decompression.
            if len(compressed) < len(packed):
                packed, flags = compressed, FLAG_ZSTD
        if len(packed) > self.max_frame:
            raise LocalProtocolError(
                f"message of {len(packed)} bytes exceeds max_frame of {self.max_frame} bytes", code="limit"
            )
        return _HEADER.pack(len(packed), flags) + packed
