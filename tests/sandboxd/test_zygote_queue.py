"""`Zygote.spawn` hands out embryos first come, first served, and replaces the dead ones it skips.

No zygote process: embryos are delivered by hand (this process's own pidfd stands for a live embryo),
and the zygote's end of the socket only collects the requests for more."""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing

from sandboxd.zygote import Zygote


class _Proc:  # what Zygote.close() would wait on; these tests never close it
    pid = 0


@pytest.fixture
async def zygote():  # async: trio sockets are made and closed inside the run
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    z = Zygote(_Proc(), ours)
    opened: list[socket.socket] = [theirs]
    yield z, theirs, opened
    for s in opened:
        s.close()
    z._sock.close()


def _deliver(z: Zygote, opened: list, *, alive: bool = True) -> None:
    """What `receive_embryos` does for one embryo: queue it and wake the oldest waiting spawn."""
    pidfd = os.pidfd_open(os.getpid())
    if not alive:  # a pidfd of a process that has exited
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.close(pidfd)
        pidfd = os.pidfd_open(pid)
        os.waitpid(pid, 0)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    opened.append(b)
    z._embryos.append((os.getpid(), pidfd, a))
    z._delivered.unpark()


def _requests(theirs: socket.socket) -> int:
    theirs.setblocking(False)
    n = 0
    while True:
        try:
            assert theirs.recv(64) == b'{"op": "more"}'
        except BlockingIOError:
            return n
        n += 1


async def test_a_new_spawn_queues_behind_a_waiting_one(zygote):
    z, theirs, opened = zygote
    order: list[str] = []
    devnull = os.open(os.devnull, os.O_RDONLY)

    async def spawn(name: str) -> None:
        _, pidfd = await z.spawn({"name": name}, [devnull])
        os.close(pidfd)
        order.append(name)

    async def deliver_once_first_is_served() -> None:
        while order != ["first"]:
            await trio.sleep(0.01)
        _deliver(z, opened)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(spawn, "first")
            await trio.testing.wait_all_tasks_blocked()
            assert order == [] and z._waiting == 1 and _requests(theirs) == 1  # it asked for its own
            _deliver(z, opened)  # first's embryo arrives; first is woken but has not run yet ...
            nursery.start_soon(deliver_once_first_is_served)
            await spawn("second")  # ... when second comes: it must not take first's embryo
    os.close(devnull)
    assert order == ["first", "second"]
    assert _requests(theirs) == 1  # second asked for its own too
    assert z.prepaid == 0 and z.taken == 0 and z._waiting == 0  # every embryo taken was asked for


async def test_a_dead_embryo_is_skipped_and_replaced(zygote):
    z, theirs, opened = zygote
    devnull = os.open(os.devnull, os.O_RDONLY)
    _deliver(z, opened, alive=False)
    _deliver(z, opened)
    with trio.fail_after(10):
        pid, pidfd = await z.spawn({}, [devnull])
    os.close(pidfd)
    os.close(devnull)
    assert pid == os.getpid() and not z._embryos
    await z.replenish()
    assert _requests(theirs) == 2  # the live one taken and the dead one, both replaced
