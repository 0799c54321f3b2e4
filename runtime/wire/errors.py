"""The one exception tree of the wire protocol.

::

    WireError                      base of everything runtime.wire raises
    ├── RpcError                   a call answered with an error (or timed out locally)
    │   ├── BadRequest             code "bad_request"   malformed or invalid request; `field` names what
    │   ├── NotFound               code "not_found"     unknown method, sandbox, snapshot, ...
    │   ├── RpcTimeout             code "timeout"       the call's deadline passed
    │   ├── LimitExceeded          code "limit"         a size, count or resource limit was hit
    │   ├── Unauthorized           code "unauthorized"  missing or wrong token
    │   ├── Busy                   code "busy"          too many connections / calls in flight
    │   └── InternalError          code "internal"      a bug or an unexpected failure on the peer
    ├── ProtocolError              the byte stream itself broke the protocol; the connection is closed
    │   ├── LocalProtocolError     we tried to send something invalid (our bug)
    │   └── RemoteProtocolError    the peer sent something invalid (its bug)
    └── ConnectionLost             could not connect, or the connection dropped mid-call: the call
                                   may or may not have run on the peer

The set of error codes is closed (`ERROR_CODES`): a server handler raises an `RpcError` subclass (or
any exception with a `code` attribute from that set, like `sandboxd`'s errors) and the client raises the
same subclass, so `except NotFound` works across the network.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ERROR_CODES",
    "BadRequest",
    "Busy",
    "ConnectionLost",
    "InternalError",
    "LimitExceeded",
    "LocalProtocolError",
    "NotFound",
    "ProtocolError",
    "RemoteProtocolError",
    "RpcError",
    "RpcTimeout",
    "Unauthorized",
    "WireError",
    "error_from_code",
]


class WireError(Exception):
    """Base of every exception raised by `runtime.wire`."""


class RpcError(WireError):
    """A call failed with one of the documented error codes.

    `field` names the offending part of the request when there is one (for example
    ``"params.timeout_s"``); it travels in ``data["field"]``.
    """

    code: str = "internal"

    def __init__(self, message: str, *, field: str | None = None, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if field is not None:
            data = dict(data or {}, field=field)
        self.data = data

    @property
    def field(self) -> str | None:
        if isinstance(self.data, dict):
            value = self.data.get("field")
            return value if isinstance(value, str) else None
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, data={self.data!r})"


class BadRequest(RpcError):
    code = "bad_request"


class NotFound(RpcError):
    code = "not_found"


class RpcTimeout(RpcError):
    code = "timeout"


class LimitExceeded(RpcError):
    code = "limit"


class Unauthorized(RpcError):
    code = "unauthorized"


class Busy(RpcError):
    code = "busy"


class InternalError(RpcError):
    code = "internal"


_BY_CODE: dict[str, type[RpcError]] = {
    cls.code: cls
    for cls in (BadRequest, NotFound, RpcTimeout, LimitExceeded, Unauthorized, Busy, InternalError)
}
ERROR_CODES: frozenset[str] = frozenset(_BY_CODE)


def error_from_code(code: str, message: str, data: Any = None) -> RpcError:
    """The typed exception for a code received from a peer (unknown codes become `InternalError`)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return InternalError(f"peer sent unknown error code {code!r}: {message}", data=data)
    return cls(message, data=data)


class ProtocolError(WireError):
    """The byte stream broke the protocol. `code` is the error code sent to (or got from) the peer."""

    whose = "unknown"

    def __init__(self, message: str, *, code: str = "bad_request") -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow: a bug on this side."""

    whose = "local"


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow: a bug (or an attack) on the other side."""

    whose = "remote"


class ConnectionLost(WireError):
    """Could not connect, or the connection closed while a call was in flight.

    A call that fails this way may or may not have run on the server; retrying is the caller's policy.
    """
