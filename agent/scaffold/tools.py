"""The agent's tools, run against a `Workspace`: bash, view, str_replace, create, submit.

Every tool answers with an observation string for the model. A tool that runs but fails (text not
found, file exists, non-zero exit) says so in the observation: that is the environment's answer, not
a format error. Observations are capped (head and tail kept) so one `cat` of a huge file cannot blow
the context, and undecodable bytes are replaced rather than crashing the episode.
"""

from __future__ import annotations

import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..workspace import Workspace
from .parsing import ToolCall

__all__ = ["ToolResult", "Tools", "cap_text"]


@dataclass(frozen=True)
class ToolResult:
    observation: str
    submitted: bool = False
    failed: bool = False  # the tool ran and reported a failure (for metrics)


def cap_text(text: str, max_chars: int) -> str:
    """Head and tail of `text` within `max_chars`, with a marker saying how much was left out."""
    if len(text) <= max_chars:
        return text
    head = max_chars // 2
    tail = max_chars - head
    return f"{text[:head]}\n[... {len(text) - max_chars} characters omitted ...]\n{text[-tail:]}"


def _numbered(lines: list[str], first: int) -> str:
    width = len(str(first + len(lines) - 1))
    return "\n".join(f"{i:>{width}}\t{line}" for i, line in enumerate(lines, start=first))


class Tools:
    """Executes parsed tool calls in one workspace."""

    def __init__(self, workspace: Workspace, *, bash_timeout_s: float = 60.0, max_observation_chars: int = 12000,
                 view_max_lines: int = 400) -> None:
        self.workspace = workspace
        self.bash_timeout_s = bash_timeout_s
        self.max_observation_chars = max_observation_chars
        self.view_max_lines = view_max_lines

    async def run(self, call: ToolCall) -> ToolResult:
        return self.capped(await self.handler(call.name)(**call.arguments))

    def handler(self, name: str) -> Callable[..., Awaitable[ToolResult]]:
        """The coroutine function of tool `name` (a parsed call's: `parse_tool_call` checks the name)."""
        return getattr(self, f"_{name}")

    def capped(self, result: ToolResult) -> ToolResult:
        """`result` with its observation capped to `max_observation_chars`."""
        if len(result.observation) <= self.max_observation_chars:
            return result
        return ToolResult(cap_text(result.observation, self.max_observation_chars), result.submitted, result.failed)

    async def _read_text(self, path: str) -> str | None:
        try:
            data = await self.workspace.read_file(path)
        except Exception:  # missing, a directory, refused: callers explain to the model
            return None
        return data.decode("utf-8", errors="replace")

    async def _bash(self, command: str) -> ToolResult:
        if not command.strip():
            return ToolResult("The command is empty.", failed=True)
        res = await self.workspace.exec(command, timeout_s=self.bash_timeout_s, max_output_bytes=4 * self.max_observation_chars)
        out = res.output.decode("utf-8", errors="replace")
        if out and res.exit_code == 0 and not res.timed_out:  # the common case: no notes to add
            return ToolResult(out.strip("\n"))
        notes = []
        if res.timed_out:
            notes.append(f"[command timed out after {self.bash_timeout_s:g} s and was killed]")
        elif res.exit_code != 0:
            notes.append(f"[exit code {res.exit_code}]")
        if not out and not notes:
            notes.append("[no output]")
        return ToolResult("\n".join([out.rstrip("\n"), *notes]).strip("\n"), failed=res.timed_out or res.exit_code != 0)

    async def _view(self, path: str, start_line: int | None = None, end_line: int | None = None) -> ToolResult:
        text = await self._read_text(path)
        if text is None:
            quoted = shlex.quote(path)
            res = await self.workspace.exec(
                f"if [ -d {quoted} ]; then find {quoted} -maxdepth 2 -not -path '*/.git' -not -path '*/.git/*' "
                f"-not -name '__pycache__' -not -path '*/__pycache__/*' | sort | head -n 300; else exit 2; fi",
                timeout_s=30,
            )
            if res.exit_code == 0:
                return ToolResult(res.output.decode("utf-8", errors="replace").rstrip("\n"))
            return ToolResult(f"{path}: no such file or directory.", failed=True)
        lines = text.splitlines()
        first = 1 if start_line is None else start_line
        last = len(lines) if end_line is None else end_line
        if first < 1 or last < first:
            return ToolResult(f"Invalid line range {first}-{last} (the file has {len(lines)} lines).", failed=True)
        shown = lines[first - 1 : last]
        note = ""
        if len(shown) > self.view_max_lines:
            shown = shown[: self.view_max_lines]
            note = f"\n[showing lines {first}-{first + len(shown) - 1} of {len(lines)}; use start_line/end_line for more]"
        if not shown:
            return ToolResult(f"{path} has {len(lines)} lines; nothing in {first}-{last}.", failed=True)
        return ToolResult(_numbered(shown, first) + note)

    async def _str_replace(self, path: str, old: str, new: str) -> ToolResult:
        text = await self._read_text(path)
        if text is None:
            return ToolResult(f"{path}: no such file. Use create for new files.", failed=True)
        if not old:
            return ToolResult("old must not be empty.", failed=True)
        count = text.count(old)
        if count == 0:
            return ToolResult(f"No exact match of old in {path}. View the file and copy the text exactly, "
                              "including indentation.", failed=True)
        if count > 1:
            starts = []
            pos = text.find(old)
            while pos != -1:
                starts.append(text.count("\n", 0, pos) + 1)
                pos = text.find(old, pos + 1)
            return ToolResult(f"old occurs {count} times in {path} (lines {', '.join(map(str, starts))}); "
                              "include more surrounding lines to make it unique.", failed=True)
        updated = text.replace(old, new, 1)
        await self.workspace.write_file(path, updated.encode("utf-8"))
        line = text.count("\n", 0, text.find(old)) + 1
        lines = updated.splitlines()
        lo = max(1, line - 3)
        hi = min(len(lines), line + new.count("\n") + 3)
        return ToolResult(f"Edited {path}. Lines {lo}-{hi} now read:\n" + _numbered(lines[lo - 1 : hi], lo))

    async def _create(self, path: str, content: str) -> ToolResult:
        if await self._read_text(path) is not None:
            return ToolResult(f"{path} already exists. Use str_replace to change it.", failed=True)
        if not content.endswith("\n"):
            content += "\n"
        await self.workspace.write_file(path, content.encode("utf-8"))
        return ToolResult(f"Created {path} ({content.count(chr(10))} lines).")

    async def _submit(self) -> ToolResult:
        return ToolResult("Submitted.", submitted=True)
