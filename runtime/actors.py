"""Actors on trio: supervised children, bounded mailboxes, and request/reply.

This module owns three small things the rest of the project builds on:

- `open_supervisor(name)`: a task group whose children are restarted by a `RestartPolicy`
  (``never`` / ``on_failure`` / ``always``), with restart intensity as in Erlang/OTP (at most
  `max_restarts` within `window_s`) and capped exponential backoff with jitter between restarts. A child
  that exceeds its intensity makes the supervisor fail loudly: every other child and the body of the
  ``async with`` are cancelled and `SupervisorError` is raised, naming the child, with the child's last
  exception as ``__cause__``. Leaving the block (or `Supervisor.cancel`) cancels the children.
- `Mailbox[T]`: a bounded FIFO (a trio memory channel, capacity >= 1, never unbounded) whose `send`
  blocks when full. It keeps the numbers that show backpressure: depth, high-water mark, totals, and the
  time senders spent blocked. Deadlines are the caller's: ``with trio.fail_after(s): await box.send(x)``.
- `Reply[T]` and `request(...)`: a one-shot reply slot carried inside a message, which is all an
  "actor" needs here. An actor is just a supervised task that owns some state and reads its mailbox::

      async def counter(inbox: Mailbox[Incr | Get]) -> None:
          total = 0
          async for message in inbox:
              match message:
                  case Incr(n): total += n
                  case Get(reply): reply.set(total)

      async with open_supervisor("stats") as sup:
          sup.start_child("counter", counter, inbox, restart=RestartPolicy("always"))
          with trio.fail_after(5):
              total = await request(inbox, Get)

  The mailbox outlives the task, so a restarted actor goes on with the messages that queued meanwhile.

Exceptions::

    ActorError             base of everything this module raises on purpose
    ├── SupervisorError    a child failed beyond its restart policy; __cause__ is its last exception
    └── MailboxClosed      send() / try_send() on a closed mailbox

Receiving from a closed, drained mailbox raises `trio.EndOfChannel` (and ends ``async for``), as trio's
own channels do. Misuse (bad capacity, bad policy field, duplicate child name, a reply set twice) raises
`ValueError` / `TypeError` / `RuntimeError` naming the culprit.

Logging goes to the ``runtime.actors`` logger: restarts at WARNING, give-ups at ERROR, normal exits at
DEBUG.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, Literal, TypeVar

import trio

__all__ = [
    "ActorError",
    "ChildStatus",
    "Mailbox",
    "MailboxClosed",
    "MailboxStats",
    "Reply",
    "RestartPolicy",
    "Supervisor",
    "SupervisorError",
    "SupervisorStatus",
    "open_supervisor",
    "request",
]

_log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M")
R = TypeVar("R")

RestartMode = Literal["never", "on_failure", "always"]
_MODES: tuple[str, ...] = ("never", "on_failure", "always")


# --------------------------------------------------------------------------- exceptions


class ActorError(Exception):
    """Base of the exceptions `runtime.actors` raises on purpose."""


class SupervisorError(ActorError):
    """A child failed beyond its restart policy and the supervisor gave up.

    `child` names it, `restarts` is how many times it had been restarted, and ``__cause__`` is its last
    exception (None when an ``always`` child kept returning normally until the intensity ran out).
    """

    def __init__(self, message: str, *, supervisor: str, child: str, restarts: int) -> None:
        super().__init__(message)
        self.supervisor = supervisor
        self.child = child
        self.restarts = restarts


class MailboxClosed(ActorError):
    """`send` or `try_send` on a mailbox after `Mailbox.close`; the item was not delivered."""


# --------------------------------------------------------------------------- restart policy


@dataclass(frozen=True)
class RestartPolicy:
    """When and how fast a supervised child is restarted.

    Erlang/OTP names: ``always`` = permanent, ``on_failure`` = transient. Unlike OTP's temporary
    children, a ``never`` child that fails takes the supervisor down with it (the failure propagates);
    a child whose failure is routine should turn it into data itself.
    """

    mode: RestartMode = "on_failure"
    # Restart intensity: more than `max_restarts` restarts within `window_s` seconds means the failure is
    # not transient, so the supervisor gives up. 0 means the first failure is fatal.
    max_restarts: int = 3
    window_s: float = 60.0
    # Delay before the k-th restart within the window: backoff_initial_s * backoff_multiplier**k, capped
    # at backoff_max_s. Restarts that age out of the window stop counting, so a child that ran well for
    # a whole window starts again from backoff_initial_s.
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 30.0
    backoff_multiplier: float = 2.0
    # Each delay is scaled by a uniform factor in [1 - jitter, 1 + jitter] so that children that failed
    # together (a lost node, a dead endpoint) do not all come back in the same instant.
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"RestartPolicy.mode must be one of {_MODES}, got {self.mode!r}")
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int):
            raise TypeError(f"RestartPolicy.max_restarts must be an int, got {self.max_restarts!r}")
        if self.max_restarts < 0:
            raise ValueError(f"RestartPolicy.max_restarts must be >= 0, got {self.max_restarts}")
        for name in ("window_s", "backoff_initial_s", "backoff_max_s", "backoff_multiplier", "jitter"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"RestartPolicy.{name} must be a finite number, got {value!r}")
        if self.window_s <= 0:
            raise ValueError(f"RestartPolicy.window_s must be > 0, got {self.window_s}")
        if self.backoff_initial_s < 0:
            raise ValueError(f"RestartPolicy.backoff_initial_s must be >= 0, got {self.backoff_initial_s}")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"RestartPolicy.backoff_max_s ({self.backoff_max_s}) must be >= backoff_initial_s "
                f"({self.backoff_initial_s})"
            )
        if self.backoff_multiplier < 1:
            raise ValueError(f"RestartPolicy.backoff_multiplier must be >= 1, got {self.backoff_multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"RestartPolicy.jitter must be in [0, 1], got {self.jitter}")

    def backoff_s(self, restart_index: int, rand: float) -> float:
        """Seconds to wait before restart number `restart_index` (0-based) within the window.

        `rand` is a uniform draw in [0, 1); passing it in keeps this pure and testable.
        """
        base = min(self.backoff_max_s, self.backoff_initial_s * self.backoff_multiplier**restart_index)
        return min(self.backoff_max_s, base * (1 + self.jitter * (2 * rand - 1)))


# --------------------------------------------------------------------------- supervisor

ChildState = Literal["starting", "running", "backoff"]


@dataclass(frozen=True)
class ChildStatus:
    """A live child, as seen at one instant (for stats and metrics)."""

    name: str
    state: ChildState  # "starting": a service before its first started(); "backoff": waiting to restart
    restarts: int  # restarts so far, over the child's whole life
    last_error: str | None  # repr of the last exception, None if it never failed


@dataclass(frozen=True)
class SupervisorStatus:
    """Live children and lifetime totals. Children leave `children` when they finish for good, so the
    table stays as large as what is running, not as large as everything ever started."""

    name: str
    children: Mapping[str, ChildStatus]
    started: int  # children ever added
    finished: int  # children that ended for good (returned, gave up, or were cancelled)
    failures: int  # exceptions raised by children, restarted or not
    restarts: int  # restarts performed


@dataclass(eq=False)
class _Child:
    name: str
    async_fn: Callable[..., Awaitable[object]]
    args: tuple[Any, ...]
    policy: RestartPolicy
    is_service: bool  # started with Supervisor.start: gets a task_status
    state: ChildState = "running"
    restarts: int = 0
    last_error: BaseException | None = None
    # Times (trio clock) of the restarts still inside the policy window; never longer than max_restarts.
    recent_restarts: deque[float] = field(default_factory=deque)

    def status(self) -> ChildStatus:
        last = None if self.last_error is None else repr(self.last_error)
        return ChildStatus(self.name, self.state, self.restarts, last)


class _StartedOnce:
    """The task_status handed to a supervised service.

    The first started(value) reaches the caller of `Supervisor.start`; after a restart the service calls
    started() again and that call is ignored, so a service need not know whether it is being restarted.
    """

    def __init__(self, inner: trio.TaskStatus[Any], child: _Child) -> None:
        self._inner = inner
        self._child = child
        self.called = False

    def started(self, value: object = None) -> None:
        if self.called:
            return
        self.called = True
        self._child.state = "running"
        self._inner.started(value)


def _cancelled() -> bool:
    # trio reports -inf as the effective deadline once an enclosing scope has been cancelled.
    return trio.current_effective_deadline() == -math.inf


class Supervisor:
    """Children under one restart regime. Get one from `open_supervisor`; do not construct it."""

    def __init__(self, name: str, nursery: trio.Nursery) -> None:
        self.name = name
        self._nursery = nursery
        self._children: dict[str, _Child] = {}
        self._failure: SupervisorError | None = None
        self._idle = trio.Event()
        self._idle.set()
        self._started = self._finished = self._failures = self._restarts = 0

    def start_child(
        self,
        name: str,
        async_fn: Callable[..., Awaitable[object]],
        *args: Any,
        restart: RestartPolicy = RestartPolicy(),
    ) -> None:
        """Run ``async_fn(*args)`` as a child named `name` (unique among live children), like
        ``nursery.start_soon``."""
        child = self._register(name, async_fn, args, restart, is_service=False)
        try:
            self._nursery.start_soon(self._supervise, child, name=f"{self.name}/{name}")
        except BaseException:
            self._unregister(child)
            raise

    async def start(
        self,
        name: str,
        async_fn: Callable[..., Awaitable[object]],
        *args: Any,
        restart: RestartPolicy = RestartPolicy(),
    ) -> Any:
        """Run a service ``async_fn(*args, task_status=...)`` as a child, like ``nursery.start``: return
        the value it passes to ``task_status.started(value)``.

        If the first run fails before calling started(), that exception is raised here and the child is
        not restarted: a service that never came up is the caller's problem, not a crash to retry. After
        started(), the restart policy applies; on restarts started() is called again and ignored.
        """
        child = self._register(name, async_fn, args, restart, is_service=True)
        child.state = "starting"
        try:
            return await self._nursery.start(self._supervise, child, name=f"{self.name}/{name}")
        except BaseException:
            # Usually already done by the child's own finally; not if its task never got to run.
            self._unregister(child)
            raise

    def cancel(self) -> None:
        """Cancel every child and the body of the ``async with``; the block then exits without error."""
        self._nursery.cancel_scope.cancel()

    async def join(self) -> None:
        """Wait until no child is live (each returned, or gave up). ``always`` children never finish."""
        await trio.lowlevel.checkpoint()
        while self._children:
            await self._idle.wait()

    def status(self) -> SupervisorStatus:
        children = {name: child.status() for name, child in self._children.items()}
        return SupervisorStatus(
            name=self.name,
            children=MappingProxyType(children),
            started=self._started,
            finished=self._finished,
            failures=self._failures,
            restarts=self._restarts,
        )

    # -- internals

    def _register(
        self,
        name: str,
        async_fn: Callable[..., Awaitable[object]],
        args: tuple[Any, ...],
        policy: RestartPolicy,
        *,
        is_service: bool,
    ) -> _Child:
        if not isinstance(policy, RestartPolicy):
            raise TypeError(f"restart must be a RestartPolicy, got {policy!r}")
        if name in self._children:
            raise ValueError(f"supervisor {self.name!r} already has a live child named {name!r}")
        child = _Child(name, async_fn, args, policy, is_service)
        if not self._children:
            self._idle = trio.Event()
        self._children[name] = child
        self._started += 1
        return child

    def _unregister(self, child: _Child) -> None:
        if self._children.get(child.name) is child:
            del self._children[child.name]
            self._finished += 1
        if not self._children:
            self._idle.set()

    async def _supervise(
        self, child: _Child, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        started = _StartedOnce(task_status, child) if child.is_service else None
        try:
            while True:
                try:
                    if started is None:
                        await child.async_fn(*child.args)
                    else:
                        await child.async_fn(*child.args, task_status=started)
                except Exception as exc:
                    if started is not None and not started.called:
                        raise  # before started(): nursery.start reports it to the caller of start()
                    error: Exception | None = exc
                else:
                    if started is not None and not started.called:
                        return  # nursery.start raises "child exited without calling started()"
                    error = None
                delay_s = self._after_exit(child, error)
                if delay_s is None:
                    return
                child.state = "backoff"
                await trio.sleep(delay_s)
                child.state = "running"
        finally:
            self._unregister(child)

    def _after_exit(self, child: _Child, error: Exception | None) -> float | None:
        """Decide what follows one run of `child`: seconds until its restart, or None for no restart
        (having recorded a give-up when the exit was a failure beyond the policy)."""
        policy = child.policy
        if error is not None:
            self._failures += 1
            child.last_error = error
        if error is None and policy.mode != "always":
            _log.debug("supervisor %r: child %r finished", self.name, child.name)
            return None
        if _cancelled():
            # Shutting down: nothing is restarted, but an exception raised while stopping is still an
            # exception, so it is reported rather than dropped.
            if error is not None:
                self._give_up(child, error, "failed while the supervisor was shutting down")
            return None
        if error is not None and policy.mode == "never":
            self._give_up(child, error, "failed and its restart policy is 'never'")
            return None
        now = trio.current_time()
        recent = child.recent_restarts
        while recent and recent[0] <= now - policy.window_s:
            recent.popleft()
        if len(recent) >= policy.max_restarts:
            how = "failed" if error is not None else "exited"
            self._give_up(
                child,
                error,
                f"{how} again after {len(recent)} restarts within {policy.window_s:g} s "
                f"(limit {policy.max_restarts})",
            )
            return None
        delay_s = policy.backoff_s(len(recent), random.random())
        recent.append(now)
        child.restarts += 1
        self._restarts += 1
        _log.warning(
            "supervisor %r: child %r %s; restart %d in %.3f s",
            self.name,
            child.name,
            f"failed with {error!r}" if error is not None else "returned",
            child.restarts,
            delay_s,
            exc_info=error,
        )
        return delay_s

    def _give_up(self, child: _Child, error: Exception | None, why: str) -> None:
        failure = SupervisorError(
            f"supervisor {self.name!r}: child {child.name!r} {why}"
            + (f": {error!r}" if error is not None else ""),
            supervisor=self.name,
            child=child.name,
            restarts=child.restarts,
        )
        failure.__cause__ = error
        failure.__suppress_context__ = True
        _log.error("%s", failure, exc_info=error)
        if self._failure is None:
            self._failure = failure
        self._nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_supervisor(name: str) -> AsyncIterator[Supervisor]:
    """``async with open_supervisor("sandboxd") as sup:`` run children under restart policies.

    Leaving the block cancels the children (they are services, owned by the block) and waits for their
    ``finally`` clauses; use `Supervisor.join` first to wait for children that end on their own. If a
    child gives up, the body and the other children are cancelled and `SupervisorError` is raised. An
    exception from the body propagates as itself, not wrapped in an ExceptionGroup.
    """
    supervisor: Supervisor | None = None
    unwrapped: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(name, nursery)
            try:
                yield supervisor
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        failure = supervisor._failure if supervisor is not None else None
        if failure is not None:
            _, rest = group.split(trio.Cancelled)
            if rest is None:
                raise failure  # the give-up is the news; the Cancelled it caused is not
            # Something else escaped too (the body's own error, a KeyboardInterrupt): lose neither.
            raise BaseExceptionGroup(f"supervisor {name!r} failed", [failure, *rest.exceptions]) from None
        if len(group.exceptions) != 1:
            raise
        # Children never raise Exceptions (they become restarts or give-ups), so a lone exception is the
        # body's own (or an outer Cancelled): let it out unwrapped so ``except ValueError`` works.
        unwrapped = group.exceptions[0]
    if unwrapped is not None:
        raise unwrapped  # outside the except block, so no ExceptionGroup is chained as its context
    if supervisor is not None and supervisor._failure is not None:
        raise supervisor._failure


# --------------------------------------------------------------------------- mailbox


@dataclass(frozen=True)
class MailboxStats:
    """One mailbox's counters; `blocked_s` growing is what backpressure looks like."""

    name: str
    capacity: int
    depth: int  # items buffered now
    high_water: int  # most items ever buffered at once
    sent: int  # items accepted by send() / try_send()
    received: int  # items handed out by receive()
    rejected: int  # try_send() calls refused because the mailbox was full
    blocked_sends: int  # send() calls that had to wait for room
    blocked_s: float  # total seconds (trio clock) senders spent waiting for room
    waiting_senders: int  # tasks blocked in send() now
    closed: bool


class Mailbox(Generic[T]):
    """A bounded FIFO between tasks, over ``trio.open_memory_channel(capacity)``.

    Any number of tasks may send and receive on the same mailbox. After `close`, receivers get the items
    already buffered and then `trio.EndOfChannel` (``async for`` ends); senders, including those blocked
    at that moment, get `MailboxClosed`.
    """

    def __init__(self, capacity: int, *, name: str = "mailbox") -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"Mailbox {name!r}: capacity must be an int >= 1, got {capacity!r}")
        if capacity < 1:
            # Every queue has a bound (DESIGN.md), and a rendezvous (0) has no room for the stats to see.
            raise ValueError(f"Mailbox {name!r}: capacity must be >= 1, got {capacity}")
        self.name = name
        self.capacity = capacity
        self._send_end, self._receive_end = trio.open_memory_channel[T](capacity)
        self._closed = False
        self._sent = self._received = self._rejected = self._blocked_sends = self._high_water = 0
        self._blocked_s = 0.0

    async def send(self, item: T) -> None:
        """Put `item` in the mailbox, waiting while it is full. Bound the wait with ``trio.fail_after``."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._send_end.send_nowait(item)
        except trio.WouldBlock:
            pass
        except trio.ClosedResourceError as exc:
            raise self._closed_error() from exc
        else:
            self._accepted()
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        # Full: wait our turn (trio queues blocked senders FIFO) and account the time spent waiting.
        self._blocked_sends += 1
        since = trio.current_time()
        try:
            await self._send_end.send(item)
        except trio.ClosedResourceError as exc:
            raise self._closed_error() from exc
        finally:
            self._blocked_s += trio.current_time() - since
        self._accepted()

    def try_send(self, item: T) -> bool:
        """Put `item` in the mailbox if there is room; False (and nothing sent) if it is full."""
        try:
            self._send_end.send_nowait(item)
        except trio.WouldBlock:
            self._rejected += 1
            return False
        except trio.ClosedResourceError as exc:
            raise self._closed_error() from exc
        self._accepted()
        return True

    async def receive(self) -> T:
        """The oldest item, waiting while empty; `trio.EndOfChannel` once closed and drained."""
        item = await self._receive_end.receive()
        self._received += 1
        return item

    def __aiter__(self) -> Mailbox[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """No more sends. Idempotent. Buffered items are still delivered; items of blocked senders are not."""
        self._closed = True
        self._send_end.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> MailboxStats:
        channel = self._receive_end.statistics()
        return MailboxStats(
            name=self.name,
            capacity=self.capacity,
            depth=channel.current_buffer_used,
            high_water=self._high_water,
            sent=self._sent,
            received=self._received,
            rejected=self._rejected,
            blocked_sends=self._blocked_sends,
            blocked_s=self._blocked_s,
            waiting_senders=channel.tasks_waiting_send,
            closed=self._closed,
        )

    def _accepted(self) -> None:
        self._sent += 1
        depth = self._receive_end.statistics().current_buffer_used
        self._high_water = max(self._high_water, depth)

    def _closed_error(self) -> MailboxClosed:
        return MailboxClosed(f"mailbox {self.name!r} is closed; the item was not delivered")


# --------------------------------------------------------------------------- request / reply

_UNSET: Any = object()


class Reply(Generic[T]):
    """A one-shot slot for the answer to one request: the actor calls `set` or `fail` once, the
    requester awaits `wait`."""

    def __init__(self) -> None:
        self._done = trio.Event()
        self._value: T = _UNSET
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def set(self, value: T) -> None:
        self._check_unset()
        self._value = value
        self._done.set()

    def fail(self, error: BaseException) -> None:
        """Make `wait` raise `error` in the requester (e.g. the handler's exception)."""
        self._check_unset()
        self._error = error
        self._done.set()

    async def wait(self) -> T:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value

    def _check_unset(self) -> None:
        if self._done.is_set():
            raise RuntimeError("Reply was already set; a reply slot is one-shot")


async def request(mailbox: Mailbox[M], make_message: Callable[[Reply[R]], M]) -> R:
    """Send ``make_message(reply)`` and wait for the actor to answer through `reply`.

    If the actor dies holding the message the answer never comes: wrap the call in ``trio.fail_after``.
    """
    reply: Reply[R] = Reply()
    await mailbox.send(make_message(reply))
    return await reply.wait()
