"""agent.discovery: sandbox nodes from a list or from DNS, kept current. A fake resolver and fake
clients on virtual time for membership; a DNS server on localhost for SRV; a real wire server for the
glue to `sandboxd.client.connect`."""

from __future__ import annotations

import socket
import struct
from contextlib import asynccontextmanager

import pytest
import trio

from agent.discovery import (
    DnsSource,
    NoRecords,
    SrvSource,
    StaticSource,
    SystemResolver,
    build_srv_query,
    open_nodes,
    parse_source,
    parse_srv_response,
)
from runtime.wire import Router, Unauthorized, WireServer

REFRESH_S = 30.0
DRAIN_S = 100.0


def test_parse_source():
    assert parse_source("unix:/run/sandboxd.sock") == StaticSource("unix:/run/sandboxd.sock")
    assert parse_source("tcp:node7:7070") == StaticSource("tcp://node7:7070")
    assert parse_source("tcp://10.0.0.1:7070") == StaticSource("tcp://10.0.0.1:7070")
    assert parse_source("tcp:[fd00::1]:7070") == StaticSource("tcp://[fd00::1]:7070")
    assert parse_source("dns:sandboxd.swe.svc.cluster.local:7070") == DnsSource("sandboxd.swe.svc.cluster.local", 7070)
    assert parse_source("srv:_wire._tcp.sandboxd.svc.") == SrvSource("_wire._tcp.sandboxd.svc")
    for bad, words in (("node7:7070", "expected unix:PATH"), ("tcp:node7", "HOST:PORT"), ("dns:name:0", "port"),
                       ("unix:", "path is empty"), ("srv:a..b", "bad SRV name"), ("", "non-empty")):
        with pytest.raises(ValueError, match=words):
            parse_source(bad)


class FakeResolver:
    def __init__(self) -> None:
        self.a: dict[str, list[str] | Exception] = {}
        self.srv_records: dict[str, list[tuple[str, int, list[str]]] | Exception] = {}

    async def addresses(self, name: str) -> list[str]:
        value = self.a.get(name, NoRecords(name))
        if isinstance(value, Exception):
            raise value
        return value

    async def srv(self, name: str):
        value = self.srv_records.get(name, NoRecords(name))
        if isinstance(value, Exception):
            raise value
        return value


class FakeCaller:
    def __init__(self, network: FakeNetwork, address: str) -> None:
        self.network, self.address = network, address

    async def call(self, method: str, params=None, *, timeout_s=None):
        assert method == "wire.ping"
        if self.address in self.network.unreachable:
            raise OSError(f"connect {self.address}: connection refused")
        return {"version": 1}


class FakeClient:
    def __init__(self, network: FakeNetwork, address: str) -> None:
        self.node = address
        self.caller = FakeCaller(network, address)
        self.closed = False


class FakeNetwork:
    """`connect` for open_nodes: records every client it made."""

    def __init__(self) -> None:
        self.clients: list[FakeClient] = []
        self.unreachable: set[str] = set()

    @asynccontextmanager
    async def connect(self, address: str, *, token=None):
        assert token == "tok"
        client = FakeClient(self, address)
        self.clients.append(client)
        try:
            yield client
        finally:
            client.closed = True

    def made(self, address: str) -> list[FakeClient]:
        return [c for c in self.clients if c.node == address]


def nodes_of(clients) -> list[str]:
    return sorted(c.node for c in clients)


async def test_a_static_list_connects_each_node(autojump_clock):
    net = FakeNetwork()
    async with open_nodes(["unix:/run/a.sock", "tcp:b:7070"], token="tok", connect=net.connect,
                          resolver=FakeResolver(), refresh_s=REFRESH_S) as nodes:
        assert nodes_of(await nodes.wait_for(2)) == ["tcp://b:7070", "unix:/run/a.sock"]
        await trio.sleep(REFRESH_S * 3)
        assert len(net.clients) == 2  # re-resolving a static source connects nothing new
    assert all(c.closed for c in net.clients)


async def test_dns_membership_adds_new_nodes_and_drains_vanished_ones(autojump_clock):
    net, dns = FakeNetwork(), FakeResolver()
    dns.a["sandboxd.svc"] = ["10.0.0.1", "10.0.0.2"]
    async with open_nodes(["dns:sandboxd.svc:7070"], token="tok", connect=net.connect, resolver=dns,
                          refresh_s=REFRESH_S, drain_s=DRAIN_S) as nodes:
        changes = nodes.changes()
        first = await changes.__anext__()
        assert nodes_of(first.added) == ["tcp://10.0.0.1:7070", "tcp://10.0.0.2:7070"] and not first.removed
        dns.a["sandboxd.svc"] = ["10.0.0.2", "10.0.0.3"]  # .1 went away (not ready), .3 came up
        change = await changes.__anext__()
        assert nodes_of(change.added) == ["tcp://10.0.0.3:7070"]
        assert nodes_of(change.removed) == ["tcp://10.0.0.1:7070"]
        assert nodes_of(nodes.clients) == ["tcp://10.0.0.2:7070", "tcp://10.0.0.3:7070"]
        (gone,) = change.removed
        assert not gone.closed  # draining: episodes already there may finish
        await trio.sleep(DRAIN_S + 1)
        assert gone.closed
        assert [c.closed for c in net.made("tcp://10.0.0.2:7070")] == [False]  # never reconnected


async def test_a_failed_lookup_keeps_the_nodes_and_an_empty_answer_drains_them(autojump_clock):
    net, dns = FakeNetwork(), FakeResolver()
    dns.a["sandboxd.svc"] = ["10.0.0.1"]
    async with open_nodes(["dns:sandboxd.svc:7070"], token="tok", connect=net.connect, resolver=dns,
                          refresh_s=REFRESH_S, drain_s=0) as nodes:
        assert nodes.addresses == ["tcp://10.0.0.1:7070"]
        dns.a["sandboxd.svc"] = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        await trio.sleep(REFRESH_S * 3)
        assert nodes.addresses == ["tcp://10.0.0.1:7070"]  # the DNS server hiccuped, not the node
        dns.a["sandboxd.svc"] = NoRecords("NXDOMAIN")  # every pod is not ready (or the Service is gone)
        await trio.sleep(REFRESH_S + 1)
        assert nodes.addresses == [] and net.clients[0].closed


async def test_a_node_that_does_not_answer_is_not_published_until_it_does(autojump_clock):
    net, dns = FakeNetwork(), FakeResolver()
    dns.a["sandboxd.svc"] = ["10.0.0.1", "10.0.0.2"]
    net.unreachable.add("tcp://10.0.0.2:7070")
    async with open_nodes(["dns:sandboxd.svc:7070"], token="tok", connect=net.connect, resolver=dns,
                          refresh_s=REFRESH_S) as nodes:
        assert nodes.addresses == ["tcp://10.0.0.1:7070"]
        assert net.made("tcp://10.0.0.2:7070")[0].closed  # its failed connection was closed
        net.unreachable.clear()
        with trio.fail_after(REFRESH_S + 1):
            assert nodes_of(await nodes.wait_for(2)) == ["tcp://10.0.0.1:7070", "tcp://10.0.0.2:7070"]


async def test_a_node_back_before_its_drain_ends_keeps_its_connection(autojump_clock):
    net, dns = FakeNetwork(), FakeResolver()
    dns.a["sandboxd.svc"] = ["10.0.0.1"]
    async with open_nodes(["dns:sandboxd.svc:7070"], token="tok", connect=net.connect, resolver=dns,
                          refresh_s=REFRESH_S, drain_s=DRAIN_S) as nodes:
        changes = nodes.changes()
        await changes.__anext__()
        dns.a["sandboxd.svc"] = NoRecords("gone")
        assert (await changes.__anext__()).removed
        dns.a["sandboxd.svc"] = ["10.0.0.1"]
        back = await changes.__anext__()
        (client,) = back.added
        assert client is net.clients[0] and len(net.clients) == 1
        await trio.sleep(DRAIN_S * 2)
        assert not client.closed and nodes.clients == [client]


async def test_srv_source(autojump_clock):
    net, dns = FakeNetwork(), FakeResolver()
    dns.srv_records["_wire._tcp.sandboxd.svc"] = [("a.sandboxd.svc", 7070, ["10.0.0.1"]),
                                                  ("b.sandboxd.svc", 7071, ["fd00::2"])]
    async with open_nodes(["srv:_wire._tcp.sandboxd.svc"], token="tok", connect=net.connect, resolver=dns) as nodes:
        assert sorted(nodes.addresses) == ["tcp://10.0.0.1:7070", "tcp://[fd00::2]:7071"]


def test_open_nodes_checks_its_arguments():
    async def run(**kwargs):
        async with open_nodes(**kwargs):
            pass

    with pytest.raises(ValueError, match="at least one"):
        trio.run(lambda: run(sources=[]))
    with pytest.raises(ValueError, match="refresh_s"):
        trio.run(lambda: run(sources=["unix:/x"], refresh_s=0))


# -- SRV over real DNS packets --------------------------------------------------------------------------


def _name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"


def dns_answer(query: bytes, srv: list[tuple[int, int, int, str]], additional: dict[str, str], *,
               rcode: int = 0, truncated: bool = False) -> bytes:
    """A response to `query`: SRV answers (priority, weight, port, target) whose owner is a pointer
    to the question's name, A/AAAA additional records."""
    qid = query[:2]
    question_end = query.index(b"\0", 12) + 5
    flags = 0x8180 | rcode | (0x0200 if truncated else 0)
    body = b""
    for priority, weight, port, target in srv:
        rdata = struct.pack("!HHH", priority, weight, port) + _name(target)
        body += b"\xc0\x0c" + struct.pack("!HHIH", 33, 1, 30, len(rdata)) + rdata
    extra = b""
    for owner, ip in additional.items():
        packed = socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
        extra += _name(owner) + struct.pack("!HHIH", 28 if ":" in ip else 1, 1, 30, len(packed)) + packed
    header = qid + struct.pack("!HHHHH", flags, 1, len(srv), 0, len(additional))
    return header + query[12:question_end] + body + extra


def test_srv_packets_parse_by_priority_then_weight():
    query = build_srv_query("_wire._tcp.sandboxd.svc", query_id=7)
    msg = dns_answer(query, [(10, 5, 7071, "b.sandboxd.svc"), (0, 1, 7070, "a.sandboxd.svc"),
                             (10, 50, 7072, "c.sandboxd.svc")],
                     {"a.sandboxd.svc": "10.0.0.1", "b.sandboxd.svc": "fd00::2"})
    records, addresses = parse_srv_response(msg)
    assert records == [("a.sandboxd.svc", 7070), ("c.sandboxd.svc", 7072), ("b.sandboxd.svc", 7071)]
    assert addresses == {"a.sandboxd.svc": ["10.0.0.1"], "b.sandboxd.svc": ["fd00::2"]}
    with pytest.raises(NoRecords):
        parse_srv_response(dns_answer(query, [], {}, rcode=3))
    with pytest.raises(ValueError, match="rcode 2"):
        parse_srv_response(dns_answer(query, [], {}, rcode=2))
    with pytest.raises(ValueError, match="malformed"):
        parse_srv_response(msg[:40])


async def test_system_resolver_asks_a_dns_server_over_udp_then_tcp_when_truncated():
    records = [(0, 1, 7070, "a.sandboxd.svc"), (0, 1, 7070, "b.sandboxd.svc")]
    extra = {"a.sandboxd.svc": "10.0.0.1", "b.sandboxd.svc": "10.0.0.2"}
    udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await udp.bind(("127.0.0.1", 0))
    port = udp.getsockname()[1]
    tcp_listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    asked: list[str] = []

    async def serve_udp() -> None:
        while True:
            query, peer = await udp.recvfrom(4096)
            asked.append("udp")
            # Too many records for UDP: say so (TC), the client comes back over TCP.
            await udp.sendto(dns_answer(query, [], {}, truncated=True), peer)

    async def serve_tcp(stream) -> None:
        data = await stream.receive_some(4096)
        asked.append("tcp")
        answer = dns_answer(data[2:], records, extra)
        await stream.send_all(struct.pack("!H", len(answer)) + answer)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_udp)
        nursery.start_soon(trio.serve_listeners, serve_tcp, tcp_listeners)
        resolver = SystemResolver(nameservers=[("127.0.0.1", port)], search=[])
        with trio.fail_after(10):
            found = await resolver.srv("_wire._tcp.sandboxd.svc")
        assert found == [("a.sandboxd.svc", 7070, ["10.0.0.1"]), ("b.sandboxd.svc", 7070, ["10.0.0.2"])]
        assert asked == ["udp", "tcp"]
        nursery.cancel_scope.cancel()
    udp.close()


async def test_system_resolver_a_records_from_the_system(tmp_path):
    resolver = SystemResolver(resolv_conf=str(tmp_path / "none"))
    assert "127.0.0.1" in await resolver.addresses("localhost")
    with pytest.raises(NoRecords):
        await resolver.addresses("no-such-host.invalid")


# -- the glue: sandboxd.client.connect against a real wire server ----------------------------------------


async def test_open_nodes_connects_real_clients_and_skips_a_wrong_token(tmp_path, caplog):
    good, bad = f"unix:{tmp_path / 'good.sock'}", f"unix:{tmp_path / 'bad.sock'}"
    async with trio.open_nursery() as nursery:
        await nursery.start(WireServer(Router(), token="tok").serve, [good])
        await nursery.start(WireServer(Router(), token="other").serve, [bad])
        with trio.fail_after(30):
            async with open_nodes([good, bad], token="tok", refresh_s=3600) as nodes:
                (client,) = nodes.clients
                assert client.node == good
                assert (await client.caller.call("wire.ping"))["version"] == 1
        refused = [r for r in caplog.records if "not added" in r.getMessage()]
        assert refused and refused[0].code == Unauthorized.code and bad in refused[0].getMessage()
        nursery.cancel_scope.cancel()
