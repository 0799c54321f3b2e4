"""Method registry of a wire server, with parameter checking derived from the handler's signature.

A handler takes the call context first and its parameters as keyword arguments::

    router = Router()

    @router.method("sandbox.exec")
    async def exec_(ctx: CallContext, *, sandbox: str, cmd: str, timeout_s: float = 60.0) -> dict: ...

    @router.method("node.ping")
    def ping(ctx: CallContext) -> dict: ...

Unknown parameters, missing required ones and wrong types are answered with `bad_request` naming the
field (``params.timeout_s``) before the handler runs. Types checked: Any, None, bool, int, float (ints
accepted), str, bytes, list[T], dict[str, T], unions and Optional; other annotations are not checked.

Plain (non-async) handlers run inline in the connection's reader, in arrival order, without a task of
their own: they are the fast path and must not block. Async handlers each get a task, may stream
notifications through `ctx.notify`, and are cancelled when the client cancels the call or disconnects.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest

__all__ = ["CallContext", "Method", "Router"]


class CallContext:
    """What a handler knows about its call: id, method, peer, and a way to stream notifications."""

    __slots__ = ("id", "method", "peer", "_notify")

    def __init__(self, call_id: int, method: str, peer: str, notify: Callable[..., Any] | None) -> None:
        self.id = call_id
        self.method = method
        self.peer = peer
        self._notify = notify

    async def notify(self, stream: str, data: Any) -> None:
        """Send a notification for this call (waits while the connection's send buffer is full)."""
        if self._notify is None:
            raise RuntimeError(f"{self.method}: inline (non-async) handlers cannot stream notifications")
        await self._notify(self.id, stream, data)


Checker = Callable[[Any], bool]


def _checker(tp: Any) -> Checker | None:
    """A predicate for values of annotation `tp`, or None when `tp` is not checked."""
    if tp is Any or tp is inspect.Parameter.empty:
        return None
    if tp is None or tp is type(None):
        return lambda v: v is None
    if tp is bool:
        return lambda v: type(v) is bool
    if tp is int:
        return lambda v: type(v) is int
    if tp is float:
        return lambda v: type(v) in (float, int)
    if tp in (str, bytes):
        return lambda v: type(v) is tp
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        subs = [_checker(a) for a in args]
        if any(s is None for s in subs):
            return None
        return lambda v: any(s(v) for s in subs)  # type: ignore[misc]
    if origin is list or tp is list:
        item = _checker(args[0]) if args else None
        return lambda v: isinstance(v, list) and (item is None or all(item(x) for x in v))
    if origin is dict or tp is dict:
        value = _checker(args[1]) if len(args) == 2 else None
        return lambda v: isinstance(v, dict) and all(
            isinstance(k, str) and (value is None or value(x)) for k, x in v.items()
        )
    if origin is typing.Literal:
        allowed = set(args)
        return lambda v: v in allowed
    return None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    fn: Callable[..., Any]
    is_async: bool
    params: dict[str, tuple[bool, Checker | None, str]]  # name -> (required, checker, type name)
    accepts_any: bool  # **kwargs: no unknown-parameter check

    def check(self, params: dict[str, Any]) -> None:
        """Raise `BadRequest` naming the first bad field."""
        spec = self.params
        for key, value in params.items():
            entry = spec.get(key)
            if entry is None:
                if self.accepts_any:
                    continue
                known = ", ".join(sorted(spec)) or "none"
                raise BadRequest(f"{self.name}: unknown parameter {key!r} (known: {known})", field=f"params.{key}")
            checker = entry[1]
            if checker is not None and not checker(value):
                raise BadRequest(
                    f"{self.name}: parameter {key!r} must be {entry[2]}, got {type(value).__name__}",
                    field=f"params.{key}",
                )
        if len(params) < len(spec) or self.accepts_any:
            for key, (required, _, _) in spec.items():
                if required and key not in params:
                    raise BadRequest(f"{self.name}: missing required parameter {key!r}", field=f"params.{key}")


class Router:
    """Maps method names to handlers."""

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}

    def method(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.add(name or fn.__name__, fn)
            return fn

        return register

    def add(self, name: str, fn: Callable[..., Any]) -> None:
        if not name or not isinstance(name, str):
            raise ValueError(f"method name must be a non-empty string, got {name!r}")
        if name in self._methods:
            raise ValueError(f"method {name!r} is already registered")
        sig = inspect.signature(fn)
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # unresolvable forward references: check names, not types
            hints = {}
        params: dict[str, tuple[bool, Checker | None, str]] = {}
        accepts_any = False
        positional = [p for p in sig.parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not positional:
            raise TypeError(f"handler for {name!r} must take the call context as its first argument")
        for i, p in enumerate(sig.parameters.values()):
            if i == 0:
                continue  # the context
            if p.kind is p.VAR_KEYWORD:
                accepts_any = True
                continue
            if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
                raise TypeError(f"handler for {name!r}: parameter {p.name!r} must be passable by keyword")
            tp = hints.get(p.name, p.annotation)
            params[p.name] = (p.default is p.empty, _checker(tp), _type_name(tp))
        self._methods[name] = Method(name, fn, inspect.iscoroutinefunction(fn), params, accepts_any)

    def get(self, name: str) -> Method | None:
        return self._methods.get(name)

    def names(self) -> list[str]:
        return sorted(self._methods)
