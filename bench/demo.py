"""The embedded default across seeds: held-out solve rate before training, after RFT, after RFT + DAPO.

    python bench/demo.py [--seeds 0 1 2] [--rewards execution similarity] [--config learner/configs/demo.toml]
                         [--jobs 2]

Runs `python -m learner.run CONFIG run.seed=S reward.kind=R` for every seed and reward (each in its
own output directory, fresh), reads each run's ``summary.json`` and prints a table and, last, one JSON
line: per reward kind the mean and spread (min, max, population std) of the three solve rates, the
gain of DAPO over the baseline and over RFT alone, and whether the targets hold (DAPO >= baseline +
20 points and DAPO > RFT, on the mean across seeds). The SWE-RL similarity reward runs the same
config with ``reward.kind = "similarity"``; its solve rates are still measured by execution.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learner.config import DEFAULT_CONFIG  # noqa: E402


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rewards", nargs="+", default=["execution", "similarity"], choices=["execution", "similarity"])
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--out", default="runs/bench-demo")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once (each gets cpu_count / jobs torch threads); wall times then overlap")
    ap.add_argument("overrides", nargs="*", help="extra section.key=value for every run")
    args = ap.parse_args()
    jobs = max(1, args.jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pending = [(reward, seed) for reward in args.rewards for seed in args.seeds]
    running: list[tuple[str, int, Path, list[str], float, subprocess.Popen]] = []
    rows_by_run: dict[tuple[str, int], dict] = {}
    while pending or running:
        while pending and len(running) < jobs:
            reward, seed = pending.pop(0)
            out = Path(args.out) / f"{reward}-seed{seed}"
            argv = [sys.executable, "-m", "learner.run", args.config,
                    f"run.seed={seed}", f"reward.kind={reward}", f"run.out_dir={out}",
                    f"model.torch_threads={threads}", *args.overrides, "--fresh", "--quiet"]
            Path(args.out).mkdir(parents=True, exist_ok=True)
            log = open(Path(args.out) / f"{reward}-seed{seed}.log", "w")  # the run's stderr
            proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
                                    stdout=subprocess.DEVNULL, stderr=log, text=True)
            log.close()  # the child has its own descriptor
            running.append((reward, seed, out, argv, time.monotonic(), proc))
        time.sleep(1.0)
        for item in list(running):
            reward, seed, out, argv, started, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                for *_, other in running:
                    other.terminate()
                log = (Path(args.out) / f"{reward}-seed{seed}.log").read_text()[-3000:]
                raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{log}")
            summary = json.loads((out / "summary.json").read_text())
            row = {"seed": seed, "before": summary.get("before"), "rft": summary.get("rft_eval_solve_rate"),
                   "dapo": summary.get("after"), "wall_s": round(time.monotonic() - started, 1)}
            rows_by_run[(reward, seed)] = row
            print(f"{reward:10s} seed {seed}: before {row['before']:.1%}  after RFT {row['rft']:.1%}  "
                  f"after DAPO {row['dapo']:.1%}  ({row['wall_s']:.0f} s)", file=sys.stderr)
    runs: dict[str, list[dict]] = {}
    for reward in args.rewards:
        runs[reward] = [rows_by_run[(reward, seed)] for seed in args.seeds]
    report: dict = {"bench": "demo", "seeds": args.seeds, "config": args.config, "jobs": jobs,
                    "load_avg": os.getloadavg()[0]}
    for reward, rows in runs.items():
        stats = {k: _spread([r[k] for r in rows]) for k in ("before", "rft", "dapo")}
        gain = stats["dapo"]["mean"] - stats["before"]["mean"]
        report[reward] = {**stats, "dapo_minus_before": gain, "dapo_minus_rft": stats["dapo"]["mean"] - stats["rft"]["mean"],
                          "ok": gain >= 0.20 and stats["dapo"]["mean"] > stats["rft"]["mean"],
                          "wall_s_mean": statistics.fmean(r["wall_s"] for r in rows), "runs": rows}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
