"""`python -m agent.grade predictions.jsonl --tasks tasks.jsonl`: grade a predictions file in sandboxes.

Predictions are SWE-bench's format, one JSON object per line (or a JSON list): ``instance_id``,
``model_patch`` (and optionally ``model_name_or_path``). Each prediction is graded in a fresh sandbox of
its task (`agent.grading.grade`: the harness's apply chain, test-patch reset and apply, tests between
markers, the task's log parser, the resolved rule). The report is written like the official harness's:
totals and the id lists ``resolved_ids``, ``unresolved_ids``, ``error_ids``, ``empty_patch_ids``, plus
every instance's grade. Writes are atomic; a bad prediction line names its line number and field.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

__all__ = ["grade_predictions", "load_predictions", "load_task_file", "main"]


def load_task_file(path: str | os.PathLike[str]) -> list[Any]:
    """Tasks from a dataset file (`agent.tasks.load_tasks`), or a jsonl of this project's own `Task`
    records (what `agent.toy.generate_suite` writes to ``tasks.jsonl``)."""
    from runtime.records import Task

    from .tasks import load_tasks

    p = Path(path)
    if p.suffix == ".jsonl" and p.is_file():
        with open(p, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        try:
            row = json.loads(first) if first else {}
        except json.JSONDecodeError:
            row = {}
        if isinstance(row, dict) and {"id", "test_command", "log_parser", "version"} <= row.keys():
            return [Task.from_dict(json.loads(line)) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return list(load_tasks(path))


def load_predictions(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """instance_id -> prediction; errors name the line and the field."""
    text = Path(path).read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        rows = json.loads(text)
        numbered = list(enumerate(rows, start=1))
    else:
        numbered = []
        for no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    numbered.append((no, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise SystemExit(f"{path}:{no}: not JSON ({exc.msg})") from None
    out: dict[str, dict[str, Any]] = {}
    for no, row in numbered:
        if not isinstance(row, dict):
            raise SystemExit(f"{path}:{no}: expected an object with instance_id and model_patch")
        iid = row.get("instance_id")
        if not isinstance(iid, str) or not iid:
            raise SystemExit(f"{path}:{no}: instance_id: expected a non-empty string, got {iid!r}")
        patch = row.get("model_patch")
        if patch is None:
            patch = ""
        if not isinstance(patch, str):
            raise SystemExit(f"{path}:{no}: model_patch: expected a string, got {type(patch).__name__}")
        if iid in out:
            raise SystemExit(f"{path}:{no}: instance_id {iid!r} appears twice")
        out[iid] = {**row, "model_patch": patch}
    return out


async def grade_predictions(predictions: dict[str, dict[str, Any]], tasks: Sequence[Any], *, sandboxd: str,
                            token: str | None = None, concurrency: int = 4, timeout_s: float = 1800.0) -> dict[str, Any]:
    from sandboxd.client import connect, open_local

    from .grading import grade
    from .scheduler import task_checkout

    by_id = {t.id: t for t in tasks}
    unknown = sorted(set(predictions) - set(by_id))
    if unknown:
        raise SystemExit(f"predictions for unknown instance ids: {', '.join(unknown[:5])}" + (" ..." if len(unknown) > 5 else ""))
    results: dict[str, dict[str, Any]] = {}
    limiter = trio.CapacityLimiter(concurrency)
    async with AsyncExitStack() as stack:
        if sandboxd.startswith("local:"):
            node = await stack.enter_async_context(open_local(sandboxd.split(":", 1)[1]))
        else:
            node = await stack.enter_async_context(connect(sandboxd, token=token))

        async def one(iid: str) -> None:
            task, patch = by_id[iid], predictions[iid]["model_patch"]
            async with limiter:
                if not patch.strip():
                    results[iid] = {"resolved": False, "error": "empty_patch"}
                    return
                try:
                    async with node.open(task.image, repo=task_checkout(task)) as sb:
                        report = await grade(task, patch, sb, timeout_s=timeout_s)
                    results[iid] = report.to_dict()
                except Exception as exc:  # the node failed: this instance is an error, the run goes on
                    results[iid] = {"resolved": False, "error": "workspace_error", "reason": f"{type(exc).__name__}: {exc}"}

        async with trio.open_nursery() as nursery:
            for iid in predictions:
                nursery.start_soon(one, iid)
    ids = sorted(results)
    empty = [i for i in ids if results[i].get("error") == "empty_patch"]
    errors = [i for i in ids if results[i].get("error") and i not in empty]
    resolved = [i for i in ids if results[i].get("resolved")]
    return {
        "total_instances": len(tasks),
        "submitted_instances": len(predictions),
        "completed_instances": len(ids) - len(errors) - len(empty),
        "resolved_instances": len(resolved),
        "unresolved_instances": len(ids) - len(resolved) - len(errors) - len(empty),
        "empty_patch_instances": len(empty),
        "error_instances": len(errors),
        "resolved_ids": resolved,
        "unresolved_ids": [i for i in ids if i not in resolved and i not in errors and i not in empty],
        "empty_patch_ids": empty,
        "error_ids": errors,
        "instances": results,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agent.grade", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", help="SWE-bench predictions file (jsonl or json): instance_id, model_patch")
    parser.add_argument("--tasks", required=True, help="task file (jsonl/json/parquet/save_to_disk)")
    parser.add_argument("--sandboxd", default="local:ns", help="sandboxd address, or local:ns|podman|dir (default)")
    parser.add_argument("--token-file", help="sandboxd token file for tcp:// addresses")
    parser.add_argument("--out", default=None, help="report path (default: <predictions>.report.json)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="test run timeout per instance")
    args = parser.parse_args(argv)
    predictions = load_predictions(args.predictions)
    tasks = load_task_file(args.tasks)
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    report = trio.run(lambda: grade_predictions(predictions, tasks, sandboxd=args.sandboxd, token=token,
                                                concurrency=args.concurrency, timeout_s=args.timeout_s))
    out = Path(args.out or f"{args.predictions}.report.json")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, out)
    summary = {k: v for k, v in report.items() if not k.endswith("_ids") and k != "instances"}
    print(f"report: {out}", file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
