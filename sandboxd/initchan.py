"""The daemon's end of the socketpair to one sandbox's init (see `_init.py` for the protocol).

One reader task per sandbox (owned by the runtime's nursery) dispatches replies and exit
notices to the calls waiting on them. When init dies, every waiting call fails with Internal.
Init's first message is `ready` (or `fatal`, why its start-up failed); `ready()` waits for it.
Other messages without an id are notices, handed to `on_notice`.
"""

from __future__ import annotations

import array
import itertools
import json
import socket
from typing import Callable

import trio

from sandboxd.errors import BadRequest, Internal, LimitExceeded, NotFound

__all__ = ["InitChannel", "InitCall", "MAX_REQUEST_BYTES"]

MAX_REQUEST_BYTES = 512 * 1024  # argv + env of one exec; the socket buffers are sized for it


class InitCall:
    """One request to init: its reply, and for an exec, its exit notice."""

    def __init__(self, call_id: int) -> None:
        self.id = call_id
        self._reply: dict | None = None
        self._exit: int | None = None
        self._replied = trio.Event()
        self._exited = trio.Event()
        self._broken: str | None = None

    def _fail(self, why: str) -> None:
        self._broken = why
        self._replied.set()
        self._exited.set()

    async def reply(self) -> dict:
        await self._replied.wait()
        if self._reply is None:
            raise Internal(f"sandbox init is gone: {self._broken}")
        if "error" in self._reply:
            kind, field, text = self._reply.get("kind"), self._reply.get("field"), self._reply["error"]
            if kind == "not_found":
                raise NotFound(text, field=field)
            if kind == "bad_request":
                raise BadRequest(text, field=field)
            if kind == "limit":
                raise LimitExceeded(text, field=field)
            raise Internal(f"sandbox init: {text}")
        return self._reply

    async def exited(self) -> int:
        """The exit code (negative: killed by that signal) of the exec's command."""
        await self._exited.wait()
        if self._exit is None:
            raise Internal(f"sandbox init is gone: {self._broken}")
        return self._exit

    @property
    def has_exited(self) -> bool:
        return self._exit is not None


class InitChannel:
    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * MAX_REQUEST_BYTES)
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._calls: dict[int, InitCall] = {}
        self._ids = itertools.count(1)
        self._ready = trio.Event()
        self.closed: str | None = None
        self.on_notice: Callable[[dict], None] | None = None

    async def ready(self) -> None:
        """Wait for init's start-up to end; Internal (with init's reason) if it failed."""
        await self._ready.wait()
        if self.closed:
            raise Internal(f"sandbox init failed to start: {self.closed}")

    def new_call(self) -> InitCall:
        if self.closed:
            raise Internal(f"sandbox init is gone: {self.closed}")
        call = InitCall(next(self._ids))
        self._calls[call.id] = call
        return call

    async def send(self, call: InitCall, msg: dict, fds: tuple[int, ...] = ()) -> None:
        data = json.dumps({**msg, "id": call.id}).encode()
        if len(data) > MAX_REQUEST_BYTES:
            self._calls.pop(call.id, None)
            raise LimitExceeded(f"request of {len(data)} bytes exceeds {MAX_REQUEST_BYTES}", field="argv")
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            await self._sock.sendmsg([data], anc)
        except (OSError, trio.ClosedResourceError) as exc:
            self._calls.pop(call.id, None)
            raise Internal(f"sandbox init is gone: {exc}") from exc

    async def request(self, msg: dict) -> dict:
        call = self.new_call()
        await self.send(call, msg)
        try:
            return await call.reply()
        finally:
            self._calls.pop(call.id, None)

    def forget(self, call: InitCall) -> None:
        self._calls.pop(call.id, None)

    async def read_forever(self) -> None:
        """Dispatch init's messages until it closes its end (or we close ours)."""
        why = "closed"
        try:
            while True:
                data = await self._sock.recv(65536)
                if not data:
                    why = "init exited"
                    return
                msg = json.loads(data)
                call = self._calls.get(msg.get("id"))
                if call is None:
                    if msg.get("ready"):
                        self._ready.set()
                    elif "fatal" in msg:
                        why = str(msg["fatal"])
                        return
                    elif "id" not in msg and self.on_notice is not None:
                        self.on_notice(msg)
                    continue
                if "exit" in msg:
                    call._exit = int(msg["exit"])
                    call._exited.set()
                    self._calls.pop(call.id, None)
                else:
                    call._reply = msg
                    call._replied.set()
        except (OSError, trio.ClosedResourceError) as exc:
            why = str(exc) or type(exc).__name__
        finally:
            self.closed = why
            self._ready.set()
            for call in self._calls.values():
                call._fail(why)
            self._calls.clear()

    def close(self) -> None:
        self.closed = self.closed or "closed"
        self._sock.close()
