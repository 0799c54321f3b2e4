"""The system prompt (tools and call format) and the task prompt (the issue)."""

from __future__ import annotations

from .parsing import TOOL_SPECS

__all__ = ["system_prompt", "task_prompt"]


def _tool_lines() -> str:
    lines = []
    for spec in TOOL_SPECS.values():
        params = ", ".join([*spec.required, *(f"{p} (optional)" for p in spec.optional)]) or "no parameters"
        lines.append(f"- {spec.name}({params}): {spec.description}")
    return "\n".join(lines)


def system_prompt() -> str:
    return f"""You are a software engineer fixing a bug in a Python repository.
Work step by step: look at the code, reproduce the problem, edit the code, check your fix, then submit.

Tools:
{_tool_lines()}

Call exactly one tool per reply, after your reasoning, in this format:
<function=TOOL_NAME>
<parameter=PARAM_NAME>value</parameter>
</function>

Example:
<function=str_replace>
<parameter=path>pkg/util.py</parameter>
<parameter=old>    return a - b</parameter>
<parameter=new>    return a + b</parameter>
</function>"""


def task_prompt(problem_statement: str, workdir: str = "/testbed") -> str:
    return f"""The repository is at {workdir} (your working directory).

<issue>
{problem_statement.strip()}
</issue>

Change the non-test files so that the issue is resolved. Call submit when you are done."""
