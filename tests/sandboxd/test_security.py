"""sandboxd as a network service under attack, against a real `sandboxd serve` process.

Peers without the token or with the wrong protocol version, frames crafted to exhaust the daemon's
memory, slow-loris hellos, 10,000 connections; and, from inside a sandbox, the daemon's sockets,
another sandbox's files, the host's network, /proc, /sys and the kernel. Every attack is refused;
a refused or cut connection is logged by the daemon with its error code; and a good client is
served right after each (the daemon keeps serving).

The codec-level fuzz lives in tests/runtime/test_wire_server.py and the runtime-level escapes in
test_isolation.py; this file covers what they do not, end to end through the daemon.
"""

from __future__ import annotations

import functools
import json
import os
import re
import resource
import secrets
import socket
import struct

import msgpack
import pytest
import trio
import zstandard

from runtime.wire.codec import Connection, ErrorResponse, Hello, Response, Role
from runtime.wire.transport import open_stream, parse_address
from sandboxd.client import connect

from .conftest import Daemon, needs_root, start_daemon

pytestmark = needs_root

TOKEN = "security-test-" + secrets.token_hex(8)
HELLO_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    d = start_daemon(str(tmp / "root"), [f"unix:{tmp / 'd.sock'}", "tcp://127.0.0.1:0"], token_file=str(token_file),
                     extra=["--hello-timeout-s", str(HELLO_TIMEOUT_S)])
    yield d
    assert d.stop() == 0, d.log_text()[-4000:]
    assert "Traceback" not in d.log_text(), d.log_text()[-4000:]


async def assert_serves(daemon: Daemon) -> None:
    """A client with the token is served on every listener, and the daemon process is alive."""
    assert daemon.proc.poll() is None, f"daemon exited:\n{daemon.log_text()[-4000:]}"
    for address in daemon.addresses:
        async with connect(address, token=TOKEN, connect_timeout_s=5, call_timeout_s=10) as node:
            assert (await node.stats())["runtime"]["runtime"] == "ns"


def frame(body, flags: int = 0) -> bytes:
    raw = body if isinstance(body, bytes) else msgpack.packb(body, use_bin_type=True)
    return struct.pack(">IB", len(raw), flags) + raw


def hello(**fields) -> bytes:
    return frame({"hello": "swe-dapo", "version": 1, "token": TOKEN, **fields})


class RawPeer:
    """A hand-driven connection: sends whatever bytes it is given, decodes what the daemon answers."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.codec = Connection(Role.CLIENT)
        self.codec.send(Hello())  # we write raw bytes; the codec only decodes the answers
        self.events: list = []
        sock = stream.socket
        self.name = "unix" if sock.family == socket.AF_UNIX else "{}:{}".format(*sock.getsockname()[:2])

    @classmethod
    async def open(cls, address: str) -> "RawPeer":
        return cls(await open_stream(parse_address(address)))

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the daemon closed first; its answer is still readable

    async def read_until_closed(self, timeout_s: float = 10.0) -> list:
        with trio.fail_after(timeout_s):
            while True:
                try:
                    chunk = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                self.codec.receive_data(chunk)
                self._drain()
        await self.stream.aclose()
        return self.events

    async def next_event(self, timeout_s: float = 10.0):
        with trio.fail_after(timeout_s):
            while not self.events:
                chunk = await self.stream.receive_some(65536)
                assert chunk, "the daemon closed the connection"
                self.codec.receive_data(chunk)
                self._drain()
        return self.events.pop(0)

    def _drain(self) -> None:
        while True:
            event = self.codec.next_event()
            if not hasattr(event, "__dataclass_fields__"):
                return
            self.events.append(event)


async def let_the_refusal_log_catch_up(daemon: Daemon) -> None:
    """The daemon logs 20 refusals a second one by one and counts the rest; after a flood, wait out
    the second so that the next test's refusals are logged line by line again."""
    await trio.sleep(1.2)


def refusals_logged(daemon: Daemon, code: str, start: int) -> int:
    """Refusals with `code` in the log since line `start`: one line each, plus the per-second counts."""
    text = daemon.log_text(start)
    one_by_one = len(re.findall(rf"refused connection from \S+: {code}: ", text))
    counted = sum(int(n) for n in re.findall(rf"not logged one by one \(.*?\b{code} (\d+)", text))
    return one_by_one + counted


def connection_error(events: list) -> ErrorResponse:
    errors = [e for e in events if isinstance(e, ErrorResponse) and e.id is None]
    assert errors, f"no connection-level error frame in {events}"
    return errors[-1]


# --- peers that are not allowed in ------------------------------------------------------------------

REFUSED_HELLOS = {
    "no_token": (1, frame({"hello": "swe-dapo", "version": 1}), "unauthorized", "missing token"),
    "wrong_token": (1, hello(token="not-" + TOKEN), "unauthorized", "wrong token"),
    "wrong_token_on_unix_socket": (0, hello(token="not-" + TOKEN), "unauthorized", "wrong token"),
    "token_prefix": (1, hello(token=TOKEN[:-1]), "unauthorized", "wrong token"),
    "token_not_a_string": (1, hello(token=12345), "unauthorized", "'token' must be a str"),
    "wrong_version": (1, hello(version=2), "bad_request", "unsupported protocol version 2"),
    "no_version": (1, frame({"hello": "swe-dapo", "token": TOKEN}), "bad_request", "unsupported protocol version None"),
    "other_protocol": (1, b"GET / HTTP/1.1\r\nHost: sandboxd\r\n\r\n", "bad_request", "not a swe-dapo hello"),
    "request_before_hello": (1, frame({"id": 1, "method": "sandbox.create", "params": {}}), "bad_request",
                             "first frame must be a hello"),
}


@pytest.mark.parametrize("case", list(REFUSED_HELLOS))
async def test_peers_without_the_token_or_protocol_are_refused_and_logged(daemon, case):
    listener, data, code, message = REFUSED_HELLOS[case]
    mark = len(daemon.lines)
    peer = await RawPeer.open(daemon.addresses[listener])
    await peer.send(data)
    events = await peer.read_until_closed()
    assert not any(isinstance(e, Hello) for e in events), "the daemon said hello to a refused peer"
    error = connection_error(events)
    assert error.code == code and message in error.message, error
    daemon.wait_for_log(rf"refused connection from {re.escape(peer.name)}: {code}: .*{re.escape(message)}", mark)
    await assert_serves(daemon)


async def test_slow_loris_hellos_are_cut_at_the_hello_timeout_while_others_are_served(daemon):
    """Peers that trickle a hello (even a valid one) byte by byte, or go silent mid-header, hold a
    connection for hello_timeout_s at most; the daemon serves good clients meanwhile."""
    mark = len(daemon.lines)
    outcomes: dict[str, tuple[float, list]] = {}

    async def loris(i: int) -> None:
        peer = await RawPeer.open(daemon.addresses[i % 2])
        start = trio.current_time()
        data = hello() if i % 3 else hello()[:3]  # a trickled valid hello, or a header cut short

        async def trickle() -> None:
            for byte in data:
                await peer.send(bytes([byte]))
                await trio.sleep(0.1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            events = await peer.read_until_closed(timeout_s=HELLO_TIMEOUT_S + 5)
            nursery.cancel_scope.cancel()
        outcomes[f"{peer.name}#{i}"] = (trio.current_time() - start, events)

    async with trio.open_nursery() as nursery:
        for i in range(60):
            nursery.start_soon(loris, i)
        await trio.sleep(0.3)
        await assert_serves(daemon)
        assert not outcomes, "served only once the lorises were gone"
    assert len(outcomes) == 60
    for name, (elapsed, events) in outcomes.items():
        assert elapsed < HELLO_TIMEOUT_S + 2, (name, elapsed)
        error = connection_error(events)
        assert error.code == "timeout" and "no hello within" in error.message, (name, error)
    daemon.wait_for_log(r"refused connection from (127\.0\.0\.1:\d+|unix): timeout: no hello within 2.0 s", mark)
    with trio.fail_after(5):
        while refusals_logged(daemon, "timeout", mark) < 60:
            await trio.sleep(0.1)
    assert refusals_logged(daemon, "timeout", mark) == 60
    await assert_serves(daemon)
    await let_the_refusal_log_catch_up(daemon)


# --- frames crafted to exhaust memory ----------------------------------------------------------------

@functools.cache
def memory_attacks() -> dict[str, tuple[bytes, bytes, str, str]]:
    """case -> (what comes first: nothing or a good hello, the attack, error code, error message)."""
    nils = b"\xdd" + struct.pack(">I", 60_000_000) + b"\xc0" * 60_000_000  # 60 M msgpack nils: 480 MB as a list
    nil_bomb = zstandard.ZstdCompressor(level=3).compress(nils)  # a few KB
    stream_bomb = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(b"\x00" * (256 << 20))
    big_bomb = zstandard.ZstdCompressor(level=3).compress(b"\x00" * (200 << 20))
    return {
    # before the hello: nobody is authenticated, nothing over a hello's 64 KiB is buffered or inflated
    "4GiB_hello_length": (b"", struct.pack(">IB", 0xFFFFFFFF, 0), "bad_request", "not a swe-dapo hello"),
    "compressed_hello_bomb": (b"", frame(nil_bomb, flags=1), "limit", "over a hello's limit"),
    "compressed_hello_bomb_without_size": (b"", frame(stream_bomb, flags=1), "bad_request", "cannot decompress"),
    # after the hello: bounded by max_frame (64 MiB), refused from the header where it can be
    "4GiB_frame_length": (hello(), struct.pack(">IB", 0xFFFFFFFF, 0) + b"x" * 1000, "limit", "exceeds max_frame"),
    "zstd_bomb_200MiB": (hello(), frame(big_bomb, flags=1), "limit", "inflates to 209715200 bytes"),
    "zstd_bomb_without_size": (hello(), frame(stream_bomb, flags=1), "bad_request", "cannot decompress"),
    "nested_arrays": (hello(), frame(b"\x91" * 200_000 + b"\xc0"), "bad_request", "nested too deeply"),
    "nested_maps": (hello(), frame(b"\x81\xa1k" * 200_000 + b"\xc0"), "bad_request", "nested too deeply"),
    "array32_of_4G_items": (hello(), frame(b"\xdd\xff\xff\xff\xff"), "bad_request", "not valid msgpack"),
    "map32_of_4G_items": (hello(), frame(b"\xdf\xff\xff\xff\xff"), "bad_request", "not valid msgpack"),
    "bin32_of_4GiB": (hello(), frame(b"\xc6\xff\xff\xff\xff"), "bad_request", "not valid msgpack"),
    "str32_of_4GiB_in_a_request": (hello(), frame(b"\x83\xa2id\x01\xa6method\xdb\xff\xff\xff\xff"), "bad_request",
                                   "not valid msgpack"),
    }


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


async def test_frames_crafted_to_exhaust_memory_are_refused_with_bounded_memory(daemon):
    await assert_serves(daemon)
    peak_before = peak_rss_mib(daemon.pid)
    for case, (preamble, data, code, message) in memory_attacks().items():
        mark = len(daemon.lines)
        peer = await RawPeer.open(daemon.addresses[1])
        await peer.send(preamble + data)
        events = await peer.read_until_closed()
        error = connection_error(events)
        assert error.code == code and message in error.message, (case, error)
        verb = "closed" if preamble else "refused"
        daemon.wait_for_log(rf"{verb} connection from {re.escape(peer.name)}: {code}: .*{re.escape(message)}", mark)
        await assert_serves(daemon)
    # What remains: the codec's own buffers, and zstd's output buffer (max_frame) for a frame with no
    # content size. Before the pre-hello bound, the 2 KB compressed hello alone took the daemon from
    # 30 to 550 MiB.
    assert peak_rss_mib(daemon.pid) - peak_before < 100, (peak_before, peak_rss_mib(daemon.pid))


# --- many connections ---------------------------------------------------------------------------------


async def receive_frame(sock: trio.socket.SocketType) -> dict:
    data = b""
    while len(data) < 5 or len(data) < 5 + struct.unpack(">I", data[:4])[0]:
        chunk = await sock.recv(65536)
        assert chunk, f"the daemon closed the connection after {data!r}"
        data += chunk
    return msgpack.unpackb(data[5:], raw=False)


@pytest.mark.slow
async def test_ten_thousand_connections_past_the_limit_get_busy_and_the_daemon_keeps_serving(tmp_path):
    n, limit = 10_000, 9_000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 1000:
        if hard < n + 1000:
            pytest.skip(f"the fd limit ({hard}) is too low for {n} connections")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    d = start_daemon(str(tmp_path / "root"), [f"unix:{tmp_path / 'd.sock'}", "tcp://127.0.0.1:0"],
                     token_file=str(token_file), extra=["--max-connections", str(limit), "--hello-timeout-s", "120"])
    try:
        port = int(d.addresses[1].rsplit(":", 1)[1])
        async with connect(d.addresses[1], token=TOKEN, connect_timeout_s=5) as node:
            assert (await node.stats())["runtime"]["sandboxes"] == 0  # warm: the daemon's own fds are open
        await trio.sleep(0.5)  # and it has closed that connection
        fds_before = len(os.listdir(f"/proc/{d.pid}/fd"))
        accepted: list[trio.socket.SocketType] = []
        refused: list[dict] = []
        all_answered = trio.Event()
        done = trio.Event()
        connecting = trio.Semaphore(1000)  # connects in flight: past the listen backlog, SYNs are dropped

        async def one() -> None:
            with trio.socket.socket() as sock:
                async with connecting:
                    await sock.connect(("127.0.0.1", port))
                    await sock.send(hello())
                    answer = await receive_frame(sock)
                if "hello" in answer:
                    accepted.append(sock)
                else:
                    refused.append(answer)
                if len(accepted) + len(refused) == n:
                    all_answered.set()
                await done.wait()  # every connection stays open until all are answered

        async def ping(sock: trio.socket.SocketType, call_id: int) -> None:
            await sock.send(frame({"id": call_id, "method": "wire.ping", "params": {}}))
            answer = await receive_frame(sock)
            assert answer["id"] == call_id and answer["result"]["version"] == 1, answer

        with trio.fail_after(180):
            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(one)
                await all_answered.wait()
                assert len(os.listdir(f"/proc/{d.pid}/fd")) >= fds_before + len(accepted)
                # The daemon still serves the connections it holds: a call on a hundred of them at once.
                async with trio.open_nursery() as pings:
                    for k, sock in enumerate(accepted[:100]):
                        pings.start_soon(ping, sock, k + 1)
                done.set()
        assert len(accepted) == limit and len(refused) == n - limit
        assert all(r["id"] is None and r["error"]["code"] == "busy"
                   and f"too many connections (max {limit})" in r["error"]["message"] for r in refused), refused[:3]
        # Logged, but not a thousand lines: a burst, then a count a second.
        d.wait_for_log(r"refused connection from 127\.0\.0\.1:\d+: busy: too many connections")
        with trio.move_on_after(30):  # the count of the unlogged ones comes once a second
            while refusals_logged(d, "busy", 0) < n - limit:
                await trio.sleep(0.1)
        assert refusals_logged(d, "busy", 0) == n - limit, [l for l in d.lines if "busy" in l and "from" not in l]
        assert d.log_text().count("busy: too many connections") < 200
        # Everything is given back: the daemon's fds return to where they were, and it serves.
        with trio.move_on_after(30):
            while len(os.listdir(f"/proc/{d.pid}/fd")) > fds_before:
                await trio.sleep(0.1)
        fds_after = sorted(os.readlink(f"/proc/{d.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{d.pid}/fd"))
        assert len(fds_after) <= fds_before, (fds_before, len(fds_after), fds_after)
        async with connect(d.addresses[1], token=TOKEN, connect_timeout_s=5) as node:
            assert (await node.stats())["runtime"]["sandboxes"] == 0
    finally:
        assert d.stop() == 0, d.log_text()[-4000:]
    assert "Traceback" not in d.log_text()


async def test_a_daemon_with_few_fds_lowers_its_connection_limit_and_refuses_clearly(tmp_path):
    """ulimit -n 256 and the default --max-connections 16384: the daemon says so at start, and a
    client past what its fds allow gets `busy` instead of hanging in the listen backlog."""
    def few_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    sock = tmp_path / "few.sock"
    d = start_daemon(str(tmp_path / "root"), [f"unix:{sock}"], preexec_fn=few_fds)
    try:
        d.wait_for_log(r"--max-connections 16384 lowered to 192: the fd limit is 256")
        peers = []
        answers: list = []
        with trio.fail_after(60):
            for _ in range(300):
                peer = await RawPeer.open(f"unix:{sock}")
                peers.append(peer)
                await peer.send(frame({"hello": "swe-dapo", "version": 1}))
            for peer in peers:
                answers.append(await peer.next_event())
        assert sum(isinstance(a, Hello) for a in answers) == 192
        busy = [a for a in answers if isinstance(a, ErrorResponse)]
        assert len(busy) == 300 - 192 and all(a.code == "busy" and "max 192" in a.message for a in busy)
        d.wait_for_log(r"refused connection from unix: busy: too many connections \(max 192\)")
        for peer in peers:
            await peer.stream.aclose()
        # A client retries `busy` with backoff within its call's deadline: served once the daemon
        # has noticed the 300 closes.
        async with connect(f"unix:{sock}", connect_timeout_s=5) as node:
            assert (await node.stats())["runtime"]["sandboxes"] == 0
    finally:
        assert d.stop() == 0, d.log_text()[-4000:]


async def test_a_daemon_out_of_fds_answers_busy_and_recovers(tmp_path):
    """ulimit -n 40: the fds run out before the (lowered) connection limit; a connection past them
    is still accepted, on a reserved fd, told `busy: server is out of file descriptors` and closed,
    instead of waiting unanswered in the backlog."""
    def very_few_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))

    sock = tmp_path / "nofds.sock"
    d = start_daemon(str(tmp_path / "root"), [f"unix:{sock}"], preexec_fn=very_few_fds)
    try:
        peers, answers = [], []
        with trio.fail_after(60):
            for _ in range(80):
                peer = await RawPeer.open(f"unix:{sock}")
                peers.append(peer)
                await peer.send(frame({"hello": "swe-dapo", "version": 1}))
            for peer in peers:
                answers.append(await peer.next_event())
        refused = [a for a in answers if not isinstance(a, Hello)]
        assert all(isinstance(a, ErrorResponse) and a.code == "busy" for a in refused), refused[:3]
        assert any("out of file descriptors" in a.message for a in refused), refused[:3]
        d.wait_for_log(r"refused connection from unix: busy: server is out of file descriptors")
        for peer in peers:
            await peer.stream.aclose()
        async with connect(f"unix:{sock}", connect_timeout_s=5) as node:
            async with node.open("host") as sb:  # and it still makes sandboxes
                assert (await sb.exec("echo ok", timeout_s=30)).output == b"ok\n"
    finally:
        assert d.stop() == 0, d.log_text()[-4000:]


# --- from inside a sandbox ------------------------------------------------------------------------------

# Runs in the attacking sandbox; prints {attack: "refused: ERRNO" | "ALLOWED: ..."} as JSON.
PROBE = r'''
import ctypes, errno, glob, json, os, socket, sys, time
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
out = {}

def refused(exc):
    return "refused: " + errno.errorcode.get(exc.errno, str(exc.errno))

def attempt(name, fn):
    try:
        result = fn()
    except OSError as exc:
        out[name] = refused(exc)
    else:
        out[name] = "ALLOWED: " + repr(result)[:200]

def call(fn, *args):
    ctypes.set_errno(0)
    if fn(*args) == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return "returned 0"

def connect(family, address):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(address)
        return "connected to %r" % (address,)
    finally:
        s.close()

def read(path):
    with open(path, "rb") as f:
        return f.read(100)

def open_write(path):
    os.close(os.open(path, os.O_WRONLY))
    return "opened for writing"

# the daemon: its Unix socket by path, through /proc, and its TCP port on the host's loopback
attempt("daemon_unix_socket", lambda: connect(socket.AF_UNIX, cfg["unix_socket"]))
attempt("daemon_unix_socket_via_proc", lambda: connect(socket.AF_UNIX, "/proc/%d/root%s" % (cfg["daemon_pid"], cfg["unix_socket"])))
attempt("daemon_tcp_port", lambda: connect(socket.AF_INET, ("127.0.0.1", cfg["tcp_port"])))
attempt("host_abstract_socket", lambda: connect(socket.AF_UNIX, "\0" + cfg["abstract"]))
for ip in cfg["host_ips"]:
    attempt("host_ip_" + ip, lambda: connect(socket.AF_INET, (ip, cfg["tcp_port"])))
# another sandbox's files: by path guesses under the daemon's state dir and through /proc
attempt("state_dir", lambda: os.listdir(cfg["state_dir"]))
attempt("other_upper_by_relative_path", lambda: os.listdir("/u"))
attempt("other_init_root", lambda: os.listdir("/proc/%d/root/testbed" % cfg["other_init"]))
found = [p for p in glob.glob("/proc/*/root/testbed/secret") + glob.glob("/proc/*/cwd/secret")
         + glob.glob(cfg["state_dir"] + "/*/*/*/testbed/secret") if os.path.exists(p)]
out["other_secret_by_glob"] = "ALLOWED: " + repr(found) if found else "refused: not found"
# the host's /proc
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
out["host_pids_visible"] = "ALLOWED: %r" % pids if cfg["daemon_pid"] in pids or len(pids) > 10 else "refused: %d pids" % len(pids)
attempt("host_pid_1_environ", lambda: read("/proc/1/environ"))
attempt("daemon_proc_dir", lambda: os.listdir("/proc/%d" % cfg["daemon_pid"]))
attempt("setns_via_proc_1_ns", lambda: os.open("/proc/1/ns/mnt", os.O_RDONLY))
for path in ["/proc/sys/kernel/core_pattern", "/proc/sys/kernel/panic", "/proc/sys/vm/drop_caches",
             "/proc/sys/net/ipv4/ip_forward", "/proc/irq/default_smp_affinity", "/proc/sysrq-trigger"]:
    if os.path.exists(path):
        attempt("write_" + path, lambda: open_write(path))
# /sys: not mounted; mounting it needs CAP_SYS_ADMIN
attempt("sys_kernel_uevent_helper", lambda: open_write("/sys/kernel/uevent_helper"))
os.makedirs("/tmp/sys", exist_ok=True)
attempt("mount_sysfs", lambda: call(libc.mount, b"sysfs", b"/tmp/sys", b"sysfs", 0, None))
attempt("mount_tmpfs", lambda: call(libc.mount, b"none", b"/tmp", b"tmpfs", 0, None))
attempt("umount_proc", lambda: call(libc.umount2, b"/proc", 2))
attempt("bind_mount_root", lambda: call(libc.mount, b"/", b"/tmp/sys", None, 4096, None))
# kernel modules, reboot, kexec, clock, swap (arguments chosen to fail harmlessly even if allowed)
attempt("init_module", lambda: call(libc.init_module, None, ctypes.c_ulong(0), b""))
attempt("finit_module", lambda: call(libc.syscall, 313, -1, b"", 0))
attempt("delete_module", lambda: call(libc.delete_module, b"sandboxd_no_such_module", os.O_NONBLOCK))
attempt("reboot", lambda: call(libc.syscall, 169, 0, 0, 0, None))
attempt("kexec_load", lambda: call(libc.syscall, 246, 0, 0, None, ctypes.c_ulong(0xdead0000)))
attempt("clock_settime", lambda: time.clock_settime(time.CLOCK_REALTIME, time.clock_gettime(time.CLOCK_REALTIME)))
attempt("swapon", lambda: call(libc.swapon, b"/tmp/no-such-swap", 0))
attempt("iopl", lambda: call(libc.iopl, 3))
# raw and packet sockets
attempt("raw_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close())
attempt("packet_socket", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close())
# ptrace: the sandbox's init (pid 1)
attempt("ptrace_attach_init", lambda: call(libc.ptrace, 16, 1, None, None))
print(json.dumps(out))
'''


def host_ipv4_addresses() -> list[str]:
    ips = set()
    for name in (socket.gethostname(), "localhost"):
        try:
            ips.update(a[4][0] for a in socket.getaddrinfo(name, None, socket.AF_INET))
        except OSError:
            pass
    with open("/proc/net/fib_trie") as f:  # every local address of the host
        lines = f.read().splitlines()
    for prev, line in zip(lines, lines[1:]):
        if "/32 host LOCAL" in line:
            ips.add(prev.split()[-1])
    return sorted(ips - {"127.0.0.1"})


def init_pid_of(sandbox_id: str) -> int:
    """The host pid of a sandbox's init: the process in its freezer (v1) or init (v2) cgroup."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                groups = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if re.search(rf"/{sandbox_id}(/init)?$", groups, re.M) and cmdline.startswith(b"init"):
            return int(pid)
    raise AssertionError(f"no init found for {sandbox_id}")


async def test_a_sandbox_cannot_reach_the_daemon_other_sandboxes_the_host_or_the_kernel(daemon):
    abstract = f"sandboxd-security-{secrets.token_hex(4)}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + abstract)
    listener.listen()
    cfg = {"unix_socket": daemon.addresses[0][len("unix:"):], "tcp_port": int(daemon.addresses[1].rsplit(":", 1)[1]),
           "daemon_pid": daemon.pid, "state_dir": os.path.abspath(daemon.root), "abstract": abstract,
           "host_ips": host_ipv4_addresses()}
    try:
        async with connect(daemon.addresses[0], token=TOKEN) as node:
            async with node.open("host") as victim, node.open("host") as attacker:
                await victim.write_file("secret", b"the victim's secret")
                await victim.exec("nohup sleep 300 >/dev/null 2>&1 &", timeout_s=10)
                cfg["other_init"] = init_pid_of(victim.id)
                mark = len(daemon.lines)
                await attacker.write_file("/tmp/probe.py", PROBE.encode())
                res = await attacker.exec(["python3", "/tmp/probe.py", json.dumps(cfg)], timeout_s=60)
                assert res.exit_code == 0, res.output.decode(errors="replace")
                outcomes = json.loads(res.output.decode().strip().splitlines()[-1])
                allowed = {k: v for k, v in outcomes.items() if not v.startswith("refused")}
                assert not allowed, allowed
                # and refused for the expected reason, not by accident
                assert outcomes["daemon_unix_socket"] == "refused: ENOENT"
                assert outcomes["daemon_tcp_port"] == "refused: ECONNREFUSED"
                assert outcomes["host_abstract_socket"] == "refused: ECONNREFUSED"
                for ip in cfg["host_ips"]:
                    assert outcomes[f"host_ip_{ip}"] == "refused: ENETUNREACH", outcomes
                assert outcomes["write_/proc/sys/kernel/core_pattern"] == "refused: EROFS"
                assert outcomes["write_/proc/sys/kernel/panic"] == "refused: EROFS"
                for name in ("mount_tmpfs", "mount_sysfs", "umount_proc", "bind_mount_root", "reboot",
                             "clock_settime", "swapon", "raw_socket", "packet_socket", "ptrace_attach_init"):
                    assert outcomes[name] == "refused: EPERM", (name, outcomes[name])
                # ENOSYS on a kernel built without modules or kexec (this build machine's)
                for name in ("init_module", "finit_module", "delete_module", "kexec_load", "iopl"):
                    assert outcomes[name] in ("refused: EPERM", "refused: ENOSYS"), (name, outcomes[name])
                assert outcomes["host_pid_1_environ"] == "refused: EACCES"  # init is not dumpable
                # The victim is untouched, and so is the daemon.
                assert await victim.read_file("secret") == b"the victim's secret"
                assert b"sleep 300" in (await victim.exec("cat /proc/*/cmdline | tr '\\0' ' '", timeout_s=10)).output
                await assert_serves(daemon)
                assert not re.search(r"ERROR|Traceback", daemon.log_text(mark)), daemon.log_text(mark)
    finally:
        listener.close()
