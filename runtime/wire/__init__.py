"""The runtime wire protocol: framed msgpack RPC over Unix sockets and TCP.

`codec` is the pure protocol (frames, events, the connection state machine); `server` and `client` are
thin trio drivers. See `codec` for the frame layout and messages and `errors` for the exception tree.
"""

from .client import CallStream, WireClient, open_client
from .codec import (
    DEFAULT_COMPRESS_THRESHOLD,
    DEFAULT_MAX_FRAME,
    PROTOCOL_NAME,
    PROTOCOL_VERSION,
    Connection,
    Role,
)
from .errors import (
    ERROR_CODES,
    BadRequest,
    Busy,
    ConnectionLost,
    InternalError,
    LimitExceeded,
    LocalProtocolError,
    NotFound,
    ProtocolError,
    RemoteProtocolError,
    RpcError,
    RpcTimeout,
    Unauthorized,
    WireError,
    error_from_code,
)
from .router import CallContext, Router
from .server import WireServer
from .transport import parse_address

__all__ = [
    "DEFAULT_COMPRESS_THRESHOLD",
    "DEFAULT_MAX_FRAME",
    "ERROR_CODES",
    "PROTOCOL_NAME",
    "PROTOCOL_VERSION",
    "BadRequest",
    "Busy",
    "CallContext",
    "CallStream",
    "Connection",
    "ConnectionLost",
    "InternalError",
    "LimitExceeded",
    "LocalProtocolError",
    "NotFound",
    "ProtocolError",
    "RemoteProtocolError",
    "Role",
    "Router",
    "RpcError",
    "RpcTimeout",
    "Unauthorized",
    "WireClient",
    "WireServer",
    "WireError",
    "error_from_code",
    "open_client",
    "parse_address",
]
