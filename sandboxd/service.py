"""The daemon's RPC surface: wire methods mapped onto a sandbox runtime (`ns`, `podman` or `dir`).

Methods (params -> result); ids are strings, byte payloads are msgpack bin:

    sandbox.create   image="host", limits={}, env={}, workdir="/testbed", repo=None -> {"sandbox"}
    sandbox.fork     snapshot, limits={}                                              -> {"sandbox"}
    sandbox.snapshot sandbox                                                          -> {"snapshot"}
    sandbox.restore  sandbox, snapshot=None                                           -> {}
    sandbox.exec     sandbox, argv, timeout_s=600, cwd=None, env={}, stdin=None,
                     max_output_bytes=1 MiB, stream=False                             -> ExecResult fields
                     (stream=True: output chunks arrive first as "output" notifications)
    sandbox.read_file  sandbox, path, max_bytes                                       -> {"data"}
    sandbox.write_file sandbox, path, data, mode=0o644, parents=True                  -> {}
    sandbox.list_dir   sandbox, path=".", max_entries=10000                          -> {"entries", "truncated"}
    sandbox.diff     sandbox, base_commit, timeout_s=120                              -> {"patch"}
    sandbox.stats    sandbox                                                          -> {...}
    sandbox.destroy  sandbox                                                          -> {}
    snapshot.delete  snapshot                                                         -> {}
    node.stats                                                                        -> runtime, calls, latency

Errors are the runtime's `SandboxError`s, whose codes are the wire's closed set, so a client sees
`NotFound` with `field="sandbox"` for an unknown id. The same `Router` serves sockets (`sandboxd serve`)
and the in-process mode of `sandboxd.client`.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, fields
from typing import Any, Protocol

from runtime.wire import CallContext, Router

from .errors import BadRequest
from .metrics import CallStats, LatencyHistogram

__all__ = ["RUNTIMES", "CallStats", "LatencyHistogram", "SandboxRuntime", "build_router", "open_runtime"]

log = logging.getLogger("sandboxd.calls")

RUNTIMES = ("ns", "podman", "dir")
_FIELD_ALIASES = {"sandbox_id": "sandbox", "snapshot_id": "snapshot"}


class SandboxRuntime(Protocol):
    """What a runtime provides; `NsRuntime` is the reference (see its docstrings)."""

    async def create(self, image: str = "host", *, limits: Any = None, env: dict | None = None,
                     workdir: str = "/testbed", repo: str | None = None) -> str: ...
    async def fork(self, snapshot_id: str, *, limits: Any = None) -> str: ...
    async def snapshot(self, sandbox_id: str) -> str: ...
    async def restore(self, sandbox_id: str, snapshot_id: str | None = None) -> None: ...
    async def delete_snapshot(self, snapshot_id: str) -> None: ...
    async def exec(self, sandbox_id: str, argv: Any, **kwargs: Any) -> Any: ...
    async def read_file(self, sandbox_id: str, path: str, **kwargs: Any) -> bytes: ...
    async def write_file(self, sandbox_id: str, path: str, data: bytes, **kwargs: Any) -> None: ...
    async def list_dir(self, sandbox_id: str, path: str = ".", **kwargs: Any) -> tuple[list, bool]: ...
    async def diff(self, sandbox_id: str, base_commit: str, **kwargs: Any) -> str: ...
    async def destroy(self, sandbox_id: str) -> None: ...
    async def sandbox_stats(self, sandbox_id: str) -> dict: ...
    def stats(self) -> dict: ...


def _limits(runtime: Any, value: dict | None, field: str = "limits") -> Any:
    if not value:
        return None
    from .ns import Limits  # the Limits dataclass is shared by every runtime

    known = {f.name for f in fields(Limits)}
    for key in value:
        if key not in known:
            raise BadRequest(f"unknown limit {key!r} (known: {', '.join(sorted(known))})", field=f"{field}.{key}")
    return Limits(**value).validate(field)


# Level of the log line for a call that failed with this code: the caller's mistakes are routine in
# RL rollouts (a model asking for a missing file); the daemon's own failures are not.
_ERROR_LEVELS = {"bad_request": logging.INFO, "not_found": logging.INFO, "timeout": logging.WARNING,
                 "limit": logging.WARNING, "busy": logging.WARNING, "unauthorized": logging.WARNING,
                 "internal": logging.ERROR}
_LIFECYCLE = {"sandbox.create": "created", "sandbox.fork": "forked", "sandbox.destroy": "destroyed"}


def _log_call(name: str, ctx: CallContext, params: dict, result: Any, exc: BaseException | None, ms: float) -> None:
    fields: dict[str, Any] = {"method": name, "peer": ctx.peer, "duration_ms": round(ms, 3)}
    sandbox = params.get("sandbox") or (result.get("sandbox") if isinstance(result, dict) else None)
    if sandbox:
        fields["sandbox"] = sandbox
    snapshot = params.get("snapshot") or (result.get("snapshot") if isinstance(result, dict) else None)
    if snapshot:
        fields["snapshot"] = snapshot
    if exc is None:
        verb = _LIFECYCLE.get(name)
        if verb:
            log.info("sandbox %s %s", sandbox, verb, extra=fields)
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("%s ok in %.1f ms", name, ms, extra=fields)
        return
    code = getattr(exc, "code", None)
    fields["code"] = code if isinstance(code, str) else "internal"
    if getattr(exc, "field", None):
        fields["field"] = exc.field
    # An exception without a code is logged with its traceback by the wire server; a coded
    # `internal` (sandboxd's Internal) is not, so its traceback goes here.
    log.log(_ERROR_LEVELS.get(fields["code"], logging.WARNING), "%s failed (%s): %s", name, fields["code"], exc,
            extra=fields, exc_info=exc if code == "internal" else None)


def build_router(runtime: SandboxRuntime, *, calls: CallStats | None = None) -> Router:
    """The daemon's methods over `runtime`. Each call's latency and outcome go to `calls` (the
    source of `node.stats` and of the Prometheus metrics) and to the log ("sandboxd.calls")."""
    router = Router()
    calls = calls if calls is not None else CallStats()

    def timed(name: str):
        calls.histogram(name)  # listed (with zero calls) from the start

        def wrap(fn):
            async def handler(ctx: CallContext, **params: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    result = await fn(ctx, **params)
                except Exception as exc:
                    # The runtime names its arguments sandbox_id/snapshot_id; the wire calls them
                    # sandbox/snapshot. Errors name the field the caller actually sent.
                    field = getattr(exc, "field", None)
                    if field in _FIELD_ALIASES:
                        exc.field = _FIELD_ALIASES[field]
                    ms = (time.perf_counter() - t0) * 1e3
                    code = getattr(exc, "code", None)
                    calls.record(name, code if isinstance(code, str) else "internal", ms)
                    _log_call(name, ctx, params, None, exc, ms)
                    raise
                except BaseException:  # cancelled: the caller stopped waiting, or the daemon stops
                    calls.record(name, "cancelled", (time.perf_counter() - t0) * 1e3)
                    raise
                ms = (time.perf_counter() - t0) * 1e3
                calls.record(name, "ok", ms)
                _log_call(name, ctx, params, result, None, ms)
                return result

            # Keep the signature so the router checks parameters against `fn`, not `**params`.
            handler.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
            handler.__annotations__ = fn.__annotations__
            handler.__wrapped__ = fn  # type: ignore[attr-defined]
            router.add(name, handler)
            return fn

        return wrap

    @timed("sandbox.create")
    async def create(ctx: CallContext, *, image: str = "host", limits: dict | None = None, env: dict | None = None,
                     workdir: str = "/testbed", repo: str | None = None) -> dict:
        sid = await runtime.create(image, limits=_limits(runtime, limits), env=env, workdir=workdir, repo=repo)
        return {"sandbox": sid}

    @timed("sandbox.fork")
    async def fork(ctx: CallContext, *, snapshot: str, limits: dict | None = None) -> dict:
        return {"sandbox": await runtime.fork(snapshot, limits=_limits(runtime, limits))}

    @timed("sandbox.snapshot")
    async def snapshot(ctx: CallContext, *, sandbox: str) -> dict:
        return {"snapshot": await runtime.snapshot(sandbox)}

    @timed("sandbox.restore")
    async def restore(ctx: CallContext, *, sandbox: str, snapshot: str | None = None) -> dict:
        await runtime.restore(sandbox, snapshot)
        return {}

    @timed("snapshot.delete")
    async def delete_snapshot(ctx: CallContext, *, snapshot: str) -> dict:
        await runtime.delete_snapshot(snapshot)
        return {}

    @timed("sandbox.exec")
    async def exec_(ctx: CallContext, *, sandbox: str, argv: list[str] | str, timeout_s: float = 600.0,
                    cwd: str | None = None, env: dict[str, str] | None = None, stdin: bytes | None = None,
                    max_output_bytes: int = 1 << 20, stream: bool = False) -> dict:
        async def on_output(chunk: bytes) -> None:
            await ctx.notify("output", chunk)

        result = await runtime.exec(sandbox, argv, timeout_s=timeout_s, cwd=cwd, env=env, stdin=stdin,
                                    max_output_bytes=max_output_bytes, on_output=on_output if stream else None)
        return asdict(result)

    @timed("sandbox.read_file")
    async def read_file(ctx: CallContext, *, sandbox: str, path: str, max_bytes: int = 64 << 20) -> dict:
        return {"data": await runtime.read_file(sandbox, path, max_bytes=max_bytes)}

    @timed("sandbox.write_file")
    async def write_file(ctx: CallContext, *, sandbox: str, path: str, data: bytes, mode: int = 0o644,
                         parents: bool = True) -> dict:
        await runtime.write_file(sandbox, path, data, mode=mode, parents=parents)
        return {}

    @timed("sandbox.list_dir")
    async def list_dir(ctx: CallContext, *, sandbox: str, path: str = ".", max_entries: int = 10000) -> dict:
        entries, truncated = await runtime.list_dir(sandbox, path, max_entries=max_entries)
        return {"entries": [asdict(e) for e in entries], "truncated": truncated}

    @timed("sandbox.diff")
    async def diff(ctx: CallContext, *, sandbox: str, base_commit: str, timeout_s: float = 120.0) -> dict:
        return {"patch": await runtime.diff(sandbox, base_commit, timeout_s=timeout_s)}

    @timed("sandbox.stats")
    async def sandbox_stats(ctx: CallContext, *, sandbox: str) -> dict:
        return await runtime.sandbox_stats(sandbox)

    @timed("sandbox.destroy")
    async def destroy(ctx: CallContext, *, sandbox: str) -> dict:
        await runtime.destroy(sandbox)
        return {}

    @router.method("node.stats")
    def node_stats(ctx: CallContext) -> dict:
        return {
            "runtime": runtime.stats(),
            "uptime_s": round(time.time() - calls.started_at, 3),
            "errors": calls.errors_by_code(),
            "latency": {name: hist.to_dict() for name, hist in calls.latency.items() if hist.total},
        }

    return router


@asynccontextmanager
async def open_runtime(kind: str, state_dir: str, **kwargs: Any) -> AsyncIterator[SandboxRuntime]:
    """Open the runtime named `kind` (``ns``, ``podman`` or ``dir``) with its state in `state_dir`."""
    if kind == "ns":
        from .ns import open_ns_runtime as opener

        # A stable cgroup parent per state directory: a daemon restarted on the same root sweeps
        # the groups its crashed predecessor left.
        digest = hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:10]
        kwargs.setdefault("cgroup_parent", f"sandboxd-{digest}")
    elif kind == "podman":
        from .podman import open_podman_runtime as opener
    elif kind == "dir":
        from .dirrt import open_dir_runtime as opener
    else:
        raise BadRequest(f"unknown runtime {kind!r} (known: {', '.join(RUNTIMES)})", field="runtime")
    async with opener(state_dir, **kwargs) as rt:
        yield rt
