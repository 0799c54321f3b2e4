"""Tool calls parsed out of the model's text. Pure: strings in, `ToolCall` or `FormatError` out.

Two formats are accepted; the first is the documented one the system prompt teaches:

1. Function blocks (as in OpenHands' and SWE-agent's text tool calling), robust for multi-line code
   because nothing is escaped::

       <function=str_replace>
       <parameter=path>pkg/util.py</parameter>
       <parameter=old>    return a - b</parameter>
       <parameter=new>    return a + b</parameter>
       </function>

   A parameter's value is everything between its tags; one leading and one trailing newline are
   dropped so that values may sit on their own lines.

2. Qwen/Hermes JSON tool calls, as Qwen2.5 emits them::

       <tool_call>
       {"name": "bash", "arguments": {"command": "ls"}}
       </tool_call>

One call per turn: the first complete call is taken and text after it is ignored (the model is
stopped at ``</function>`` / ``</tool_call>``). A response with no complete call, an unknown tool,
a missing or unknown argument raises `FormatError`, whose message is the corrective observation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["STOP_SEQUENCES", "TOOL_SPECS", "FormatError", "ToolCall", "ToolSpec", "parse_tool_call"]


@dataclass(frozen=True)
class ToolSpec:
    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    description: str = ""
    int_params: tuple[str, ...] = ()


TOOL_SPECS: dict[str, ToolSpec] = {
    spec.name: spec
    for spec in (
        ToolSpec("bash", ("command",), description="Run a shell command in the repository (non-interactive)."),
        ToolSpec("view", ("path",), ("start_line", "end_line"),
                 "Show a file with line numbers (optionally a line range), or list a directory.",
                 int_params=("start_line", "end_line")),
        ToolSpec("str_replace", ("path", "old", "new"), description="Replace the one exact occurrence of `old` in a file by `new`."),
        ToolSpec("create", ("path", "content"), description="Create a new file with the given content."),
        ToolSpec("submit", (), description="Finish: your changes to the repository are the answer."),
    )
}

STOP_SEQUENCES = ("</function>", "</tool_call>")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    format: str = "function"  # "function" | "hermes"


class FormatError(ValueError):
    """The response holds no valid tool call. `str(exc)` is the observation that tells the model why."""


_FUNCTION = re.compile(r"<function=([^>\s]*)>(.*?)</function>", re.DOTALL)
_FUNCTION_OPEN = re.compile(r"<function=([^>\s]*)>(.*)", re.DOTALL)
_PARAM = re.compile(r"<parameter=([^>\s]*)>(.*?)</parameter>", re.DOTALL)
_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_HERMES_OPEN = re.compile(r"<tool_call>(.*)", re.DOTALL)

_EXAMPLE = "<function=bash>\n<parameter=command>ls</parameter>\n</function>"


def _strip_one_newline(value: str) -> str:
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def _check(name: str, arguments: dict[str, Any], fmt: str) -> ToolCall:
    spec = TOOL_SPECS.get(name)
    if spec is None:
        raise FormatError(f"Unknown tool {name!r}. Available tools: {', '.join(TOOL_SPECS)}.")
    for key in arguments:
        if key not in spec.required and key not in spec.optional:
            allowed = ", ".join(spec.required + spec.optional) or "none"
            raise FormatError(f"Tool {name!r} has no parameter {key!r} (parameters: {allowed}).")
    if len(arguments) < len(spec.required) or not all(key in arguments for key in spec.required):
        missing = [key for key in spec.required if key not in arguments]
        raise FormatError(f"Tool {name!r} is missing the parameter {missing[0]!r}.")
    for key in spec.int_params:
        if key in arguments:
            value = arguments[key]
            try:
                arguments[key] = int(str(value).strip())
            except ValueError:
                raise FormatError(f"Parameter {key!r} of {name!r} must be a whole number, got {value!r}.") from None
    if fmt != "function":  # function-block values are str already; JSON ones may be anything
        for key, value in arguments.items():
            if key not in spec.int_params and not isinstance(value, str):
                arguments[key] = json.dumps(value)
    return ToolCall(name, arguments, fmt)


def _parse_function(match: re.Match[str]) -> ToolCall:
    name, body = match.group(1), match.group(2)
    arguments: dict[str, Any] = {}
    for param in _PARAM.finditer(body):
        key = param.group(1)
        if key in arguments:
            raise FormatError(f"Parameter {key!r} is given twice.")
        arguments[key] = _strip_one_newline(param.group(2))
    # Every complete parameter holds at least one "<parameter=": as many in all means none is left
    # open (the common case, without a second pass over the body).
    if body.count("<parameter=") != len(arguments) and "<parameter=" in _PARAM.sub("", body):
        raise FormatError("A <parameter=...> tag is not closed with </parameter>.")
    return _check(name, arguments, "function")


def _parse_hermes(match: re.Match[str]) -> ToolCall:
    try:
        payload = json.loads(match.group(1))
    except json.JSONDecodeError as exc:
        raise FormatError(f"The <tool_call> body is not valid JSON ({exc.msg} at position {exc.pos}).") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        raise FormatError('A <tool_call> must hold {"name": ..., "arguments": {...}}.')
    arguments = payload.get("arguments", {})
    if isinstance(arguments, str):  # some models double-encode
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise FormatError("The tool call's \"arguments\" must be a JSON object.") from None
    if not isinstance(arguments, dict):
        raise FormatError("The tool call's \"arguments\" must be a JSON object.")
    return _check(payload["name"], dict(arguments), "hermes")


def parse_tool_call(text: str) -> ToolCall:
    """The first complete tool call in `text`. A call cut off by the stop sequence is completed.

    vLLM leaves the stop string out of the returned text unless asked to include it, so a text ending
    inside an open ``<function=...>`` or ``<tool_call>`` block is treated as closed at its end.
    """
    # Each pattern starts with its literal tag: a text without the tag cannot match it (a substring
    # test costs a fraction of a regex search, and most texts hold only one of the two formats).
    function_at = text.find("<function=")
    hermes_at = text.find("<tool_call>")
    candidates: list[tuple[int, re.Match[str], str]] = []
    for at, pattern, kind in ((function_at, _FUNCTION, "function"), (hermes_at, _HERMES, "hermes")):
        match = pattern.search(text, at) if at >= 0 else None
        if match:
            candidates.append((match.start(), match, kind))
    if not candidates:
        for at, pattern, kind in ((function_at, _FUNCTION_OPEN, "function"), (hermes_at, _HERMES_OPEN, "hermes")):
            match = pattern.search(text, at) if at >= 0 else None
            if match:
                candidates.append((match.start(), match, kind))
    if not candidates:
        raise FormatError(
            "No tool call found. Reply with your reasoning, then exactly one tool call, for example:\n" + _EXAMPLE
        )
    _, match, kind = min(candidates, key=_first) if len(candidates) > 1 else candidates[0]
    return _parse_function(match) if kind == "function" else _parse_hermes(match)


def _first(candidate: tuple[int, Any, str]) -> int:
    return candidate[0]
