"""`python -m agent.evaluate`: pass@k estimator, and a run against a fake endpoint on a socket
serving the oracle, with real ns sandboxes, a JSON report and the HTML viewer."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from agent.evaluate import pass_at_k, run_evaluation, summarize


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 5, 3) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    assert summarize({"a": [True, False], "b": [False, False]}, 2) == {"pass@1": 0.25, "pass@2": 0.5}
    with pytest.raises(ValueError):
        pass_at_k(2, 3, 1)


@pytest.mark.skipif(os.geteuid() != 0, reason="ns sandboxes need root")
async def test_evaluate_against_a_fake_endpoint(tmp_path, tiny_tokenizer):
    from agent.fake_llm.server import FakeLLM, open_fake_server
    from agent.oracle import OraclePolicy
    from agent.toy import generate_suite

    tok_dir = tmp_path / "tokenizer"
    tiny_tokenizer.save_pretrained(tok_dir)
    tasks = generate_suite(0, 24, 16, tmp_path / "oracle-view", python="python3")  # what toy:heldout builds
    fake = FakeLLM(OraclePolicy(tasks, tiny_tokenizer), decode=lambda ids: tiny_tokenizer.decode(ids))
    async with open_fake_server(fake) as url:
        args = argparse.Namespace(endpoint=[url], tokenizer=str(tok_dir), model=None, tasks="toy:heldout", k=2,
                                  sandboxd=["local:ns"], token_file=None, out=str(tmp_path / "eval"), limit=3,
                                  concurrency=8, temperature=0.0, max_turns=10, max_context_tokens=8192,
                                  max_turn_tokens=1024, grade_timeout_s=120)
        report = await run_evaluation(args)
    assert report["tasks"] == 3 and report["episodes"] == 6 and report["errors"] == 0
    assert report["pass@1"] == 1.0 and report["pass@2"] == 1.0
    on_disk = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert on_disk["per_task"].keys() == report["per_task"].keys()
    first = next(iter(on_disk["per_task"].values()))["episodes"][0]
    assert first["resolved"] is True and first["grade"]["resolved"] is True and "+" in first["patch"]
    index = (tmp_path / "eval" / "viewer" / "index.html").read_text()
    assert index.count("episode-") >= 6
