"""Tests for runtime.actors: supervision, mailboxes, request/reply. Timing runs on trio's virtual clock."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from runtime.actors import (
    ActorError,
    Mailbox,
    MailboxClosed,
    Reply,
    RestartPolicy,
    SupervisorError,
    open_supervisor,
    request,
)

@pytest.fixture
async def watchdog(nursery):
    """Fail a test that would hang (a supervisor that does not cancel its children, a lost wake-up)
    instead of hanging the suite: with `autojump_clock` the watchdog fires as soon as all is idle."""

    async def watchdog():
        await trio.sleep(10_000)
        raise AssertionError("test hung: still waiting after 10,000 virtual seconds")

    nursery.start_soon(watchdog)


# No jitter, so the virtual time of each restart is exact.
STEADY = dict(backoff_initial_s=1.0, backoff_max_s=5.0, backoff_multiplier=2.0, jitter=0.0)


class Boom(Exception):
    pass


# --------------------------------------------------------------------------- supervisor


async def test_on_failure_restarts_up_to_the_limit_then_fails_loudly(autojump_clock, watchdog):
    attempts = []
    sibling_cleaned_up = trio.Event()

    async def flaky():
        attempts.append(trio.current_time())
        raise Boom(f"attempt {len(attempts)}")

    async def sibling():
        try:
            await trio.sleep_forever()
        finally:
            sibling_cleaned_up.set()

    policy = RestartPolicy("on_failure", max_restarts=3, window_s=100.0, **STEADY)
    with pytest.raises(SupervisorError) as info:
        async with open_supervisor("pool") as sup:
            sup.start_child("sibling", sibling)
            sup.start_child("flaky", flaky, restart=policy)
            await trio.sleep_forever()

    err = info.value
    assert isinstance(err, ActorError)
    assert len(attempts) == 4  # the first run and 3 restarts
    assert (err.supervisor, err.child, err.restarts) == ("pool", "flaky", 3)
    assert "flaky" in str(err) and "3 restarts" in str(err)
    assert isinstance(err.__cause__, Boom) and str(err.__cause__) == "attempt 4"
    assert sibling_cleaned_up.is_set()


async def test_never_policy_failure_propagates_without_restart(autojump_clock, watchdog):
    runs = 0

    async def once():
        nonlocal runs
        runs += 1
        raise Boom("no second chance")

    with pytest.raises(SupervisorError) as info:
        async with open_supervisor("s") as sup:
            sup.start_child("once", once, restart=RestartPolicy("never"))
            await trio.sleep_forever()
    assert runs == 1
    assert info.value.child == "once" and info.value.restarts == 0
    assert isinstance(info.value.__cause__, Boom)


async def test_on_failure_child_that_returns_is_done_and_join_returns(autojump_clock, watchdog):
    runs = 0

    async def job():
        nonlocal runs
        runs += 1
        await trio.sleep(2)

    async with open_supervisor("s") as sup:
        for i in range(3):
            sup.start_child(f"job-{i}", job)
        await sup.join()
        assert trio.current_time() == 2
        status = sup.status()
    assert runs == 3
    assert status.children == {}
    assert (status.started, status.finished, status.restarts, status.failures) == (3, 3, 0, 0)


async def test_always_restarts_a_child_that_returns(autojump_clock, watchdog):
    runs = 0
    third_run = trio.Event()

    async def tick():
        nonlocal runs
        runs += 1
        if runs == 3:
            third_run.set()
            await trio.sleep_forever()

    async with open_supervisor("s") as sup:
        sup.start_child("tick", tick, restart=RestartPolicy("always", max_restarts=5, **STEADY))
        await third_run.wait()
        assert sup.status().children["tick"].restarts == 2
        assert sup.status().children["tick"].last_error is None
    assert runs == 3


async def test_always_child_that_keeps_returning_exhausts_intensity(autojump_clock, watchdog):
    async def quits():
        pass

    with pytest.raises(SupervisorError) as info:
        async with open_supervisor("s") as sup:
            sup.start_child("quits", quits, restart=RestartPolicy("always", max_restarts=2, **STEADY))
            await trio.sleep_forever()
    assert info.value.restarts == 2 and info.value.__cause__ is None


async def test_backoff_grows_exponentially_and_is_capped(autojump_clock, watchdog):
    starts = []

    async def failing():
        starts.append(trio.current_time())
        raise Boom

    policy = RestartPolicy("on_failure", max_restarts=5, window_s=1000.0, **STEADY)
    with pytest.raises(SupervisorError):
        async with open_supervisor("s") as sup:
            sup.start_child("failing", failing, restart=policy)
            await trio.sleep_forever()
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps == pytest.approx([1.0, 2.0, 4.0, 5.0, 5.0])


async def test_restarts_outside_the_window_do_not_count(autojump_clock, watchdog):
    # Fails every 20 s with a 10 s window and a limit of 1: never two restarts inside one window,
    # so it is restarted indefinitely, and the backoff starts over each time.
    starts = []
    done = trio.Event()

    async def slow_failure():
        starts.append(trio.current_time())
        if len(starts) == 5:
            done.set()
            await trio.sleep_forever()
        await trio.sleep(20)
        raise Boom

    policy = RestartPolicy("on_failure", max_restarts=1, window_s=10.0, **STEADY)
    async with open_supervisor("s") as sup:
        sup.start_child("slow", slow_failure, restart=policy)
        await done.wait()
        assert sup.status().children["slow"].restarts == 4
    assert [b - a for a, b in zip(starts, starts[1:])] == pytest.approx([21.0] * 4)


async def test_start_returns_started_value_and_restarts_call_started_again(autojump_clock, watchdog):
    runs = 0
    second_run = trio.Event()

    async def listener(port, *, task_status=trio.TASK_STATUS_IGNORED):
        nonlocal runs
        runs += 1
        task_status.started(f"listening on {port} (run {runs})")
        if runs == 1:
            await trio.sleep(1)
            raise Boom("socket died")
        second_run.set()
        await trio.sleep_forever()

    async with open_supervisor("s") as sup:
        value = await sup.start("listener", listener, 7070, restart=RestartPolicy(**STEADY))
        assert value == "listening on 7070 (run 1)"
        assert sup.status().children["listener"].state == "running"
        await second_run.wait()
        status = sup.status().children["listener"]
        assert status.restarts == 1 and status.last_error == repr(Boom("socket died"))


async def test_start_raises_when_the_first_run_fails_before_started(autojump_clock, watchdog):
    async def broken(*, task_status=trio.TASK_STATUS_IGNORED):
        raise OSError("address in use")

    async def silent(*, task_status=trio.TASK_STATUS_IGNORED):
        return

    async with open_supervisor("s") as sup:
        with pytest.raises(OSError, match="address in use"):
            await sup.start("broken", broken)
        with pytest.raises(RuntimeError, match="started"):
            await sup.start("silent", silent)
        assert sup.status().children == {}
        # The name is free again and the supervisor still works.
        sup.start_child("broken", trio.sleep, 1)


async def test_cancel_and_leaving_the_block_cancel_children_and_run_their_finally(autojump_clock, watchdog):
    cleaned = []

    async def service(name):
        try:
            await trio.sleep_forever()
        finally:
            cleaned.append(name)

    async with open_supervisor("s") as sup:
        sup.start_child("a", service, "a")
        sup.start_child("b", service, "b", restart=RestartPolicy("always"))
        await trio.sleep(1)
        sup.cancel()
        await trio.sleep_forever()  # cancelled by sup.cancel(); the block exits without error
    assert sorted(cleaned) == ["a", "b"]

    with trio.fail_after(10):  # a supervisor that waited for its children would hang here
        async with open_supervisor("s") as sup:
            sup.start_child("c", service, "c")
            await trio.sleep(1)
    assert "c" in cleaned


async def test_outer_deadline_cancels_the_supervisor(autojump_clock, watchdog):
    cleaned = trio.Event()

    async def service():
        try:
            await trio.sleep_forever()
        finally:
            cleaned.set()

    with trio.move_on_after(3) as scope:
        async with open_supervisor("s") as sup:
            sup.start_child("svc", service)
            await trio.sleep_forever()
    assert scope.cancelled_caught and cleaned.is_set()


async def test_body_exception_propagates_unwrapped_and_cancels_children(autojump_clock, watchdog):
    cleaned = trio.Event()

    async def service():
        try:
            await trio.sleep_forever()
        finally:
            cleaned.set()

    with pytest.raises(KeyError, match="body"):
        async with open_supervisor("s") as sup:
            sup.start_child("svc", service)
            await trio.lowlevel.checkpoint()
            raise KeyError("body")
    assert cleaned.is_set()


async def test_give_up_and_a_body_error_together_are_both_raised(autojump_clock, watchdog):
    async def failing():
        raise Boom("child")

    with pytest.raises(ExceptionGroup) as info:
        async with open_supervisor("s") as sup:
            sup.start_child("failing", failing, restart=RestartPolicy("never"))
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                raise KeyError("body cleanup failed") from None
    kinds = sorted(type(exc).__name__ for exc in info.value.exceptions)
    assert kinds == ["KeyError", "SupervisorError"]


async def test_status_shows_backoff_and_last_error(autojump_clock, watchdog):
    async def failing():
        raise Boom("down")

    async with open_supervisor("s") as sup:
        policy = RestartPolicy(max_restarts=10, window_s=100.0, **STEADY)
        sup.start_child("failing", failing, restart=policy)
        await trio.sleep(0.5)  # inside the first 1 s backoff
        child = sup.status().children["failing"]
        assert (child.state, child.restarts, child.last_error) == ("backoff", 1, "Boom('down')")
        status = sup.status()
        assert (status.failures, status.restarts) == (1, 1)


async def test_duplicate_live_child_name_is_rejected(autojump_clock, watchdog):
    async with open_supervisor("s") as sup:
        sup.start_child("x", trio.sleep_forever)
        with pytest.raises(ValueError, match="'x'"):
            sup.start_child("x", trio.sleep_forever)
        sup.cancel()


async def test_restarts_and_give_ups_are_logged(autojump_clock, watchdog, caplog):
    async def failing():
        raise Boom("logged")

    caplog.set_level(logging.DEBUG, logger="runtime.actors")
    with pytest.raises(SupervisorError):
        async with open_supervisor("logsup") as sup:
            sup.start_child("failing", failing, restart=RestartPolicy(max_restarts=1, **STEADY))
            await trio.sleep_forever()
    records = [r for r in caplog.records if r.name == "runtime.actors"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.ERROR]
    assert all("logsup" in r.getMessage() and "failing" in r.getMessage() for r in records)
    assert records[-1].exc_info[0] is Boom


def test_restart_policy_rejects_bad_fields_by_name():
    with pytest.raises(ValueError, match="mode"):
        RestartPolicy("sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_restarts"):
        RestartPolicy(max_restarts=-1)
    with pytest.raises(ValueError, match="window_s"):
        RestartPolicy(window_s=0)
    with pytest.raises(ValueError, match="backoff_max_s"):
        RestartPolicy(backoff_initial_s=2.0, backoff_max_s=1.0)
    with pytest.raises(ValueError, match="jitter"):
        RestartPolicy(jitter=1.5)


@given(
    initial=st.floats(0.0, 10.0),
    cap_extra=st.floats(0.0, 100.0),
    multiplier=st.floats(1.0, 4.0),
    jitter=st.floats(0.0, 1.0),
    index=st.integers(0, 60),
    rand=st.floats(0.0, 1.0, exclude_max=True),
)
def test_backoff_stays_within_jitter_band_and_cap(initial, cap_extra, multiplier, jitter, index, rand):
    policy = RestartPolicy(
        backoff_initial_s=initial,
        backoff_max_s=initial + cap_extra,
        backoff_multiplier=multiplier,
        jitter=jitter,
    )
    base = min(policy.backoff_max_s, initial * multiplier**index)
    delay = policy.backoff_s(index, rand)
    assert 0 <= delay <= policy.backoff_max_s
    assert delay >= base * (1 - jitter) - 1e-9
    assert delay <= base * (1 + jitter) + 1e-9


# --------------------------------------------------------------------------- mailbox


async def test_send_blocks_when_full_until_the_receiver_takes_one(autojump_clock, watchdog):
    box: Mailbox[int] = Mailbox(2, name="jobs")
    events = []

    async def producer():
        for i in range(3):
            await box.send(i)
            events.append(f"sent {i}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await trio.testing.wait_all_tasks_blocked()
        assert events == ["sent 0", "sent 1"]  # the third send waits for room
        assert box.stats().waiting_senders == 1
        first = await box.receive()
        await trio.testing.wait_all_tasks_blocked()
        # Taking one item made room, and only then did the third send complete.
        assert first == 0 and events == ["sent 0", "sent 1", "sent 2"]
        assert box.stats().waiting_senders == 0
    assert [await box.receive(), await box.receive()] == [1, 2]


async def test_try_send_returns_false_when_full(autojump_clock, watchdog):
    box: Mailbox[str] = Mailbox(1)
    assert box.try_send("a") is True
    assert box.try_send("b") is False
    assert await box.receive() == "a"
    assert box.try_send("c") is True
    stats = box.stats()
    assert (stats.sent, stats.received, stats.rejected, stats.depth) == (2, 1, 1, 1)


async def test_close_delivers_buffered_items_then_ends_the_stream(autojump_clock, watchdog):
    box: Mailbox[int] = Mailbox(4, name="results")
    for i in range(3):
        await box.send(i)
    box.close()
    box.close()  # idempotent
    assert [item async for item in box] == [0, 1, 2]
    with pytest.raises(trio.EndOfChannel):
        await box.receive()
    with pytest.raises(MailboxClosed, match="results"):
        await box.send(3)
    with pytest.raises(MailboxClosed):
        box.try_send(3)
    assert box.closed and box.stats().sent == 3


async def test_close_wakes_blocked_senders_with_mailbox_closed(autojump_clock, watchdog):
    box: Mailbox[int] = Mailbox(1)
    await box.send(0)
    errors = []

    async def blocked_sender():
        try:
            await box.send(1)
        except MailboxClosed as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_sender)
        await trio.testing.wait_all_tasks_blocked()
        box.close()
    assert len(errors) == 1
    assert [item async for item in box] == [0]  # the blocked item was not delivered


async def test_stats_track_high_water_and_blocked_time_on_virtual_clock(autojump_clock, watchdog):
    box: Mailbox[int] = Mailbox(3)

    async def slow_consumer():
        await trio.sleep(5)
        async for _ in box:
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_consumer)
        for i in range(5):
            await box.send(i)
        box.close()
    stats = box.stats()
    assert stats.high_water == 3
    assert (stats.sent, stats.received, stats.depth) == (5, 5, 0)
    # Send 3 waits from t=0 until the consumer takes item 0 at t=5; send 4 until it takes item 1 at t=6.
    assert stats.blocked_sends == 2
    assert stats.blocked_s == pytest.approx(5.0 + 1.0)


async def test_send_deadline_comes_from_the_callers_cancel_scope(autojump_clock, watchdog):
    box: Mailbox[int] = Mailbox(1)
    await box.send(0)
    with pytest.raises(trio.TooSlowError):
        with trio.fail_after(2):
            await box.send(1)
    stats = box.stats()
    assert (stats.sent, stats.depth, stats.blocked_sends) == (1, 1, 1)
    assert stats.blocked_s == pytest.approx(2.0)


@pytest.mark.parametrize("capacity", [0, -1])
def test_capacity_below_one_is_rejected(capacity):
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        Mailbox(capacity, name="bad")


@pytest.mark.parametrize("capacity", [float("inf"), 2.5, True])
def test_non_integer_capacity_is_rejected(capacity):
    with pytest.raises(TypeError, match="capacity"):
        Mailbox(capacity)


# --------------------------------------------------------------------------- request / reply


@dataclass
class Incr:
    n: int


@dataclass
class Get:
    reply: Reply[int]


@dataclass
class Crash:
    pass


async def counter(inbox: Mailbox[Incr | Get | Crash]) -> None:
    total = 0
    async for message in inbox:
        match message:
            case Incr(n):
                if n < 0:
                    raise ValueError("negative increment")
                total += n
            case Get(reply):
                reply.set(total)
            case Crash():
                raise Boom("crash requested")


async def test_actor_request_reply_and_restart_keeps_the_mailbox(autojump_clock, watchdog):
    inbox: Mailbox[Incr | Get | Crash] = Mailbox(8, name="counter")
    async with open_supervisor("s") as sup:
        sup.start_child("counter", counter, inbox, restart=RestartPolicy(**STEADY))
        await inbox.send(Incr(2))
        await inbox.send(Incr(3))
        with trio.fail_after(1):
            assert await request(inbox, Get) == 5
        await inbox.send(Crash())
        await inbox.send(Incr(7))  # queued while the actor is down; the restarted one reads it
        with trio.fail_after(5):
            assert await request(inbox, Get) == 7  # state is the task's: it starts over at 0
        assert sup.status().children["counter"].restarts == 1


async def test_reply_fail_raises_in_the_requester_and_slot_is_one_shot(autojump_clock, watchdog):
    reply: Reply[int] = Reply()
    reply.fail(ValueError("bad input"))
    with pytest.raises(ValueError, match="bad input"):
        await reply.wait()
    with pytest.raises(RuntimeError, match="one-shot"):
        reply.set(1)
    ok: Reply[int] = Reply()
    ok.set(0)
    assert ok.done and await ok.wait() == 0
