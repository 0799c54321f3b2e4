"""Benchmark of the runtime wire protocol against a JSON-over-HTTP baseline, in one run.

The server runs in its own process (this script with --serve); the client runs here. Measured:
  * small round trips/s and p50/p99 latency, over a Unix socket and TCP, with 1, 64 and 1,024
    concurrent callers on one connection (inline handler; the 64-caller case also with an async handler);
  * upload throughput (MB/s of payload) for 1 MiB and 16 MiB payloads, compressible and random;
  * the baseline: an httpx AsyncClient posting JSON to a minimal h11 server on loopback, 64 callers.

Usage: python bench/wire.py [--seconds 2.0]. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.wire import Router, WireServer, open_client  # noqa: E402

TOKEN = "bench-token"


# --- the servers (run in a child process) ------------------------------------------------------------


def make_router() -> Router:
    router = Router()

    @router.method("echo")
    def echo(ctx, *, data=None):
        return data

    @router.method("echo_async")
    async def echo_async(ctx, *, data=None):
        return data

    @router.method("put")
    def put(ctx, *, data: bytes):
        return len(data)

    return router


async def serve_wire(addresses: list[str]) -> None:
    server = WireServer(make_router(), token=TOKEN)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.serve, addresses)
        print(json.dumps(bound), flush=True)


async def serve_http(port: int) -> None:
    """A minimal keep-alive JSON echo server on h11 (what httpx itself uses underneath)."""
    import h11

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    if not data:
                        return
                    continue
                if isinstance(event, h11.Request):
                    body = b""
                    while True:
                        ev = conn.next_event()
                        if ev is h11.NEED_DATA:
                            conn.receive_data(await stream.receive_some(65536))
                        elif isinstance(ev, h11.Data):
                            body += ev.data
                        elif isinstance(ev, h11.EndOfMessage):
                            break
                    payload = json.dumps({"result": json.loads(body)["data"]}).encode()
                    out = conn.send(h11.Response(status_code=200, headers=[
                        ("content-type", "application/json"), ("content-length", str(len(payload)))]))
                    out += conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
                    await stream.send_all(out)
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            return

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    print(json.dumps(listeners[0].socket.getsockname()[1]), flush=True)
    await trio.serve_listeners(handle, listeners)


# --- measurements -----------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def run_callers(call, callers: int, seconds: float) -> dict:
    """`callers` tasks call `call()` back to back for `seconds`; returns rate and latency."""
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    # Warm up (connection, caches), not timed.
    async with trio.open_nursery() as nursery:
        for _ in range(min(callers, 64)):
            nursery.start_soon(call)

    async def worker() -> None:
        perf = time.perf_counter
        record = latencies.append
        while True:
            t0 = perf()
            if t0 >= stop_at:
                return
            await call()
            record(perf() - t0)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "calls_per_s": round(len(latencies) / elapsed),
        "p50_ms": round(percentile(latencies, 0.50) * 1e3, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1e3, 3),
        "calls": len(latencies),
    }


def start_child(args: list[str]) -> tuple[subprocess.Popen, object]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise RuntimeError(f"server {args} did not start")
    return proc, json.loads(line)


async def bench_wire(address: str, seconds: float, results: dict, label: str) -> None:
    async with open_client(address, token=TOKEN, call_timeout_s=120) as client:
        small = {"data": b"x" * 16}

        async def echo():
            await client.call("echo", small)

        async def echo_async():
            await client.call("echo_async", small)

        for callers in (1, 64, 1024):
            results[f"{label}_c{callers}"] = r = await run_callers(echo, callers, seconds)
            print(f"{label:5s} callers={callers:5d}  {r}", flush=True)
        results[f"{label}_c64_async"] = r = await run_callers(echo_async, 64, seconds)
        print(f"{label:5s} callers=   64 async handler  {r}", flush=True)

        if label == "unix":
            rng_bytes = os.urandom(16 << 20)
            text = (b"2026-11-23 12:00:00 INFO tests/test_io.py::test_roundtrip[case-17] PASSED\n" * 300_000)
            for size_name, size in (("1MiB", 1 << 20), ("16MiB", 16 << 20)):
                for kind, source in (("compressible", text), ("random", rng_bytes)):
                    payload = {"data": bytes(source[:size])}
                    n = 0
                    t0 = time.perf_counter()
                    while time.perf_counter() - t0 < seconds or n < 3:
                        assert await client.call("put", payload) == size
                        n += 1
                    elapsed = time.perf_counter() - t0
                    mbps = round(n * size / elapsed / 1e6, 1)
                    results[f"put_{size_name}_{kind}_MBps"] = mbps
                    print(f"put {size_name:5s} {kind:12s} {mbps} MB/s ({n} calls)", flush=True)


async def bench_http(port: int, seconds: float, results: dict) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        async def echo():
            resp = await client.post("/echo", json={"data": "x" * 16})
            resp.raise_for_status()
            resp.json()

        for callers in (1, 64):
            results[f"http_c{callers}"] = r = await run_callers(echo, callers, seconds)
            print(f"http  callers={callers:5d}  {r}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each measurement")
    parser.add_argument("--serve", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--serve-http", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        trio.run(serve_wire, args.serve)
        return
    if args.serve_http is not None:
        trio.run(serve_http, args.serve_http)
        return

    results: dict = {}
    tmp = tempfile.mkdtemp(prefix="wire-bench-")
    sock = os.path.join(tmp, "wire.sock")
    wire_proc, bound = start_child(["--serve", f"unix:{sock}", "tcp://127.0.0.1:0"])
    http_proc, http_port = start_child(["--serve-http", "0"])
    try:
        trio.run(bench_wire, bound[0], args.seconds, results, "unix")
        trio.run(bench_wire, bound[1], args.seconds, results, "tcp")
        trio.run(bench_http, http_port, args.seconds, results)
    finally:
        for proc in (wire_proc, http_proc):
            proc.terminate()
            proc.wait(10)
    tcp64 = results["tcp_c64"]["calls_per_s"]
    http64 = results["http_c64"]["calls_per_s"]
    summary = {
        "bench": "wire",
        "unix_c64_calls_per_s": results["unix_c64"]["calls_per_s"],
        "unix_c64_p99_ms": results["unix_c64"]["p99_ms"],
        "tcp_c64_calls_per_s": tcp64,
        "tcp_c64_p99_ms": results["tcp_c64"]["p99_ms"],
        "http_c64_calls_per_s": http64,
        "ratio_tcp_vs_http_c64": round(tcp64 / http64, 1),
        "targets": {"c64_calls_per_s": 40000, "c64_p99_ms": 5.0, "ratio_vs_http": 10},
        "details": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
