"""The trio client of sandboxd: one API whether the daemon is across the network or in this process.

::

    async with sandboxd.client.connect("tcp://node7:7070", token=token) as node:   # a daemon
    async with sandboxd.client.open_local(runtime="ns") as node:                    # in-process
        async with node.open("host", repo="/path/to/repo") as sb:    # destroyed when the block ends
            res = await sb.exec("python -m pytest -q", timeout_s=300)
            snap = await sb.snapshot()
            await sb.restore(snap)
            patch = await sb.diff(base_commit)

Errors are `runtime.wire` exceptions in both modes (`NotFound` with `field="sandbox"` for an unknown
id, ...): the in-process mode goes through the daemon's own router, so parameters are checked and
errors mapped exactly as over a socket. A `Sandbox` is an `agent.workspace.Workspace`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import trio

from runtime.wire import (
    BadRequest,
    CallContext,
    ConnectionLost,
    NotFound,
    Router,
    RpcError,
    RpcTimeout,
    error_from_code,
    open_client,
)
from runtime.wire.codec import Notification

from .ns import DirEntry, ExecResult
from .service import build_router, open_runtime

__all__ = ["Caller", "LocalCaller", "Sandbox", "SandboxClient", "connect", "open_local"]

# Slack on top of an exec's own timeout for the RPC deadline: the daemon enforces the command's
# timeout itself and answers with timed_out=True; the call deadline only catches a dead daemon.
_RPC_SLACK_S = 30.0


class Caller(Protocol):
    """What the sandbox client needs from a connection: `runtime.wire.WireClient` or `LocalCaller`."""

    async def call(self, method: str, params: dict[str, Any] | None = None, *, timeout_s: float | None = None) -> Any: ...

    def stream(self, method: str, params: dict[str, Any] | None = None, *, timeout_s: float | None = None) -> Any: ...


def _as_wire_error(exc: Exception, method: str) -> RpcError:
    if isinstance(exc, RpcError):
        return exc
    code = getattr(exc, "code", None)
    if isinstance(code, str):
        field = getattr(exc, "field", None)
        return error_from_code(code, getattr(exc, "message", str(exc)), {"field": field} if field else None)
    return error_from_code("internal", f"{method} failed: {type(exc).__name__}: {exc}")


class _LocalStream:
    def __init__(self, receive: trio.MemoryReceiveChannel) -> None:
        self._receive = receive
        self.result: Any = None

    def __aiter__(self) -> _LocalStream:
        return self

    async def __anext__(self) -> Notification:
        try:
            kind, value = await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        if kind == "note":
            return value
        if kind == "error":
            raise value
        self.result = value
        raise StopAsyncIteration


class LocalCaller:
    """Calls a `Router`'s methods in this process, with the same checks and errors as the wire."""

    def __init__(self, router: Router, *, call_timeout_s: float = 600.0) -> None:
        self.router = router
        self.call_timeout_s = call_timeout_s
        self._ids = iter(range(1, 1 << 62))

    async def _invoke(self, method: str, params: dict[str, Any], notify: Callable[..., Awaitable[None]] | None) -> Any:
        entry = self.router.get(method)
        if entry is None:
            raise NotFound(f"unknown method {method!r}", field="method")
        try:
            entry.check(params)
            ctx = CallContext(next(self._ids), method, "local", notify)
            if entry.is_async:
                return await entry.fn(ctx, **params)
            return entry.fn(ctx, **params)
        except Exception as exc:
            raise _as_wire_error(exc, method) from exc

    async def call(self, method: str, params: dict[str, Any] | None = None, *, timeout_s: float | None = None) -> Any:
        timeout = self.call_timeout_s if timeout_s is None else timeout_s
        with trio.move_on_after(timeout):
            return await self._invoke(method, params or {}, None)
        raise RpcTimeout(f"{method}: no answer within {timeout} s")

    @asynccontextmanager
    async def stream(self, method: str, params: dict[str, Any] | None = None, *,
                     timeout_s: float | None = None) -> AsyncIterator[_LocalStream]:
        timeout = self.call_timeout_s if timeout_s is None else timeout_s
        send, receive = trio.open_memory_channel(256)

        async def notify(call_id: int, stream: str, data: Any) -> None:
            await send.send(("note", Notification(call_id, stream, data)))

        async def run() -> None:
            async with send:
                try:
                    result = await self._invoke(method, params or {}, notify)
                except RpcError as exc:
                    await send.send(("error", exc))
                else:
                    await send.send(("result", result))

        with trio.move_on_after(timeout) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                async with receive:
                    yield _LocalStream(receive)
                nursery.cancel_scope.cancel()
        if scope.cancelled_caught:
            raise RpcTimeout(f"{method}: stream not finished within {timeout} s")


class Sandbox:
    """A handle on one sandbox. `async with sb:` destroys it when the block ends."""

    def __init__(self, client: SandboxClient, sandbox_id: str, workdir: str = "/testbed") -> None:
        self.client = client
        self.id = sandbox_id
        self.workdir = workdir

    def __repr__(self) -> str:
        return f"Sandbox({self.id!r} on {self.client.node})"

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            try:
                await self.destroy()
            except (NotFound, ConnectionLost):
                pass  # already gone, or the node is: nothing left to clean from here

    async def exec(
        self,
        argv: Sequence[str] | str,
        *,
        timeout_s: float = 600.0,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        stdin: bytes | None = None,
        max_output_bytes: int = 1 << 20,
        on_output: Callable[[bytes], Awaitable[None]] | None = None,
    ) -> ExecResult:
        """Run a command; `on_output` receives output chunks as they come (streamed over the wire)."""
        if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
            raise BadRequest(f"timeout_s must be > 0 seconds, got {timeout_s!r}", field="timeout_s")
        params = {"sandbox": self.id, "argv": argv if isinstance(argv, str) else list(argv), "timeout_s": timeout_s,
                  "cwd": cwd, "env": env, "stdin": stdin, "max_output_bytes": max_output_bytes}
        deadline = timeout_s + _RPC_SLACK_S
        if on_output is None:
            result = await self.client.caller.call("sandbox.exec", params, timeout_s=deadline)
        else:
            params["stream"] = True
            async with self.client.caller.stream("sandbox.exec", params, timeout_s=deadline) as call:
                async for note in call:
                    if note.stream == "output":
                        await on_output(note.data)
            result = call.result
        return ExecResult(**result)

    async def read_file(self, path: str, *, max_bytes: int = 64 << 20) -> bytes:
        return (await self.client.caller.call("sandbox.read_file", {"sandbox": self.id, "path": path, "max_bytes": max_bytes}))["data"]

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644, parents: bool = True) -> None:
        await self.client.caller.call("sandbox.write_file", {"sandbox": self.id, "path": path, "data": data,
                                                            "mode": mode, "parents": parents})

    async def list_dir(self, path: str = ".", *, max_entries: int = 10000) -> tuple[list[DirEntry], bool]:
        out = await self.client.caller.call("sandbox.list_dir", {"sandbox": self.id, "path": path, "max_entries": max_entries})
        return [DirEntry(**e) for e in out["entries"]], out["truncated"]

    async def diff(self, base_commit: str, *, timeout_s: float = 120.0) -> str:
        out = await self.client.caller.call("sandbox.diff", {"sandbox": self.id, "base_commit": base_commit,
                                                            "timeout_s": timeout_s}, timeout_s=timeout_s + _RPC_SLACK_S)
        return out["patch"]

    async def snapshot(self) -> str:
        return (await self.client.caller.call("sandbox.snapshot", {"sandbox": self.id}))["snapshot"]

    async def restore(self, snapshot: str | None = None) -> None:
        await self.client.caller.call("sandbox.restore", {"sandbox": self.id, "snapshot": snapshot})

    async def stats(self) -> dict[str, Any]:
        return await self.client.caller.call("sandbox.stats", {"sandbox": self.id})

    async def destroy(self) -> None:
        await self.client.caller.call("sandbox.destroy", {"sandbox": self.id})


class SandboxClient:
    """Sandboxes on one node (a daemon, or this process)."""

    def __init__(self, caller: Caller, *, node: str) -> None:
        self.caller = caller
        self.node = node

    async def create(self, image: str = "host", *, limits: dict[str, int] | None = None, env: dict[str, str] | None = None,
                     workdir: str = "/testbed", repo: str | None = None, timeout_s: float = 600.0) -> Sandbox:
        """A new sandbox; `repo` is a directory on the node, copied to `workdir`."""
        out = await self.caller.call("sandbox.create", {"image": image, "limits": limits, "env": env,
                                                        "workdir": workdir, "repo": repo}, timeout_s=timeout_s)
        return Sandbox(self, out["sandbox"], workdir)

    @asynccontextmanager
    async def open(self, image: str = "host", **kwargs: Any) -> AsyncIterator[Sandbox]:
        """`create` as a context manager: the sandbox is destroyed when the block ends."""
        sandbox = await self.create(image, **kwargs)
        async with sandbox:
            yield sandbox

    async def fork(self, snapshot: str, *, limits: dict[str, int] | None = None, workdir: str = "/testbed") -> Sandbox:
        """A new sandbox sharing the snapshot's layers: G rollouts of one task cost one image."""
        out = await self.caller.call("sandbox.fork", {"snapshot": snapshot, "limits": limits})
        return Sandbox(self, out["sandbox"], workdir)

    def attach(self, sandbox_id: str, workdir: str = "/testbed") -> Sandbox:
        """A handle on an existing sandbox (no call is made)."""
        return Sandbox(self, sandbox_id, workdir)

    async def delete_snapshot(self, snapshot: str) -> None:
        await self.caller.call("snapshot.delete", {"snapshot": snapshot})

    async def stats(self) -> dict[str, Any]:
        return await self.caller.call("node.stats")


@asynccontextmanager
async def connect(address: str, *, token: str | None = None, **kwargs: Any) -> AsyncIterator[SandboxClient]:
    """A client of the daemon at `address` (``unix:/run/sandboxd.sock`` or ``tcp://host:7070``)."""
    async with open_client(address, token=token, name="sandboxd-client", **kwargs) as wire:
        yield SandboxClient(wire, node=address)


@asynccontextmanager
async def open_local(runtime: str = "ns", state_dir: str | None = None, **kwargs: Any) -> AsyncIterator[SandboxClient]:
    """Sandboxes in this process (no daemon, no socket), same API. `state_dir` defaults to a temp dir."""
    with tempfile.TemporaryDirectory(prefix="sandboxd-local-") as tmp:
        root = state_dir or os.path.join(tmp, "state")
        async with open_runtime(runtime, root, **kwargs) as rt:
            yield SandboxClient(LocalCaller(build_router(rt)), node=f"local:{runtime}")
