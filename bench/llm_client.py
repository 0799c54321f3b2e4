"""Benchmark of the LLM client (agent.llm) against the fake vLLM server in another process, in one run.

The server (``python -m agent.fake_llm``, 32 random tokens per answer, no latency) runs in its own
process; each measurement runs in a process of its own. For 1, 64 and 4,096 concurrent callers (256-token
prompts), each calling as fast as it can for `--seconds`, measured: completions/s, p50/p99 latency and
CPU per request (client and server; the figure that holds on a loaded machine) of

  * naive:   one httpx.AsyncClient with its default pool (100 connections), post + the same validation;
  * sharded: LLMClient(pool="sharded"): httpcore pools of 4 connections, 256 slots per endpoint;
  * lean:    LLMClient(pool="lean"), the default: LeanTransport (trio + h11) under httpx's transport
             interface, 256 slots per endpoint.

Then lean with 4,096 callers and 4,096-token prompts, with and without `return_token_ids` (the server
echoes the prompt's ids back with it: JSON bytes, not HTTP, bound that case).

Usage: python bench/llm_client.py [--seconds 3] [--prompt-tokens 256]. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.llm import LLMClient  # noqa: E402
from agent.llm.protocol import completion_body, parse_completion  # noqa: E402

MODEL = "fake-model"
MAX_TOKENS = 32
TARGET_REQ_S = 1000


def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.fake_llm", "--port", "0", "--length", str(MAX_TOKENS),
         "--vocab-size", "150000", "--model", MODEL],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise SystemExit("the fake server did not start")
    return proc, json.loads(line)["url"]


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (Linux /proc; 0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(call, callers: int, seconds: float, server_pid: int, warmup_s: float) -> None:
    """`callers` tasks calling `call()` in a loop; prints the calls that finish inside the window, exits.

    Closed loop: with 4,096 callers a call's latency (its wait for a slot included) can exceed the
    window, so a call counts by when it finishes. The window is timed and reported from a thread: the
    naive client blocks the event loop for long stretches (each step of httpcore's pool walks its queue
    of 4,096 requests), and tearing it down would take minutes, so the process exits right after
    printing. CPU per request (this process, the server) is the figure that holds on a loaded machine;
    req/s depends on what else runs.
    """
    finished: list[tuple[float, float]] = []  # (start, end) of every call
    errors = [0]
    start = time.perf_counter()
    w0, w1 = start + warmup_s, start + warmup_s + seconds

    def report() -> None:
        time.sleep(max(0.0, w0 - time.perf_counter()))
        cpu0, server0 = time.process_time(), process_cpu_s(server_pid)
        time.sleep(max(0.0, w1 - time.perf_counter()))
        cpu1, server1 = time.process_time(), process_cpu_s(server_pid)
        calls = list(finished)
        latencies = sorted(t1 - t0 for t0, t1 in calls if w0 <= t1 <= w1)
        done = len(latencies)
        print(json.dumps({
            "callers": callers, "req_s": round(done / seconds, 1), "window_s": seconds,
            "first_answer_s": round(min(t1 for _, t1 in calls) - start, 2) if calls else None,
            "p50_ms": round(percentile(latencies, 0.50) * 1e3, 2),
            "p99_ms": round(percentile(latencies, 0.99) * 1e3, 2), "errors": errors[0],
            "client_cpu_us_per_req": round((cpu1 - cpu0) / done * 1e6) if done else None,
            "server_cpu_us_per_req": round((server1 - server0) / done * 1e6) if done else None}), flush=True)
        os._exit(0)

    async def caller() -> None:
        while True:
            t0 = time.perf_counter()
            try:
                await call()
            except Exception:
                errors[0] += 1
                await trio.sleep(0.01)
                continue
            finished.append((t0, time.perf_counter()))

    threading.Thread(target=report, daemon=True).start()
    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(caller)


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(150000) for _ in range(n)]


async def cell(mode: str, url: str, callers: int, seconds: float, warmup_s: float, prompt_tokens: int,
               return_token_ids: bool, server_pid: int) -> None:
    ids = prompt(prompt_tokens, 1)
    if mode == "naive":
        body = completion_body(ids, model=MODEL, max_tokens=MAX_TOKENS, temperature=1.0, top_p=1.0,
                               return_token_ids=return_token_ids)
        client = httpx.AsyncClient(timeout=None)  # the default pool: 100 connections

        async def call() -> None:
            response = await client.post(url + "/v1/completions", content=body,
                                         headers={"content-type": "application/json"})
            response.raise_for_status()
            parse_completion(response.json(), prompt_ids=ids, max_tokens=MAX_TOKENS, endpoint=url)
        await drive(call, callers, seconds, server_pid, warmup_s)
    llm = LLMClient([url], model=MODEL, pool=mode, max_inflight_per_endpoint=256, timeout_s=60.0,
                    return_token_ids=return_token_ids)
    await llm.__aenter__()
    endpoint = llm.assign_endpoint()

    async def call() -> None:
        completion = await llm.complete(ids, max_tokens=MAX_TOKENS, endpoint=endpoint)
        assert len(completion.token_ids) == len(completion.logprobs) == MAX_TOKENS
    await drive(call, callers, seconds, server_pid, warmup_s)


def run_cell(url: str, server_pid: int, mode: str, callers: int, seconds: float, prompt_tokens: int,
             return_token_ids: bool = True) -> dict:
    """One measurement in its own process (which prints one JSON line and exits).

    The naive client gets a longer window with many callers: queued behind its pool, it may not finish
    a single request within a few seconds.
    """
    warmup_s = 1.0 if callers <= 64 else 3.0
    if mode == "naive" and callers > 64:  # its first answers come late: a longer window to count any
        seconds = max(seconds, 10.0)
    cmd = [sys.executable, __file__, "--cell", mode, "--url", url, "--server-pid", str(server_pid),
           "--callers", str(callers), "--seconds", str(seconds), "--warmup", str(warmup_s),
           "--prompt-tokens", str(prompt_tokens)]
    if not return_token_ids:
        cmd.append("--no-return-token-ids")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.kill()
    proc.wait()
    if not line:
        raise SystemExit(f"cell {mode} {callers} printed nothing")
    return json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--callers", default="1,64,4096")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one measurement, print it
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--no-return-token-ids", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        trio.run(cell, args.cell, args.url, int(args.callers), args.seconds, args.warmup, args.prompt_tokens,
                 not args.no_return_token_ids, args.server_pid)
        return

    callers = [int(c) for c in args.callers.split(",")]
    server, url = start_server()
    results: dict[str, dict[str, dict]] = {"naive": {}, "sharded": {}, "lean": {}}

    def show(label: str, r: dict) -> None:
        print(f"{label:52s} {r['req_s']:8.1f} req/s  p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms  "
              f"cpu/req client {r['client_cpu_us_per_req']} us, server {r['server_cpu_us_per_req']} us  "
              f"errors {r['errors']}  first answer {r['first_answer_s']} s", flush=True)

    try:
        for n in callers:
            for mode in ("naive", "sharded", "lean"):
                r = results[mode][str(n)] = run_cell(url, server.pid, mode, n, args.seconds, args.prompt_tokens)
                show(f"{mode} callers={n}", r)
        big = max(callers)
        long_prompt = {}
        for rti in (True, False):
            r = long_prompt[f"return_token_ids={rti}"] = run_cell(url, server.pid, "lean", big, args.seconds, 4096, rti)
            show(f"lean callers={big} prompt=4096 return_token_ids={rti}", r)
    finally:
        server.kill()
        server.wait()
    big = str(max(callers))
    lean, naive, sharded = (results[m][big]["req_s"] for m in ("lean", "naive", "sharded"))
    # A naive client that finished nothing in its window is counted as one request in it: the ratio is
    # then a lower bound.
    naive_floor = max(naive, 1.0 / results["naive"][big]["window_s"])
    print(json.dumps({
        "bench": "llm_client",
        f"lean_{big}_req_s": lean,
        f"naive_{big}_req_s": naive,
        f"sharded_{big}_req_s": sharded,
        f"lean_vs_naive_{big}": round(lean / naive_floor, 1),
        f"sharded_vs_naive_{big}": round(sharded / naive_floor, 1),
        "ratio_is_lower_bound": naive == 0,
        **{f"lean_vs_naive_{n}": round(results["lean"][str(n)]["req_s"] / max(results["naive"][str(n)]["req_s"], 0.1),
                                       1) for n in callers if str(n) != big},
        f"lean_vs_naive_{big}_cpu_per_req": None if not results["naive"][big]["client_cpu_us_per_req"] else round(
            results["naive"][big]["client_cpu_us_per_req"] / results["lean"][big]["client_cpu_us_per_req"], 1),
        f"naive_{big}_first_answer_s": results["naive"][big]["first_answer_s"],
        f"lean_{big}_p99_ms": results["lean"][big]["p99_ms"],
        f"lean_{big}_client_cpu_us_per_req": results["lean"][big]["client_cpu_us_per_req"],
        "target_req_s": TARGET_REQ_S,
        "meets_target": lean >= TARGET_REQ_S,
        "prompt_tokens": args.prompt_tokens,
        "completion_tokens": MAX_TOKENS,
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "details": {**results, "lean_prompt4096": long_prompt},
    }))


if __name__ == "__main__":
    main()
