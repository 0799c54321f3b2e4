"""The HTML trajectory viewer, rendered by a real headless browser."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from agent.scaffold import ChatFormat, run_episode
from agent.viewer import EpisodeView, write_viewer
from agent.workspace import LocalWorkspace

from .test_scaffold import FIX, ScriptedSampler, make_task

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def dump_dom(url: str, tmp_path) -> str:
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it)")
async def test_viewer_pages_render_in_a_browser(toy_repo, tiny_tokenizer, tmp_path):
    repo, commit = toy_repo
    task = make_task(commit)
    traj = await run_episode(task, LocalWorkspace(repo), ScriptedSampler(tiny_tokenizer, FIX), tiny_tokenizer,
                             ChatFormat.from_tokenizer(tiny_tokenizer), episode_id="g1/0", group_id="g1")
    grade = {"resolved": True, "error": None, "tests": {"tests/test_calc.py::test_add": "PASSED"}}
    index = write_viewer(tmp_path / "viewer", [EpisodeView(traj, task, grade, label="after DAPO <b>")],
                         lambda ids: tiny_tokenizer.decode(ids), title="Held-out episodes")
    dom = dump_dom(index.as_uri(), tmp_path)
    assert "Held-out episodes" in dom and 'href="episode-g1_0.html"' in dom
    assert "after DAPO &lt;b&gt;" in dom  # labels are escaped, not markup
    page = dump_dom((index.parent / "episode-g1_0.html").as_uri(), tmp_path)
    for i in range(1, 5):
        assert f'id="turn-{i}"' in page
    assert "format error" in page and "No tool call found" in page
    assert '<span class="add">+    return a + b</span>' in page
    assert '<span class="del">-    return a - b</span>' in page
    assert "tests/test_calc.py::test_add" in page and "resolved" in page
