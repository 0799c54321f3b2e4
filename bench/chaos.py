"""Chaos run: a learner on the toy suite over 2 sandboxd daemons and 2 policy endpoints while faults hit.

    python bench/chaos.py [--steps 6] [--model DIR] [--out DIR]

Set-up, all on this machine: two `sandboxd serve` daemons (Unix sockets, ns runtime), two policy
endpoints (`python -m learner.serve`, the embedded server on its own, weights pushed through the disk
backend) each behind a fault-injecting HTTP proxy, and `python -m learner.run` (RFT then DAPO) using
all four. The injector, while the learner trains:

- every completion request through a proxy: 10% answered 500, 2% hang (the client's deadline fires),
  2% cut mid-request (connection closed without an answer); weight-sync routes pass untouched;
- 1-3 s after step 1 (during the next step's rollouts): SIGKILL sandboxd A, restart it on the same
  root and socket 3 s later;
- after step 2: fill a sandbox's disk on sandboxd B to its quota, check B still serves others;
- after step 3: SIGKILL the learner, restart it (it resumes from its last checkpoint).

Report (last line, JSON): episodes started / finished / lost / duplicated (from a ledger the learner
writes: bench/_chaos_learner.py), episodes re-run after the learner's kill (the interrupted step's,
by design), steps completed, whether the metrics after the resume continue the ones before (steps
1..N once each, policy version never going back), and the faults injected. lost and duplicated must
be 0. With no trained tiny policy (`--model`), a random tiny model and a synthetic reward are used:
the run is about surviving faults, not about learning.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import h11  # noqa: E402
import httpx  # noqa: E402
import trio  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the fault-injecting proxy -----------------------------------------------------------------


class FaultProxy:
    """HTTP/1.1 proxy to one endpoint; completion requests fail, hang or get cut at the given rates."""

    def __init__(self, backend: str, *, fail: float, hang: float, cut: float, seed: int) -> None:
        self.backend = backend
        self.fail, self.hang, self.cut = fail, hang, cut
        self.rng = random.Random(seed)
        self.counts = {"requests": 0, "failed": 0, "hung": 0, "cut": 0, "forwarded": 0}
        self.client = httpx.AsyncClient(base_url=backend, timeout=600)

    async def serve(self, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = None, b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        conn.receive_data(data)
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                target = request.target.decode()
                if request.method == b"POST" and target.startswith("/v1/completions"):
                    self.counts["requests"] += 1
                    roll = self.rng.random()
                    if roll < self.fail:
                        self.counts["failed"] += 1
                        await self._send(conn, stream, 500, b'{"error": {"message": "chaos: injected failure"}}')
                        conn.start_next_cycle()
                        continue
                    if roll < self.fail + self.hang:
                        self.counts["hung"] += 1
                        await trio.sleep(3600)  # until the client gives up and closes
                        return
                    if roll < self.fail + self.hang + self.cut:
                        self.counts["cut"] += 1
                        return  # closed without an answer
                headers = {k.decode(): v.decode() for k, v in request.headers
                           if k.lower() not in (b"host", b"content-length", b"connection")}
                response = await self.client.request(request.method.decode(), target, content=body, headers=headers)
                self.counts["forwarded"] += 1
                await self._send(conn, stream, response.status_code, response.content,
                                 response.headers.get("content-type", "application/json"))
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError, httpx.HTTPError):
            return
        finally:
            await stream.aclose()

    @staticmethod
    async def _send(conn: h11.Connection, stream: trio.SocketStream, status: int, body: bytes,
                    content_type: str = "application/json") -> None:
        data = conn.send(h11.Response(status_code=status, headers=[("content-type", content_type),
                                                                   ("content-length", str(len(body)))]))
        data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        await stream.send_all(data)


# --- processes ---------------------------------------------------------------------------------


def start_endpoint(model: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen([sys.executable, "-m", "learner.serve", "--model", str(model), "--port", str(port),
                             "--served-model-name", "policy", "--torch-threads", "1", "--max-num-seqs", "32"],
                            cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"policy endpoint on port {port} did not start:\n{log.read_text()[-3000:]}")


def _die_with_parent() -> None:
    from sandboxd import linux

    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGTERM)


def start_learner(config: Path, ledger: Path, log: Path, synthetic: bool) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE", "CHAOS_LEDGER": str(ledger),
           "CHAOS_SYNTHETIC_REWARD": "1" if synthetic else "0"}
    return subprocess.Popen([sys.executable, str(ROOT / "bench" / "_chaos_learner.py"), str(config), "--quiet"],
                            cwd=ROOT, env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent)


def training_steps(metrics: Path) -> list[dict]:
    from learner.metrics import read_metrics

    return [r for r in read_metrics(metrics) if r.get("stage") in ("rft", "dapo")]


async def wait_for_step(metrics: Path, step: int, learner: subprocess.Popen, deadline: float) -> None:
    while not any(r["step"] >= step for r in training_steps(metrics)):
        if learner.poll() is not None:
            raise SystemExit(f"the learner exited ({learner.returncode}) before step {step}")
        if time.monotonic() > deadline:
            raise SystemExit(f"no step {step} before the deadline")
        await trio.sleep(0.2)


async def wait_for_exit(proc: subprocess.Popen, deadline: float) -> int | None:
    while proc.poll() is None and time.monotonic() < deadline:
        await trio.sleep(0.5)
    return proc.poll()


async def fill_disk(address: str) -> dict:
    """Fill one sandbox's disk on the node at `address`; check that the node still serves another one."""
    from sandboxd.client import connect

    async with connect(address) as node:
        async with await node.create("host") as hog:
            filled = await hog.exec(["sh", "-c", "dd if=/dev/zero of=/fill bs=1M count=4096 2>&1; df -k /"],
                                    timeout_s=120)
        async with await node.create("host") as other:
            ok = await other.exec(["sh", "-c", "echo still-serving > /tmp/x && cat /tmp/x"], timeout_s=30)
    return {"dd_exit": filled.exit_code, "no_space": b"No space left" in filled.output,
            "other_sandbox_ok": ok.output.strip() == b"still-serving"}


# --- the report --------------------------------------------------------------------------------


def ledger_report(ledger: Path, killed_pid: int | None, resumed_from_step: int | None) -> dict:
    events = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
    started = [e for e in events if e["event"] == "start"]
    finished = [e for e in events if e["event"] == "finish"]
    by_pid: dict[int, dict[str, list[str]]] = {}
    for e in events:
        by_pid.setdefault(e["pid"], {"start": [], "finish": []})[e["event"]].append(e["episode"])
    duplicated = lost = rerun = interrupted = 0
    for pid, ev in by_pid.items():
        fin = ev["finish"]
        duplicated += len(fin) - len(set(fin))  # one process finished an episode twice
        unfinished = set(ev["start"]) - set(fin)
        if pid == killed_pid:
            interrupted += len(unfinished)  # in flight when the learner was killed
        else:
            lost += len(unfinished)
    if killed_pid is not None:
        later = {e["episode"] for e in finished if e["pid"] != killed_pid}
        earlier = [e for e in finished if e["pid"] == killed_pid]
        for e in earlier:
            if e["episode"] in later:  # finished before the kill, then run again after the resume
                step = _episode_step(e["episode"])
                if step is not None and resumed_from_step is not None and step < resumed_from_step:
                    duplicated += 1  # a step the checkpoint already held ran again: a real duplicate
                else:
                    rerun += 1
        killed_unfinished = set(by_pid.get(killed_pid, {}).get("start", [])) - set(by_pid.get(killed_pid, {}).get("finish", []))
        lost += len([ep for ep in killed_unfinished if ep not in later and _is_rerun_expected(ep, resumed_from_step)])
    return {"episodes_started": len(started), "episodes_finished": len(finished), "lost": lost,
            "duplicated": duplicated, "in_flight_at_learner_kill": interrupted, "rerun_after_resume": rerun,
            "errors": sum(1 for e in finished if e.get("reason") == "error"),
            "retried_attempts": sum(max(0, (e.get("attempts") or 1) - 1) for e in finished)}


def _episode_step(episode_id: str) -> int | None:
    """The loop step of an episode id (``dapo:3:0/1:task/0`` -> 3; eval ids carry no step)."""
    head = episode_id.split("/", 1)[0]
    parts = head.split(":")
    if parts[0] in ("rft", "dapo") and len(parts) >= 2 and parts[1].isdigit():
        return int(parts[1])
    return None


def _is_rerun_expected(episode_id: str, resumed_from_step: int | None) -> bool:
    """An episode in flight at the kill must run again after the resume if its step was not checkpointed."""
    step = _episode_step(episode_id)
    return step is not None and resumed_from_step is not None and step >= resumed_from_step


def metrics_report(metrics: Path) -> dict:
    steps = training_steps(metrics)
    numbers = [r["step"] for r in steps]
    versions = [r.get("policy/version", 0) for r in steps]
    return {"steps_completed": max(numbers, default=0),
            "metrics_continuous": numbers == list(range(1, len(numbers) + 1)),
            "policy_version_monotone": all(a <= b for a, b in zip(versions, versions[1:])),
            "final_policy_version": versions[-1] if versions else 0}


# --- main --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rft-steps", type=int, default=1)
    ap.add_argument("--dapo-steps", type=int, default=5)
    ap.add_argument("--model", default=None, help="HF checkpoint (default: the shipped tiny policy, else a random tiny model)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--fail", type=float, default=0.10)
    ap.add_argument("--hang", type=float, default=0.02)
    ap.add_argument("--cut", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-s", type=float, default=1500)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("chaos runs ns sandboxes: run it as root")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out = Path(args.out or tempfile.mkdtemp(prefix="swe-dapo-chaos-"))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    from learner.config import DEFAULT_MODEL

    model, synthetic = Path(args.model) if args.model else DEFAULT_MODEL, False
    if not (model / "config.json").is_file():
        from learner.tiny import save_model, shared_tokenizer, tiny_model

        tok = shared_tokenizer()
        model = save_model(tiny_model(tok, seed=args.seed, init_std=0.5), tok, out / "random-model")
        synthetic = True
    started = time.monotonic()
    deadline = started + args.timeout_s

    from sandboxd.launch import start_daemon

    daemons = [start_daemon(str(out / f"sandboxd-{n}"), [f"unix:{out}/sandboxd-{n}.sock"], log_level="WARNING",
                            die_with_parent=True, cwd=str(out)) for n in ("a", "b")]
    ports = [_free_port() for _ in range(4)]
    endpoints = [start_endpoint(model, ports[i], out / f"endpoint-{i}.log") for i in range(2)]
    proxies = [FaultProxy(f"http://127.0.0.1:{ports[i]}", fail=args.fail, hang=args.hang, cut=args.cut,
                          seed=args.seed + i) for i in range(2)]
    config = out / "chaos.toml"
    config.write_text(f"""
[run]
out_dir = "{out}/run"
stages = ["rft", "dapo"]
log_level = "WARNING"
checkpoint_every = 1
[model]
path = "{model}"
torch_threads = 1
[tasks]
toy_train = 8
toy_heldout = 4
workdir = "{out}/tasks"
[sandbox]
nodes = ["unix:{out}/sandboxd-a.sock", "unix:{out}/sandboxd-b.sock"]
node_capacity = 8
[rollout]
endpoints = ["http://127.0.0.1:{ports[2]}", "http://127.0.0.1:{ports[3]}"]
model_name = "policy"
push_backend = "disk"
group_size = 2
max_turns = 3
max_context_tokens = 1400
max_turn_tokens = 64
max_episodes = 16
request_timeout_s = 45
[rft]
steps = {args.rft_steps}
batch_tasks = 4
[dapo]
steps = {args.dapo_steps}
batch_groups = 3
max_sample_rounds = 2
[optim]
lr = 0.01
[eval]
samples = 1
max_tasks = 2
viewer_episodes = 0
""")
    ledger = out / "ledger.jsonl"
    metrics = out / "run" / "metrics.jsonl"
    faults: dict = {}
    result: dict = {}

    async def run_all() -> None:
        async with trio.open_nursery() as nursery:
            for proxy, port in zip(proxies, ports[2:]):
                await nursery.start(proxy.serve, port)
            learner = start_learner(config, ledger, out / "learner.log", synthetic)
            try:
                await wait_for_step(metrics, 1, learner, deadline)
                await trio.sleep(random.Random(args.seed + 1).uniform(1.0, 3.0))  # into the next step's rollouts
                daemons[0].kill()
                faults["sandboxd_a_killed_at_step"] = max(r["step"] for r in training_steps(metrics))
                await trio.sleep(3)
                daemons[0] = start_daemon(str(out / "sandboxd-a"), [f"unix:{out}/sandboxd-a.sock"], log_level="WARNING",
                                          die_with_parent=True, cwd=str(out))
                faults["sandboxd_a_restarted"] = True
                await wait_for_step(metrics, 2, learner, deadline)
                with trio.fail_after(300):
                    faults["disk_fill"] = await fill_disk(daemons[1].addresses[0])
                await wait_for_step(metrics, 3, learner, deadline)
                await trio.sleep(random.Random(args.seed).uniform(0.5, 3.0))  # somewhere inside the next step
                from learner import checkpoint as ckpt

                learner.send_signal(signal.SIGKILL)
                learner.wait()
                latest = ckpt.find_latest(out / "run" / "checkpoints")
                result["killed_pid"] = learner.pid
                result["resumed_from_step"] = int(latest.name.split("-")[1]) if latest else 0
                faults["learner_killed_after_checkpoint"] = result["resumed_from_step"]
                learner = start_learner(config, ledger, out / "learner.log", synthetic)
                result["learner_exit"] = await wait_for_exit(learner, deadline)
            finally:
                if learner.poll() is None:
                    learner.kill()
                nursery.cancel_scope.cancel()

    try:
        trio.run(run_all)
    finally:
        for proc in endpoints:
            proc.terminate()
        for d in daemons:
            d.stop()
        for proc in endpoints:
            proc.wait(30)
    report = {"bench": "chaos", **ledger_report(ledger, result.get("killed_pid"), result.get("resumed_from_step")),
              **metrics_report(metrics), "learner_exit": result.get("learner_exit"), "faults": faults,
              "proxies": [p.counts for p in proxies], "synthetic_reward": synthetic,
              "wall_s": round(time.monotonic() - started, 1), "load_avg": os.getloadavg()[0], "out": str(out)}
    report["ok"] = (report["lost"] == 0 and report["duplicated"] == 0 and report["learner_exit"] == 0
                    and report["metrics_continuous"] and report["steps_completed"] == args.rft_steps + args.dapo_steps)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
