"""Prometheus metrics of `sandboxd serve`, and the HTTP listener that serves them.

Every number has one owner; the collector reads the owners at scrape time and keeps no copy:

    CallStats            (the router, service.py)  per-method latency histograms, outcomes (ok or a
                                                   wire error code): sandboxes created, destroyed,
                                                   restores, forks, snapshots
    WireServer           (runtime.wire)            connections, requests, errors by wire code
                                                   (refused hellos and busy included)
    runtime.stats()      (ns, podman or dir)       live sandboxes, snapshots, layers, spare uppers,
                                                   zygote embryos, background errors
    ProcessCollector     (prometheus_client)       cpu, resident memory, open fds of the daemon

Names (all prefixed ``sandboxd_`` but the process ones):

    call_duration_seconds{method}                 histogram (buckets 0.25 ms .. 8.7 min, factor 2)
    calls_total{method,code}                      code "ok" or the wire error code of the answer
    sandboxes_created_total{via}                  via "create" or "fork"
    sandboxes_destroyed_total, restores_total, forks_total, snapshots_total
    wire_connections_open, wire_connections_total, wire_requests_total, wire_errors_total{code},
    wire_refused_total{code}, wire_protocol_errors_total
    sandboxes, snapshots, layers, spare_uppers, zygote_embryos, images, pending_removals  (gauges,
                                                   those the runtime reports)
    state_free_bytes, state_free_inodes           of the filesystem holding the state directory
    uptime_seconds, info{runtime}

A call refused before its handler runs (unknown method, a parameter of the wrong type) counts in
``wire_errors_total`` only: ``calls_total`` counts what reached the runtime.

The listener (`serve_metrics`) is a small HTTP/1.1 server (h11) on the daemon's trio loop: a scrape
is a few milliseconds of CPU between two wire calls, and the collector reads the daemon's state from
the thread that owns it (prometheus_client's own server runs in a thread, which would read dicts the
loop is changing).
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["CallStats", "DaemonCollector", "LatencyHistogram", "daemon_registry", "parse_http_listen", "serve_metrics"]

log = logging.getLogger("sandboxd.metrics")

# Bucket upper bounds in milliseconds: 0.25 ms .. ~8.7 min, factor 2.
BOUNDS_MS = [0.25 * 2**i for i in range(22)]


class LatencyHistogram:
    """Fixed log-spaced buckets; O(1) memory per method whatever the call count."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS_MS) + 1)  # the last one: over the largest bound
        self.total = 0
        self.sum_ms = 0.0

    def observe(self, ms: float) -> None:
        self.counts[bisect.bisect_left(BOUNDS_MS, ms)] += 1
        self.total += 1
        self.sum_ms += ms

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile q (ms); nan when empty."""
        if not self.total:
            return math.nan
        rank = q * self.total
        seen = 0
        for i, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return BOUNDS_MS[i] if i < len(BOUNDS_MS) else math.inf
        return math.inf

    def cumulative_seconds(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (le in seconds, cumulative count), ending with +Inf."""
        out: list[tuple[str, float]] = []
        seen = 0
        for bound_ms, count in zip(BOUNDS_MS, self.counts):
            seen += count
            out.append((repr(bound_ms / 1e3), seen))
        out.append(("+Inf", self.total))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.total, "sum_ms": round(self.sum_ms, 3), "p50_ms": self.quantile(0.5),
                "p99_ms": self.quantile(0.99), "buckets_ms": BOUNDS_MS, "counts": list(self.counts)}


class CallStats:
    """What the router records per call: its latency, and its outcome ("ok" or the error code)."""

    def __init__(self) -> None:
        self.latency: dict[str, LatencyHistogram] = {}
        self.outcomes: Counter[tuple[str, str]] = Counter()  # (method, "ok" | code) -> calls
        self.started_at = time.time()

    def histogram(self, method: str) -> LatencyHistogram:
        return self.latency.setdefault(method, LatencyHistogram())

    def record(self, method: str, code: str, ms: float) -> None:
        self.histogram(method).observe(ms)
        self.outcomes[(method, code)] += 1

    def ok(self, method: str) -> int:
        return self.outcomes[(method, "ok")]

    def errors_by_code(self) -> dict[str, int]:
        errors: Counter[str] = Counter()
        for (_, code), n in self.outcomes.items():
            if code != "ok":
                errors[code] += n
        return dict(errors)


# runtime.stats() key -> (metric name, help). Keys a runtime does not report are not exported.
_RUNTIME_GAUGES = {
    "sandboxes": ("sandboxd_sandboxes", "Sandboxes alive now."),
    "snapshots": ("sandboxd_snapshots", "Snapshots held now."),
    "layers": ("sandboxd_layers", "Read-only layers held now (ns)."),
    "spare_uppers": ("sandboxd_spare_uppers", "Pre-made empty uppers ready for restore and create (ns)."),
    "zygote_embryos": ("sandboxd_zygote_embryos", "Half-started inits ready in the zygote's pool (ns)."),
    "images": ("sandboxd_images", "Images referenced by this daemon (podman)."),
    "copies": ("sandboxd_copies", "Frozen directory copies on disk (dir)."),
    "pending_removals": ("sandboxd_pending_removals", "Containers queued for removal (podman)."),
    "pending_deletions": ("sandboxd_pending_deletions", "Directory trees queued for deletion (dir)."),
}


class DaemonCollector(Collector):
    """Reads the daemon's counters at scrape time (see the module docstring for the names)."""

    def __init__(self, calls: CallStats, *, wire: Any = None, runtime_stats: Callable[[], dict] | None = None,
                 state_dir: str | None = None, runtime_name: str = "") -> None:
        self.calls = calls
        self.wire = wire  # a WireServer (its .connections and .counters), or None in-process
        self.runtime_stats = runtime_stats
        self.state_dir = state_dir
        self.runtime_name = runtime_name

    def collect(self) -> Iterator[Metric]:
        yield from self._calls()
        if self.wire is not None:
            yield from self._wire()
        if self.runtime_stats is not None:
            yield from self._runtime()
        if self.state_dir is not None:
            yield from self._state_dir()
        info = GaugeMetricFamily("sandboxd_info", "The daemon's runtime.", labels=["runtime"])
        info.add_metric([self.runtime_name], 1)
        yield info
        yield GaugeMetricFamily("sandboxd_uptime_seconds", "Seconds since the daemon started.",
                                value=time.time() - self.calls.started_at)

    def _calls(self) -> Iterator[Metric]:
        calls = self.calls
        hist = HistogramMetricFamily("sandboxd_call_duration_seconds",
                                     "Latency of wire calls as the daemon sees them, by method.", labels=["method"])
        for method, h in sorted(calls.latency.items()):
            hist.add_metric([method], h.cumulative_seconds(), h.sum_ms / 1e3)
        yield hist
        outcomes = CounterMetricFamily("sandboxd_calls", "Calls that reached the runtime, by method and "
                                       "outcome (ok or the wire error code).", labels=["method", "code"])
        for (method, code), n in sorted(calls.outcomes.items()):
            outcomes.add_metric([method, code], n)
        yield outcomes
        created = CounterMetricFamily("sandboxd_sandboxes_created", "Sandboxes created.", labels=["via"])
        created.add_metric(["create"], calls.ok("sandbox.create"))
        created.add_metric(["fork"], calls.ok("sandbox.fork"))
        yield created
        for name, method, doc in (("sandboxd_sandboxes_destroyed", "sandbox.destroy", "Sandboxes destroyed by a call."),
                                  ("sandboxd_restores", "sandbox.restore", "Sandboxes restored (reset) to a snapshot."),
                                  ("sandboxd_forks", "sandbox.fork", "Sandboxes forked from a snapshot."),
                                  ("sandboxd_snapshots_taken", "sandbox.snapshot", "Snapshots taken.")):
            yield CounterMetricFamily(name, doc, value=calls.ok(method))

    def _wire(self) -> Iterator[Metric]:
        counters = self.wire.counters
        yield GaugeMetricFamily("sandboxd_wire_connections_open", "Wire connections open now.",
                                value=self.wire.connections)
        yield CounterMetricFamily("sandboxd_wire_connections", "Wire connections accepted.",
                                  value=counters.get("connections_total", 0))
        yield CounterMetricFamily("sandboxd_wire_requests", "Wire requests received.", value=counters.get("calls", 0))
        yield CounterMetricFamily("sandboxd_wire_protocol_errors", "Connections closed for breaking the protocol "
                                  "(bad hello, wrong token, oversized frame, ...).",
                                  value=counters.get("protocol_errors", 0))
        refused = CounterMetricFamily("sandboxd_wire_refused", "Connections refused or closed before or at the "
                                      "hello, by wire error code.", labels=["code"])
        for key, n in sorted(counters.items()):
            if key.startswith("refused."):
                refused.add_metric([key[len("refused."):]], n)
        yield refused
        errors = CounterMetricFamily("sandboxd_wire_errors", "Error answers sent, by wire error code (calls and "
                                     "connections).", labels=["code"])
        for key, n in sorted(counters.items()):
            if key.startswith("errors."):
                errors.add_metric([key[len("errors."):]], n)
        yield errors

    def _runtime(self) -> Iterator[Metric]:
        try:
            stats = self.runtime_stats()
        except Exception as exc:  # a scrape must not take the daemon down; the gap shows on the graph
            log.warning("runtime stats failed during a scrape: %s", exc, exc_info=exc)
            return
        for key, (name, doc) in _RUNTIME_GAUGES.items():
            value = stats.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                yield GaugeMetricFamily(name, doc, value=value)
        if isinstance(stats.get("background_errors"), list):
            yield GaugeMetricFamily("sandboxd_background_errors", "Recent background errors kept by the runtime "
                                    "(at most 10).", value=len(stats["background_errors"]))

    def _state_dir(self) -> Iterator[Metric]:
        try:
            st = os.statvfs(self.state_dir)
        except OSError:
            return
        yield GaugeMetricFamily("sandboxd_state_free_bytes", "Bytes free for the daemon on the state directory's "
                                "filesystem.", value=st.f_bavail * st.f_frsize)
        yield GaugeMetricFamily("sandboxd_state_free_inodes", "Inodes free on the state directory's filesystem.",
                                value=st.f_favail)


def daemon_registry(calls: CallStats, **kwargs: Any) -> CollectorRegistry:
    """A registry of its own for one daemon (never the global one: tests run several in a process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(calls, **kwargs))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def parse_http_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``http://HOST:PORT`` -> (host, port); errors name the flag."""
    rest = text.removeprefix("http://").rstrip("/")
    if rest.startswith("["):
        host, sep, port_text = rest[1:].partition("]:")
    else:
        host, sep, port_text = rest.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"--metrics-listen {text!r}: expected HOST:PORT, like 127.0.0.1:9464")
    return host, int(port_text)


_MAX_SCRAPERS = 32  # concurrent HTTP connections; more are closed at once
_REQUEST_TIMEOUT_S = 10.0  # to send one whole request; then the connection is closed
_MAX_REQUEST_BYTES = 16 << 10


async def serve_metrics(listen: str, registry: CollectorRegistry, *,
                        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `registry` as Prometheus text at ``GET /metrics`` on `listen` (HOST:PORT) until cancelled.

    Reports the bound URL through `task_status` (port 0 picks a free port)."""
    host, port = parse_http_listen(listen)
    listeners = await trio.open_tcp_listeners(port, host=host)
    sockname = listeners[0].socket.getsockname()
    bound_host = f"[{sockname[0]}]" if ":" in sockname[0] else sockname[0]
    url = f"http://{bound_host}:{sockname[1]}/metrics"
    active = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal active
        if active >= _MAX_SCRAPERS:
            await trio.aclose_forcefully(stream)
            return
        active += 1
        try:
            await _serve_http_connection(stream, registry)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError) as exc:
            log.debug("metrics connection ended: %s", exc)
        finally:
            active -= 1
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        log.info("metrics on %s", url)
        task_status.started(url)


async def _serve_http_connection(stream: trio.SocketStream, registry: CollectorRegistry) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_BYTES)
    while True:
        request = None
        with trio.move_on_after(_REQUEST_TIMEOUT_S):
            while True:  # the request and the end of its (empty) body
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(_MAX_REQUEST_BYTES))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.EndOfMessage) and request is not None:
                    break
                elif not isinstance(event, h11.Data):
                    return  # the client closed the connection
        if request is None or not isinstance(event, h11.EndOfMessage):
            return  # idle or too slow
        status, body, ctype = _route(request, registry)
        headers = [("content-type", ctype), ("content-length", str(len(body)))]
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        if request.method != b"HEAD":
            await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return
        conn.start_next_cycle()


def _route(request: h11.Request, registry: CollectorRegistry) -> tuple[int, bytes, str]:
    path = request.target.split(b"?", 1)[0]
    if request.method not in (b"GET", b"HEAD"):
        return 405, b"only GET and HEAD\n", "text/plain; charset=utf-8"
    if path == b"/metrics":
        return 200, generate_latest(registry), CONTENT_TYPE_LATEST
    if path in (b"/", b"/healthz"):  # answered by the daemon's trio loop: a liveness signal
        return 200, b"sandboxd: metrics at /metrics\n", "text/plain; charset=utf-8"
    return 404, b"not found; metrics at /metrics\n", "text/plain; charset=utf-8"
