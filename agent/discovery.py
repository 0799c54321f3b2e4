"""Sandbox nodes for the scheduler: from a static list or from DNS (a Kubernetes headless Service),
re-resolved periodically; new nodes are connected and published, vanished ones drained.

    async with open_nodes(["dns:sandboxd.swe.svc.cluster.local:7070"], token=token) as nodes:
        clients = await nodes.wait_for(1)         # connected `sandboxd.client.SandboxClient`s
        scheduler = Scheduler(clients, policy, grader, tokenizer, config)
        async for change in nodes.changes():      # Membership(added=..., removed=...)
            ...

Sources (one string each):

    unix:/run/sandboxd.sock, tcp://host:7070, tcp:host:7070    one node each, never re-resolved
    dns:NAME:PORT          one node per A/AAAA record of NAME (trio's getaddrinfo): the pod IPs of a
                           headless Service, which publishes ready pods only (`sandboxd doctor`)
    srv:_wire._tcp.NAME    one node per SRV record (target, port); targets' addresses come from the
                           answer's additional records, else from getaddrinfo

How the scheduler takes it: start it on a snapshot (``Scheduler(await nodes.wait_for(n), ...)``) and
let it follow membership with ``nursery.start_soon(scheduler.follow, nodes.changes())``, which calls
``scheduler.add_node(client)`` for each added node and ``scheduler.drain_node(client.node)`` for each
removed one (no new episodes start there; running ones finish, or requeue if the node dies).

A removed node's connection stays open for `drain_s` (episodes running there can finish), then
closes; a node that comes back before that is published again on the same connection. A DNS failure
that may be temporary (EAI_AGAIN, a timeout) keeps the nodes of that source; an answer that the name
has no records (NXDOMAIN, no data) removes them. A node that does not answer a ping after connecting
is not published; the next refresh tries again.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

__all__ = ["DnsSource", "Membership", "NodeSet", "Resolver", "SrvSource", "StaticSource", "SystemResolver",
           "open_nodes", "parse_source", "resolve"]

log = logging.getLogger("swe_dapo.discovery")


# -- sources ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StaticSource:
    address: str  # unix:PATH or tcp://HOST:PORT


@dataclass(frozen=True)
class DnsSource:
    name: str
    port: int


@dataclass(frozen=True)
class SrvSource:
    name: str  # e.g. _wire._tcp.sandboxd.swe.svc.cluster.local


Source = StaticSource | DnsSource | SrvSource


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"node source {entry!r}: port must be 1-65535, got {text!r}")
    return int(text)


def _host_port(rest: str, entry: str) -> tuple[str, int]:
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
    else:
        host, sep, port = rest.rpartition(":")
    if not sep or not host:
        raise ValueError(f"node source {entry!r}: expected HOST:PORT after the scheme")
    return host, _port(port, entry)


def tcp_address(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def parse_source(entry: str) -> Source:
    """One source string (see the module docstring); errors name the entry and what is wrong."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"node source must be a non-empty string, got {entry!r}")
    entry = entry.strip()
    if entry.startswith("unix:"):
        if not entry[len("unix:"):]:
            raise ValueError(f"node source {entry!r}: the socket path is empty")
        return StaticSource(entry)
    if entry.startswith("tcp://") or entry.startswith("tcp:"):
        return StaticSource(tcp_address(*_host_port(entry.split(":", 1)[1].removeprefix("//"), entry)))
    if entry.startswith("dns:"):
        return DnsSource(*_host_port(entry[len("dns:"):], entry))
    if entry.startswith("srv:"):
        name = entry[len("srv:"):].rstrip(".")
        if not name or any(not label for label in name.split(".")):
            raise ValueError(f"node source {entry!r}: bad SRV name")
        return SrvSource(name)
    raise ValueError(f"node source {entry!r}: expected unix:PATH, tcp:HOST:PORT, dns:NAME:PORT or srv:NAME")


# -- resolving ----------------------------------------------------------------------------------------


class NoRecords(Exception):
    """The name exists in no form we can use (NXDOMAIN, no data): an authoritative empty answer."""


class Resolver(Protocol):
    """A lookup raises `NoRecords` for an authoritative empty answer, OSError for a failure that may pass."""

    async def addresses(self, name: str) -> list[str]: ...
    async def srv(self, name: str) -> list[tuple[str, int, list[str]]]: ...  # (target, port, its addresses)


_NO_RECORD_ERRORS = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


class SystemResolver:
    """A/AAAA through trio's getaddrinfo (the system's resolver, /etc/hosts included); SRV through a
    small DNS client (UDP with EDNS0, TCP when truncated) asking the nameservers of resolv.conf."""

    def __init__(self, *, nameservers: Sequence[tuple[str, int]] | None = None, search: Sequence[str] | None = None,
                 timeout_s: float = 2.0, resolv_conf: str = "/etc/resolv.conf") -> None:
        conf_servers, conf_search = _read_resolv_conf(resolv_conf)
        self.nameservers = list(nameservers if nameservers is not None else conf_servers)
        self.search = list(search if search is not None else conf_search)
        self.timeout_s = timeout_s

    async def addresses(self, name: str) -> list[str]:
        try:
            infos = await trio.socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in _NO_RECORD_ERRORS:
                raise NoRecords(f"{name}: {exc.strerror}") from exc
            raise
        return sorted({info[4][0] for info in infos})

    async def srv(self, name: str) -> list[tuple[str, int, list[str]]]:
        if not self.nameservers:
            raise OSError(f"SRV {name}: no nameserver (resolv.conf lists none)")
        candidates = [name] + ([f"{name}.{s}" for s in self.search] if not name.endswith(".") else [])
        for candidate in candidates:
            try:
                records, extra = await self._query_any(candidate.rstrip("."))
            except NoRecords:
                continue
            out = []
            for target, port in records:
                if not target:  # "." : the service is decidedly not available (RFC 2782)
                    continue
                addrs = extra.get(target) or await self.addresses(target)
                out.append((target, port, sorted(addrs)))
            return out
        raise NoRecords(f"SRV {name}: no records")

    async def _query_any(self, name: str) -> tuple[list[tuple[str, int]], dict[str, list[str]]]:
        error: Exception | None = None
        for server in self.nameservers:
            try:
                with trio.fail_after(self.timeout_s):
                    return parse_srv_response(await _exchange(server, build_srv_query(name)))
            except (OSError, trio.TooSlowError, ValueError) as exc:
                error = exc  # the next server may answer
        raise OSError(f"SRV {name}: no nameserver answered ({error})")


def _read_resolv_conf(path: str) -> tuple[list[tuple[str, int]], list[str]]:
    servers: list[tuple[str, int]] = []
    search: list[str] = []
    try:
        with open(path) as f:
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    servers.append((words[1], 53))
                elif words and words[0] in ("search", "domain"):
                    search = words[1:]
    except OSError:
        pass
    return servers, search


async def _exchange(server: tuple[str, int], query: bytes) -> bytes:
    """One DNS exchange: UDP, then TCP when the answer is truncated (TC)."""
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
        await sock.connect(server)
        await sock.send(query)
        while True:
            answer = await sock.recv(65535)
            if answer[:2] == query[:2]:  # ours (same id); anything else is ignored
                break
    if not answer[2] & 0x02:  # TC bit clear
        return answer
    stream = await trio.open_tcp_stream(*server)
    async with stream:
        await stream.send_all(struct.pack("!H", len(query)) + query)
        data = b""
        while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
            chunk = await stream.receive_some(65535)
            if not chunk:
                raise OSError("DNS over TCP: connection closed mid-answer")
            data += chunk
    return data[2:2 + struct.unpack("!H", data[:2])[0]]


# DNS wire format (RFC 1035; SRV RFC 2782; EDNS0 RFC 6891). Pure functions: bytes in, records out.
_TYPE_A, _TYPE_AAAA, _TYPE_SRV, _TYPE_OPT = 1, 28, 33, 41


def build_srv_query(name: str, query_id: int | None = None) -> bytes:
    qid = random.getrandbits(16) if query_id is None else query_id
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1)  # RD; one question; one OPT record
    qname = b"".join(bytes([len(label)]) + label.encode("idna") for label in name.rstrip(".").split(".")) + b"\0"
    opt = b"\0" + struct.pack("!HHIH", _TYPE_OPT, 4096, 0, 0)  # EDNS0: answers up to 4096 bytes over UDP
    return header + qname + struct.pack("!HH", _TYPE_SRV, 1) + opt


def _read_name(msg: bytes, pos: int) -> tuple[str, int]:
    labels: list[str] = []
    end = None
    for _ in range(128):  # bounds compression loops
        length = msg[pos]
        if length & 0xC0 == 0xC0:
            if end is None:
                end = pos + 2
            pos = struct.unpack("!H", msg[pos:pos + 2])[0] & 0x3FFF
            continue
        if length == 0:
            return ".".join(labels).lower(), (end if end is not None else pos + 1)
        labels.append(msg[pos + 1:pos + 1 + length].decode("ascii", "replace"))
        pos += 1 + length
    raise ValueError("DNS name has too many labels or a compression loop")


def parse_srv_response(msg: bytes) -> tuple[list[tuple[str, int]], dict[str, list[str]]]:
    """(SRV records as (target, port) by priority then weight, addresses of targets from the
    additional section). NXDOMAIN raises NoRecords; other failures ValueError."""
    try:
        _, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", msg[:12])
        rcode = flags & 0x000F
        if rcode == 3:
            raise NoRecords("NXDOMAIN")
        if rcode != 0:
            raise ValueError(f"DNS server answered rcode {rcode}")
        pos = 12
        for _ in range(qd):
            _, pos = _read_name(msg, pos)
            pos += 4
        srv: list[tuple[int, int, str, int]] = []
        addresses: dict[str, list[str]] = {}
        for index in range(an + ns + ar):
            owner, pos = _read_name(msg, pos)
            rtype, _, _, rdlength = struct.unpack("!HHIH", msg[pos:pos + 10])
            pos += 10
            rdata_at = pos
            pos += rdlength
            if index < an and rtype == _TYPE_SRV:
                priority, weight, port = struct.unpack("!HHH", msg[rdata_at:rdata_at + 6])
                target, _ = _read_name(msg, rdata_at + 6)
                srv.append((priority, -weight, target, port))
            elif index >= an + ns and rtype in (_TYPE_A, _TYPE_AAAA):
                ip = ipaddress.ip_address(msg[rdata_at:pos])
                addresses.setdefault(owner, []).append(str(ip))
    except (struct.error, IndexError) as exc:
        raise ValueError(f"malformed DNS answer: {exc}") from exc
    if not srv:
        raise NoRecords("no SRV records")
    return [(target, port) for _, _, target, port in sorted(srv)], addresses


async def resolve(source: Source, resolver: Resolver) -> set[str]:
    """The node addresses of one source now. Raises NoRecords or OSError as the resolver does."""
    if isinstance(source, StaticSource):
        return {source.address}
    if isinstance(source, DnsSource):
        return {tcp_address(ip, source.port) for ip in await resolver.addresses(source.name)}
    return {tcp_address(ip, port) for _, port, ips in await resolver.srv(source.name) for ip in ips}


# -- membership ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Membership:
    added: tuple[Any, ...] = ()  # SandboxClients now usable
    removed: tuple[Any, ...] = ()  # SandboxClients to take no new work (closed after drain_s)


@dataclass(eq=False)
class _Member:
    address: str
    client: Any
    closing: trio.Event = field(default_factory=trio.Event)
    drain: trio.CancelScope | None = None  # set while draining


Connect = Callable[..., AbstractAsyncContextManager[Any]]


class NodeSet:
    """Connected nodes by address; `update()` makes it match a set of addresses."""

    def __init__(self, nursery: trio.Nursery, *, token: str | None, connect: Connect, drain_s: float = 300.0,
                 ping_timeout_s: float = 10.0) -> None:
        self._nursery = nursery
        self._token = token
        self._connect = connect
        self.drain_s = drain_s
        self.ping_timeout_s = ping_timeout_s
        self._active: dict[str, _Member] = {}
        self._draining: dict[str, _Member] = {}
        self._changed = trio.Event()

    @property
    def clients(self) -> list[Any]:
        """The clients of the nodes published now (in the order they joined)."""
        return [m.client for m in self._active.values()]

    @property
    def addresses(self) -> list[str]:
        return list(self._active)

    def _publish(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def update(self, wanted: set[str]) -> None:
        """Connect and publish new addresses (concurrently); drain the ones no longer wanted."""
        joined: dict[str, _Member] = {}
        for address in sorted(wanted - self._active.keys()):
            member = self._draining.pop(address, None)
            if member is not None:  # back before its drain ended: same connection
                assert member.drain is not None
                member.drain.cancel()
                member.drain = None
                joined[address] = member

        async def connect(address: str) -> None:
            try:
                joined[address] = await self._nursery.start(self._serve_member, address)
            except Exception as exc:  # not published; the next refresh tries again
                log.warning("sandbox node %s: not added: %s: %s", address, type(exc).__name__, exc,
                            extra={"node": address, "code": getattr(exc, "code", None)})
            else:
                log.info("sandbox node %s added", address, extra={"node": address})

        async with trio.open_nursery() as connecting:
            for address in sorted(wanted - self._active.keys() - joined.keys()):
                connecting.start_soon(connect, address)
        changed = bool(joined)
        for address in sorted(joined):  # a stable order: the order clients are listed in
            self._active[address] = joined[address]
        for address in sorted(self._active.keys() - wanted):
            member = self._active.pop(address)
            member.drain = trio.CancelScope()
            self._draining[address] = member
            self._nursery.start_soon(self._drain, member)
            log.info("sandbox node %s removed: draining for %.0f s", address, self.drain_s, extra={"node": address})
            changed = True
        if changed:
            self._publish()

    async def _serve_member(self, address: str, *, task_status: trio.TaskStatus[_Member]) -> None:
        async with self._connect(address, token=self._token) as client:
            # The wire client connects lazily: a ping proves the node is there and takes our token.
            await client.caller.call("wire.ping", timeout_s=self.ping_timeout_s)
            member = _Member(address, client)
            task_status.started(member)
            await member.closing.wait()

    async def _drain(self, member: _Member) -> None:
        assert member.drain is not None
        with member.drain:
            await trio.sleep(self.drain_s)
            self._draining.pop(member.address, None)
            member.closing.set()
            log.info("sandbox node %s drained and closed", member.address, extra={"node": member.address})

    async def changes(self) -> AsyncIterator[Membership]:
        """Membership changes from this subscriber's point of view; the first holds every node so far.
        Changes that happen between two reads are merged (no queue to overflow)."""
        seen: dict[str, Any] = {}
        while True:
            current = {a: m.client for a, m in self._active.items()}
            added = tuple(c for a, c in current.items() if a not in seen)
            removed = tuple(c for a, c in seen.items() if a not in current)
            if added or removed:
                seen = current
                yield Membership(added, removed)
            else:
                await self._changed.wait()

    async def wait_for(self, count: int = 1) -> list[Any]:
        """The clients, once at least `count` nodes are published (bound it with trio.fail_after)."""
        while len(self._active) < count:
            await self._changed.wait()
        return self.clients


@asynccontextmanager
async def open_nodes(sources: Sequence[str], *, token: str | None = None, refresh_s: float = 30.0,
                     drain_s: float = 300.0, resolver: Resolver | None = None, connect: Connect | None = None,
                     ping_timeout_s: float = 10.0) -> AsyncIterator[NodeSet]:
    """Resolve `sources`, connect the nodes, and keep them current every `refresh_s` seconds.

    `connect` defaults to `sandboxd.client.connect`; every connection closes when the block ends."""
    parsed = [parse_source(s) for s in sources]
    if not parsed:
        raise ValueError("open_nodes: at least one node source is required")
    if refresh_s <= 0 or drain_s < 0:
        raise ValueError(f"open_nodes: refresh_s must be > 0 and drain_s >= 0, got {refresh_s}, {drain_s}")
    if connect is None:
        from sandboxd.client import connect as sandboxd_connect

        connect = sandboxd_connect
    resolver = resolver or SystemResolver()
    last: dict[Source, set[str]] = {s: set() for s in parsed}

    async def refresh() -> None:
        for source in parsed:
            try:
                last[source] = await resolve(source, resolver)
            except NoRecords as exc:
                if last[source]:
                    log.warning("node source %s has no records now (%s): its nodes are drained", source, exc)
                last[source] = set()
            except (OSError, trio.TooSlowError) as exc:  # may pass: keep what it had
                log.warning("node source %s: lookup failed (%s); keeping its %d node(s)", source, exc,
                            len(last[source]))
        await nodes.update(set().union(*last.values()))

    async with trio.open_nursery() as nursery:
        nodes = NodeSet(nursery, token=token, connect=connect, drain_s=drain_s, ping_timeout_s=ping_timeout_s)
        await refresh()

        async def refresher() -> None:
            while True:
                await trio.sleep(refresh_s)
                await refresh()

        nursery.start_soon(refresher)
        try:
            yield nodes
        finally:
            nursery.cancel_scope.cancel()
