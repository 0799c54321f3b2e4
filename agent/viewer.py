"""A static HTML trajectory viewer: one page per episode and an index, no JavaScript, no server.

Each episode page shows the task, every turn (the model's text, the tool it called, the observation),
the final diff, and the grading (per-test statuses, resolved or the error). Pages are plain files: open
`index.html` in a browser, or publish the directory.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.records import Task, Trajectory

__all__ = ["EpisodeView", "render_episode", "write_viewer"]

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1.5em; color: #1b1f24; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
pre { background: #f6f8fa; padding: .7em; overflow-x: auto; white-space: pre-wrap; word-break: break-word;
      border-radius: 6px; margin: .3em 0; }
.turn { border: 1px solid #d0d7de; border-radius: 8px; margin: 1em 0; padding: .6em 1em; }
.turn h3 { margin: .2em 0; font-size: 1em; }
.model pre { background: #eef6ff; } .obs pre { background: #f6f8fa; }
.tag { display: inline-block; padding: 0 .5em; border-radius: 1em; font-size: .85em; background: #eaeef2; }
.ok { background: #dafbe1; color: #116329; } .bad { background: #ffebe9; color: #a40e26; }
.add { color: #116329; background: #e6ffec; display: block; } .del { color: #a40e26; background: #ffebe9; display: block; }
.hunk { color: #6639ba; display: block; }
table { border-collapse: collapse; } td, th { border: 1px solid #d0d7de; padding: .25em .6em; text-align: left; }
"""


@dataclass
class EpisodeView:
    """What one page shows. `grade` is a GradeReport's dict (or None when not graded)."""

    trajectory: Trajectory
    task: Task | None = None
    grade: Mapping[str, Any] | None = None
    label: str = ""  # e.g. "before training" / "after DAPO"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _diff_html(patch: str) -> str:
    if not patch.strip():
        return "<p><em>No changes.</em></p>"
    lines = []
    for line in patch.splitlines():
        cls = ("add" if line.startswith("+") and not line.startswith("+++") else
               "del" if line.startswith("-") and not line.startswith("---") else
               "hunk" if line.startswith("@@") else "")
        lines.append(f'<span class="{cls}">{_e(line)}</span>' if cls else _e(line))
    return "<pre>" + "\n".join(lines) + "</pre>"


def _grade_html(grade: Mapping[str, Any] | None) -> str:
    if grade is None:
        return "<p><em>Not graded.</em></p>"
    resolved = grade.get("resolved")
    parts = [f'<p><span class="tag {"ok" if resolved else "bad"}">{"resolved" if resolved else "not resolved"}</span>']
    if grade.get("error"):
        parts.append(f' <span class="tag bad">error: {_e(grade["error"])}</span>')
    parts.append("</p>")
    tests = grade.get("tests") or grade.get("test_status") or {}
    if isinstance(tests, Mapping) and tests:
        rows = "".join(f"<tr><td><code>{_e(name)}</code></td><td>{_e(status)}</td></tr>" for name, status in sorted(tests.items()))
        parts.append(f"<table><tr><th>test</th><th>status</th></tr>{rows}</table>")
    rest = {k: v for k, v in grade.items() if k not in ("tests", "test_status", "resolved", "error")}
    if rest:
        parts.append(f"<details><summary>report</summary><pre>{_e(json.dumps(rest, indent=2, default=str))}</pre></details>")
    return "".join(parts)


def render_episode(view: EpisodeView, decode: Any) -> str:
    """HTML for one episode; `decode(ids) -> str` turns token ids back into text (for display only)."""
    traj = view.trajectory
    title = f"{traj.task_id} · {traj.episode_id}"
    head = [f"<h1>{_e(title)}</h1>"]
    if view.label:
        head.append(f'<p><span class="tag">{_e(view.label)}</span></p>')
    reward_cls = "ok" if traj.reward > 0 else "bad"
    head.append(
        f'<p><span class="tag">finish: {_e(traj.finish_reason)}</span> '
        f'<span class="tag {reward_cls}">reward {traj.reward:g}</span> '
        f'<span class="tag">turns {len(traj.turns)}</span> '
        f'<span class="tag">tokens {traj.num_tokens}</span> '
        f'<span class="tag">policy v{traj.policy_version}</span></p>'
    )
    if view.task is not None:
        head.append(f"<h2>Issue</h2><pre>{_e(view.task.problem_statement)}</pre>")
    turns = []
    for i, turn in enumerate(traj.turns, start=1):
        tool = turn.tool or ("format error" if turn.format_error else "none")
        tool_cls = "bad" if turn.format_error else ""
        turns.append(
            f'<div class="turn" id="turn-{i}"><h3>Turn {i} <span class="tag {tool_cls}">{_e(tool)}</span> '
            f'<span class="tag">{len(turn.action_ids)} tokens · {turn.llm_s:.2f} s model · {turn.tool_s:.2f} s tool</span></h3>'
            f'<div class="model"><pre>{_e(decode(turn.action_ids))}</pre></div>'
            + (f'<div class="obs"><pre>{_e(decode(turn.observation_ids))}</pre></div>' if turn.observation_ids else "")
            + "</div>"
        )
    body = "".join(head) + "<h2>Turns</h2>" + ("".join(turns) or "<p><em>No turns.</em></p>")
    body += "<h2>Diff</h2>" + _diff_html(traj.patch) + "<h2>Tests</h2>" + _grade_html(view.grade)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_CSS}</style></head><body><p><a href=\"index.html\">&larr; all episodes</a></p>{body}</body></html>")


def _page_name(traj: Trajectory) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in traj.episode_id)
    return f"episode-{safe}.html"


def write_viewer(out_dir: str | os.PathLike[str], views: Iterable[EpisodeView], decode: Any, *, title: str = "Episodes") -> Path:
    """Write one page per episode and `index.html`; returns the index path. Writes are atomic."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for view in views:
        traj = view.trajectory
        page = _page_name(traj)
        _atomic_write(out / page, render_episode(view, decode))
        resolved = "resolved" if traj.resolved else "not resolved" if traj.resolved is False else "not graded"
        rows.append(f'<tr><td><a href="{_e(page)}">{_e(traj.episode_id)}</a></td><td>{_e(traj.task_id)}</td>'
                    f"<td>{_e(view.label)}</td><td>{_e(traj.finish_reason)}</td><td>{traj.reward:g}</td>"
                    f"<td>{_e(resolved)}</td><td>{len(traj.turns)}</td></tr>")
    index = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
             f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1><table><tr><th>episode</th><th>task</th>"
             f"<th>run</th><th>finish</th><th>reward</th><th>grade</th><th>turns</th></tr>{''.join(rows)}</table></body></html>")
    _atomic_write(out / "index.html", index)
    return out / "index.html"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
