"""Operations of `sandboxd serve`: Prometheus /metrics that move with the calls a client makes, and
structured (JSON) logs that carry the sandbox, the method and the error code, refusals included."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from runtime.wire import NotFound, Unauthorized
from sandboxd import logs
from sandboxd.client import connect
from sandboxd.metrics import BOUNDS_MS, CallStats, LatencyHistogram, daemon_registry, parse_http_listen, serve_metrics

from .conftest import needs_root

TOKEN = "metrics-test-token"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}, through the reference parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(snapshot: dict, name: str, **labels: str) -> float:
    return snapshot.get((name, tuple(sorted(labels.items()))), 0.0)


# -- pure parts --------------------------------------------------------------------------------------


def test_histogram_buckets_are_cumulative_seconds_with_inf():
    h = LatencyHistogram()
    for ms in (0.1, 0.25, 0.3, 5.0, 10_000_000.0):
        h.observe(ms)
    buckets = dict(h.cumulative_seconds())
    assert buckets["0.00025"] == 2  # le is inclusive: 0.25 ms lands in the 0.25 ms bucket
    assert buckets["0.0005"] == 3
    assert buckets[repr(BOUNDS_MS[-1] / 1e3)] == 4  # 10,000 s is past the last bound
    assert buckets["+Inf"] == 5 == h.total
    assert h.quantile(0.5) == 0.5


def test_parse_http_listen():
    assert parse_http_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_http_listen("[::1]:0") == ("::1", 0)
    assert parse_http_listen("http://0.0.0.0:9464/") == ("0.0.0.0", 9464)
    for bad in ("9464", "host:", ":9464", "host:99999", "host:port"):
        with pytest.raises(ValueError, match="--metrics-listen"):
            parse_http_listen(bad)


class _FakeWire:
    connections = 3
    counters = {"connections_total": 7, "calls": 40, "errors.unauthorized": 2, "protocol_errors": 2}


async def test_metrics_listener_serves_the_registry_and_only_it():
    calls = CallStats()
    calls.record("sandbox.exec", "ok", 1.0)
    calls.record("sandbox.exec", "not_found", 0.2)
    calls.record("sandbox.create", "ok", 30.0)
    registry = daemon_registry(calls, wire=_FakeWire(), runtime_stats=lambda: {"sandboxes": 5, "zygote_embryos": 4},
                               state_dir="/", runtime_name="ns")
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_metrics, "127.0.0.1:0", registry)

        def get(target: str, method: str = "GET") -> tuple[int, str, bytes]:
            req = urllib.request.Request(url.replace("/metrics", target), method=method)
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return resp.status, resp.headers["content-type"], resp.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.headers["content-type"], exc.read()

        status, ctype, body = await trio.to_thread.run_sync(get, "/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=")
        snap = samples(body.decode())
        assert value(snap, "sandboxd_call_duration_seconds_count", method="sandbox.exec") == 2
        assert value(snap, "sandboxd_calls_total", method="sandbox.exec", code="not_found") == 1
        assert value(snap, "sandboxd_sandboxes_created_total", via="create") == 1
        assert value(snap, "sandboxd_wire_connections_open") == 3
        assert value(snap, "sandboxd_wire_errors_total", code="unauthorized") == 2
        assert value(snap, "sandboxd_sandboxes") == 5 and value(snap, "sandboxd_zygote_embryos") == 4
        assert value(snap, "sandboxd_state_free_bytes") > 0
        assert value(snap, "process_open_fds") > 0
        assert (await trio.to_thread.run_sync(get, "/healthz"))[0] == 200
        assert (await trio.to_thread.run_sync(get, "/nope"))[0] == 404
        assert (await trio.to_thread.run_sync(get, "/metrics", "POST"))[0] == 405
        status, _, body = await trio.to_thread.run_sync(get, "/metrics", "HEAD")
        assert status == 200 and body == b""
        # A client that connects and says nothing does not stop the next scrape.
        idle = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0]))
        assert (await trio.to_thread.run_sync(get, "/metrics"))[0] == 200
        await idle.aclose()
        nursery.cancel_scope.cancel()


def test_json_log_lines_carry_fields_and_wire_codes():
    stream = io.StringIO()
    logs.configure("DEBUG", "json", stream)
    try:
        log = logging.getLogger("sandboxd.test")
        log.info("sandbox %s created", "sb-1", extra={"sandbox": "sb-1", "method": "sandbox.create", "peer": "unix"})
        logging.getLogger("swe_dapo.wire").warning("refused connection from %s: %s: %s", "1.2.3.4:5", "busy", "full")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("it broke", extra={"code": "internal", "data": b"\xff"})
    finally:
        logs.configure("WARNING", "text")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 3
    first, refused, broke = lines
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert {k: first[k] for k in ("level", "logger", "message", "sandbox", "method", "peer")} == {
        "level": "INFO", "logger": "sandboxd.test", "message": "sandbox sb-1 created", "sandbox": "sb-1",
        "method": "sandbox.create", "peer": "unix"}
    assert refused["code"] == "busy" and refused["level"] == "WARNING"
    assert broke["code"] == "internal" and "RuntimeError: boom" in broke["exc"] and broke["data"] == "\ufffd"


def test_log_format_is_checked():
    with pytest.raises(ValueError, match="log format"):
        logs.configure("INFO", "yaml")


# -- a real daemon -----------------------------------------------------------------------------------


def start_daemon(tmp_path, *extra: str) -> tuple[subprocess.Popen, list[str], str, str]:
    """`sandboxd serve` with metrics and JSON logs; returns (proc, addresses, metrics url, log path)."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    log_path = str(tmp_path / "daemon.log")
    log_file = open(log_path, "w")  # a file, not a pipe: a chatty daemon never blocks on it
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandboxd", "serve", "--root", str(tmp_path / "root"),
         "--listen", f"unix:{tmp_path / 'd.sock'}", "--listen", "tcp://127.0.0.1:0", "--token-file", str(token_file),
         "--metrics-listen", "127.0.0.1:0", "--log-format", "json", "--log-level", "INFO", *extra],
        stderr=log_file, stdout=subprocess.DEVNULL,
    )
    log_file.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        text = open(log_path).read()
        serving = re.search(r"^sandboxd: serving on (.*)$", text, re.M)
        metrics = re.search(r"^sandboxd: metrics on (\S+)$", text, re.M)
        if serving and metrics:
            return proc, serving.group(1).split(), metrics.group(1), log_path
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"daemon did not start: {open(log_path).read()}")


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return samples(resp.read().decode())


@needs_root
async def test_metrics_and_logs_of_a_real_daemon_move_with_its_calls(tmp_path):
    proc, (unix, tcp), url, log_path = start_daemon(tmp_path)
    try:
        before = scrape(url)
        assert value(before, "sandboxd_sandboxes") == 0
        assert value(before, "sandboxd_info", runtime="ns") == 1
        assert value(before, "process_resident_memory_bytes") > 0
        async with connect(unix, token=TOKEN) as node:
            async with node.open("host") as sb:
                for _ in range(3):
                    assert (await sb.exec("true", timeout_s=30)).exit_code == 0
                snap = await sb.snapshot()
                await sb.restore(snap)
                during = scrape(url)
                async with node.attach((await node.fork(snap)).id) as child:
                    await child.exec("true", timeout_s=30)
                sandbox_id = sb.id
            with pytest.raises(NotFound):
                await node.attach("sb-nope").exec("true")
        async with connect(tcp, token="wrong", connect_timeout_s=5) as bad:
            with pytest.raises(Unauthorized):
                await bad.stats()
        after = scrape(url)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    assert rc == 0

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert value(during, "sandboxd_sandboxes") == 1 and value(after, "sandboxd_sandboxes") == 0
    assert delta("sandboxd_sandboxes_created_total", via="create") == 1
    assert delta("sandboxd_sandboxes_created_total", via="fork") == 1
    assert delta("sandboxd_forks_total") == 1
    assert delta("sandboxd_sandboxes_destroyed_total") == 2
    assert delta("sandboxd_restores_total") == 1 and delta("sandboxd_snapshots_taken_total") == 1
    assert delta("sandboxd_call_duration_seconds_count", method="sandbox.exec") == 5  # 3 + 1 + the failed one
    assert delta("sandboxd_call_duration_seconds_bucket", method="sandbox.exec", le="+Inf") == 5
    assert delta("sandboxd_call_duration_seconds_sum", method="sandbox.exec") > 0
    assert delta("sandboxd_calls_total", method="sandbox.exec", code="ok") == 4
    assert delta("sandboxd_calls_total", method="sandbox.exec", code="not_found") == 1
    assert delta("sandboxd_wire_errors_total", code="not_found") == 1
    assert delta("sandboxd_wire_errors_total", code="unauthorized") == 1
    assert delta("sandboxd_wire_refused_total", code="unauthorized") == 1
    assert delta("sandboxd_wire_connections_total") >= 2
    assert value(during, "sandboxd_wire_connections_open") >= 1
    assert "sandboxd_zygote_embryos" in {name for name, _ in after}

    lines = [line for line in open(log_path).read().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]  # every structured line is one JSON object
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    created = [r for r in records if r.get("method") == "sandbox.create"]
    assert created and created[0]["sandbox"] == sandbox_id and created[0]["peer"] == "unix"
    missing = [r for r in records if r.get("code") == "not_found"]
    assert missing and missing[0]["method"] == "sandbox.exec" and missing[0]["sandbox"] == "sb-nope"
    refused = [r for r in records if r.get("code") == "unauthorized"]
    assert refused and "127.0.0.1" in refused[0]["message"]


def test_bad_metrics_listen_is_refused_before_start(tmp_path):
    res = subprocess.run([sys.executable, "-m", "sandboxd", "serve", "--root", str(tmp_path / "r"),
                          "--listen", f"unix:{tmp_path / 's'}", "--metrics-listen", "9464"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--metrics-listen '9464'" in res.stderr
    assert not os.path.exists(tmp_path / "r")
