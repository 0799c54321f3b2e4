"""Thin trio I/O under the codec: addresses, listeners, connecting, and the coalescing writer.

Addresses are strings: ``unix:/run/sandboxd.sock`` (also ``unix:///run/sandboxd.sock``) or
``tcp://host:port`` (``tcp://[::1]:7070`` for IPv6). Unix listeners are created mode 0600.
"""

from __future__ import annotations

import errno
import logging
import os
import socket as stdsocket
import stat
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .errors import ConnectionLost

__all__ = ["Address", "Outbox", "open_listener", "open_stream", "parse_address"]

log = logging.getLogger("swe_dapo.wire")

# Frames this large are sent on their own rather than joined with small ones: joining would copy them.
_JOIN_LIMIT = 256 << 10
_LISTEN_BACKLOG = 4096


@dataclass(frozen=True, slots=True)
class Address:
    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_address(text: str) -> Address:
    """Parse ``unix:PATH`` or ``tcp://HOST:PORT``; errors say what is wrong with the string."""
    if not isinstance(text, str):
        raise ValueError(f"address must be a string like 'unix:/run/sandboxd.sock', got {text!r}")
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError(f"address {text!r}: unix socket path is empty")
        return Address("unix", path=path)
    if text.startswith("tcp://"):
        rest = text[len("tcp://") :]
        if rest.startswith("["):
            host, sep, port_text = rest[1:].partition("]:")
        else:
            host, sep, port_text = rest.rpartition(":")
        if not sep or not host:
            raise ValueError(f"address {text!r}: expected tcp://HOST:PORT")
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"address {text!r}: port {port_text!r} is not a number") from None
        if not 0 <= port <= 65535:
            raise ValueError(f"address {text!r}: port {port} is out of range")
        return Address("tcp", host=host, port=port)
    raise ValueError(f"address {text!r}: expected 'unix:PATH' or 'tcp://HOST:PORT'")


async def open_stream(address: Address) -> trio.SocketStream:
    if address.kind == "unix":
        return await trio.open_unix_socket(address.path)
    return await trio.open_tcp_stream(address.host, address.port)


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it")
    probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: left by a crashed server
    else:
        raise OSError(errno.EADDRINUSE, f"another server is listening on {path}")
    finally:
        probe.close()


async def open_listener(address: Address) -> tuple[trio.SocketListener, str]:
    """Bind a listener; returns it and the bound address (the real port for ``tcp://...:0``)."""
    if address.kind == "unix":
        _remove_stale_socket(address.path)
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket file is born 0600: no window where others may connect
        try:
            await sock.bind(address.path)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(address.path, 0o600)
        sock.listen(_LISTEN_BACKLOG)
        return trio.SocketListener(sock), str(address)
    listeners = await trio.open_tcp_listeners(address.port, host=address.host, backlog=_LISTEN_BACKLOG)
    if len(listeners) != 1:  # "localhost" may resolve to both families: keep it predictable
        for extra in listeners[1:]:
            await extra.aclose()
    listener = listeners[0]
    host, port = listener.socket.getsockname()[:2]
    return listener, str(Address("tcp", host=host, port=port))


class Outbox:
    """Coalesces frames from many tasks into few `send_all` calls.

    One writer task (`run`) owns the send side of the stream. Producers append frames without any I/O
    (`put_nowait`), so a caller that is cancelled can never leave half a frame on the wire. Frames queued
    while a send is in progress go out together in the next send: with 64 callers, one syscall carries
    dozens of requests. `put` waits while more than `high_water` bytes are queued (backpressure).
    """

    def __init__(self, stream: trio.abc.SendStream, *, high_water: int = 4 << 20,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self._stream = stream
        self._chunks: list[bytes] = []
        self._queued = 0
        self._sending = False
        self.high_water = high_water
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._space_lot = trio.lowlevel.ParkingLot()
        self.error: BaseException | None = None
        self._on_error = on_error
        self.bytes_sent = 0

    @property
    def queued_bytes(self) -> int:
        return self._queued

    def put_nowait(self, frame: bytes) -> None:
        if self.error is not None:
            raise ConnectionLost(f"connection is broken: {self.error}") from self.error
        self._chunks.append(frame)
        self._queued += len(frame)
        if self._writer_lot:
            self._writer_lot.unpark()

    async def wait_writable(self) -> None:
        while self._queued > self.high_water and self.error is None:
            await self._space_lot.park()
        if self.error is not None:
            raise ConnectionLost(f"connection is broken: {self.error}") from self.error

    async def put(self, frame: bytes) -> None:
        await self.wait_writable()
        self.put_nowait(frame)

    async def drain(self) -> None:
        """Wait until everything queued has been handed to the stream."""
        while (self._chunks or self._sending) and self.error is None:
            await self._space_lot.park()

    async def run(self) -> None:
        try:
            while True:
                while not self._chunks:
                    await self._writer_lot.park()
                chunks, self._chunks = self._chunks, []
                self._sending = True
                for data in _coalesce(chunks):
                    await self._stream.send_all(data)
                    self._queued -= len(data)
                    self.bytes_sent += len(data)
                self._sending = False
                self._space_lot.unpark_all()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.error = exc
            self._space_lot.unpark_all()
            if self._on_error is not None:
                self._on_error(exc)


def _coalesce(chunks: list[bytes]) -> list[bytes]:
    if len(chunks) == 1:
        return chunks
    out: list[bytes] = []
    small: list[bytes] = []
    for chunk in chunks:
        if len(chunk) >= _JOIN_LIMIT:
            if small:
                out.append(b"".join(small))
                small = []
            out.append(chunk)
        else:
            small.append(chunk)
    if small:
        out.append(b"".join(small))
    return out
