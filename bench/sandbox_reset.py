"""Reset cost of the ns runtime on a repository of a few thousand files.

Measures, in one run: restore (every process killed, files back) while a command left a background
process and changed files; fork(snapshot) + destroy; exec of `true`; and, as the peer, a naive reset
by copying the repository (shutil.copytree). Needs root and overlayfs.
Last line: one JSON object.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sandboxd import Limits, open_ns_runtime  # noqa: E402

N_FILES = 3000
ROUNDS = 200


def make_repo(root: str) -> None:
    for i in range(N_FILES):
        d = os.path.join(root, f"pkg{i % 50}", f"sub{i % 7}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"mod{i}.py"), "w") as f:
            f.write(f"def f{i}(x):\n    return x + {i}\n" * 20)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p * len(xs)))] * 1e3, 3)


async def main() -> dict:
    work = tempfile.mkdtemp(prefix="sandbox-reset-")
    try:
        repo = os.path.join(work, "repo")
        make_repo(repo)
        async with open_ns_runtime(os.path.join(work, "state"),
                                   limits=Limits(memory_bytes=1 << 30, pids=512, disk_bytes=256 << 20)) as rt:
            sid = await rt.create("host", repo=repo)
            snap = await rt.snapshot(sid)
            restore, fork, exec_true = [], [], []
            for i in range(ROUNDS):
                await rt.exec(sid, f"echo x >> pkg{i % 50}/sub0/mod{i % 50 * 7}.py; rm -rf pkg{(i + 1) % 50}; "
                                   "(sleep 1000 &) ; echo done")
                t = time.perf_counter()
                await rt.restore(sid, snap)
                restore.append(time.perf_counter() - t)
            check = await rt.exec(sid, "find /testbed -type f | wc -l; cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
            assert check.output.split(b"\n")[0] == str(N_FILES).encode(), check.output
            assert b"sleep" not in check.output, check.output
            for _ in range(ROUNDS):
                t = time.perf_counter()
                await rt.exec(sid, ["true"])
                exec_true.append(time.perf_counter() - t)
            for _ in range(ROUNDS // 4):
                t = time.perf_counter()
                child = await rt.fork(snap)
                fork.append(time.perf_counter() - t)
                await rt.destroy(child)
        copy = []
        for i in range(5):
            t = time.perf_counter()
            shutil.copytree(repo, os.path.join(work, f"copy{i}"))
            copy.append(time.perf_counter() - t)
        return {"bench": "sandbox_reset", "restore_p50_ms": pct(restore, 0.5), "restore_p99_ms": pct(restore, 0.99),
                "fork_p50_ms": pct(fork, 0.5), "fork_p99_ms": pct(fork, 0.99),
                "exec_true_p50_ms": pct(exec_true, 0.5), "exec_true_p99_ms": pct(exec_true, 0.99),
                "copy_reset_p50_ms": round(statistics.median(copy) * 1e3, 3),
                "restore_vs_copy_speedup": round(statistics.median(copy) / statistics.median(restore), 1),
                "files": N_FILES, "rounds": ROUNDS}
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(trio.run(main)))
