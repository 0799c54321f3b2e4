"""`python -m agent.grade`: a predictions file graded in sandboxes, reported like the harness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.grade import load_predictions
from agent.toy import generate_suite

ROOT = Path(__file__).resolve().parents[2]


def test_bad_predictions_name_the_line_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"instance_id": "a", "model_patch": ""}\n{"instance_id": 5}\n')
    with pytest.raises(SystemExit, match=r"p.jsonl:2: instance_id"):
        load_predictions(path)
    path.write_text('{"instance_id": "a", "model_patch": 3}\n')
    with pytest.raises(SystemExit, match=r"p.jsonl:1: model_patch"):
        load_predictions(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="ns sandboxes need root")
def test_grade_a_predictions_file(tmp_path):
    tasks = generate_suite(9, 3, 0, tmp_path / "suite", python="python3")
    preds = [{"instance_id": tasks[0].id, "model_patch": tasks[0].gold_patch, "model_name_or_path": "gold"},
             {"instance_id": tasks[1].id, "model_patch": ""},
             {"instance_id": tasks[2].id, "model_patch": "diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n-nope\n+still nope\n"}]
    pred_path = tmp_path / "preds.jsonl"
    pred_path.write_text("".join(json.dumps(p) + "\n" for p in preds))
    out = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "agent.grade", str(pred_path), "--tasks", str(tmp_path / "suite" / "tasks.jsonl"),
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["resolved_ids"] == [tasks[0].id]
    assert report["empty_patch_ids"] == [tasks[1].id]
    assert report["error_ids"] == [tasks[2].id] and report["instances"][tasks[2].id]["error"] == "patch_failed"
    assert json.loads(result.stdout.splitlines()[-1])["resolved_instances"] == 1
