"""The daemon's handle on the zygote (`_zygote.py`): the process that forks every sandbox's init.

Starting Python for each sandbox costs ~40 ms and ~10 MB of private memory; a fork of a process
that has already imported everything costs a millisecond or two, and the pages stay shared. The
zygote is started once, from the mount thread (so that it starts in the daemon's private mount
namespace), and dies with it (PDEATHSIG); every init dies with the zygote.

The zygote forks *embryos* ahead of time (half-started inits, see `_init.embryo`) and delivers
each here with its pidfd and its socket; `spawn` hands a sandbox to one directly, and
`replenish` asks for new ones, so neither the fork nor the zygote is on the create path.

    zygote = Zygote.start(mounter, "z", pool=4)    # blocking, at runtime start
    nursery.start_soon(zygote.receive_embryos)
    pid, pidfd = await zygote.spawn(cfg, fds)
    ...                                            # the init starts
    await zygote.replenish()
    zygote.close()
"""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import sys

import trio

from sandboxd import linux
from sandboxd.errors import Internal
from sandboxd.mounter import MountThread

__all__ = ["Zygote"]

ZYGOTE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_zygote.py")
START_TIMEOUT_S = 30.0
EMBRYO_TIMEOUT_S = 60.0  # how long spawn() waits for an embryo (a burst of creates on a loaded node queues)


def _popen(child_sock: socket.socket) -> subprocess.Popen:
    # Run on the mount thread: the zygote starts in its mount namespace, with its cwd.
    return subprocess.Popen([sys.executable, "-I", "-S", ZYGOTE_SCRIPT, str(child_sock.fileno())],
                            pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, start_new_session=True)


class Zygote:
    def __init__(self, proc: subprocess.Popen, sock: socket.socket) -> None:
        self._proc = proc
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._embryos: list[tuple[int, int, socket.socket]] = []  # (pid, pidfd, socket), oldest first
        self._delivered = trio.lowlevel.ParkingLot()
        self._send_lock = trio.Lock()
        self.taken = 0  # embryos taken and not yet asked for again (replenish)
        self.prepaid = 0  # embryos asked for by spawns that found none: theirs when taken, not owed again
        self._waiting = 0  # spawns parked until an embryo comes (woken oldest first)
        self.broken: str | None = None

    @classmethod
    def start(cls, mounter: MountThread, root: str, pool: int = 4) -> "Zygote":
        """Start the zygote; `root` (relative to the mount thread's cwd) is an empty directory
        that becomes its root; `pool`: embryos kept ready. Blocks until it is ready."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.send(json.dumps({"parent_pid": os.getpid(), "root": root, "pool": pool}).encode())
            proc = mounter.call(_popen, theirs)
        finally:
            theirs.close()
        try:
            ours.settimeout(START_TIMEOUT_S)
            data = ours.recv(65536)
            msg = json.loads(data) if data else {"fatal": "exited during start-up"}
            if not msg.get("ready"):
                raise Internal(f"sandbox zygote failed: {msg.get('fatal')}")
            ours.settimeout(None)
        except BaseException as exc:
            ours.close()
            proc.kill()
            proc.wait()
            if isinstance(exc, socket.timeout):
                raise Internal("sandbox zygote did not start in time") from exc
            raise
        return cls(proc, ours)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def ready(self) -> int:
        """Embryos delivered and not yet taken: how many creates need not wait for a fork."""
        return len(self._embryos)

    async def receive_embryos(self) -> None:
        """Collect the embryos the zygote delivers, until it exits (or we close)."""
        why = "exited"
        try:
            while True:
                data, anc, _, _ = await self._sock.recvmsg(65536, socket.CMSG_SPACE(2 * 4))
                if not data:
                    return
                fds = array.array("i")
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.frombytes(payload[: len(payload) - len(payload) % 4])
                msg = json.loads(data)
                if "embryo" not in msg or len(fds) != 2:
                    for fd in fds:
                        os.close(fd)
                    continue
                self._embryos.append((int(msg["embryo"]), fds[0], socket.socket(fileno=fds[1])))
                self._delivered.unpark()
        except (OSError, trio.ClosedResourceError) as exc:
            why = str(exc) or type(exc).__name__
        finally:
            self.broken = self.broken or why
            self._delivered.unpark_all()

    async def spawn(self, cfg: dict, fds: list[int]) -> tuple[int, int]:
        """Hand `cfg` and `fds` (see `_init.py`) to an embryo, which becomes an init; returns its
        host pid and a pidfd. The fds stay the caller's to close."""
        data = json.dumps(cfg).encode()
        asked = False
        with trio.move_on_after(EMBRYO_TIMEOUT_S):
            while True:
                # First come, first served: while earlier spawns wait (one of them woken for the embryo
                # just delivered), a new one queues behind them with its own request instead of taking
                # it. Barging starved waiters past the deadline under a stream of creates.
                while self._embryos and (asked or not self._waiting):
                    pid, pidfd, sock = self._embryos.pop(0)
                    try:
                        if linux.pidfd_send_signal(pidfd, 0):  # alive: died ones are skipped
                            sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                            if self.prepaid > 0:
                                self.prepaid -= 1  # one that a waiting spawn asked for: the pool is not short
                            else:
                                self.taken += 1
                            return pid, pidfd
                    except OSError:
                        pass  # it died between the check and the send
                    finally:
                        sock.close()
                    os.close(pidfd)
                    self.taken += 1  # a dead one is replaced; whoever was owed it still is
                if self.broken:
                    raise Internal(f"sandbox zygote is gone: {self.broken}")
                # None left alive (they died waiting, or a burst of creates took them all): ask for
                # replacements now, and one for this spawn itself, so a burst of N creates asks for N
                # embryos at once instead of waiting for earlier inits to come up one by one.
                if not asked:
                    asked = True
                    self.taken += 1
                    self.prepaid += 1
                await self.replenish()
                if self._embryos:  # delivered while we were asking: its wake-up found nobody parked
                    continue
                self._waiting += 1
                try:
                    await self._delivered.park()
                finally:
                    self._waiting -= 1
        raise Internal(f"sandbox zygote delivered no init within {EMBRYO_TIMEOUT_S} s")

    async def replenish(self) -> None:
        """Ask for as many embryos as were taken. Called once a new init is up, so that the
        zygote's fork does not compete with its start for the CPU."""
        # Many creates finish at once: one sender at a time (trio refuses concurrent sends on a socket).
        async with self._send_lock:
            while self.taken > 0 and not self.broken:
                self.taken -= 1
                try:
                    await self._sock.send(b'{"op": "more"}')
                except (OSError, trio.ClosedResourceError) as exc:
                    self.broken = self.broken or str(exc)

    def close(self) -> None:
        """Close our end (the zygote exits on EOF) and wait for it; unused embryos die with it."""
        self.broken = self.broken or "closed"
        self._sock.close()
        for _, pidfd, sock in self._embryos:
            os.close(pidfd)
            sock.close()
        self._embryos.clear()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
