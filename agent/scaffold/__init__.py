"""The agent scaffold: prompts, tool-call parsing, tools, token-exact episodes."""

from .chat import ChatFormat, Tokenizer, load_tokenizer
from .episode import (Completion, EpisodeConfig, PromptEncoder, Sampler, build_prompt_ids, build_prompts, render_prompts,
                      run_episode)
from .parsing import STOP_SEQUENCES, TOOL_SPECS, FormatError, ToolCall, parse_tool_call
from .prompts import system_prompt, task_prompt
from .tools import ToolResult, Tools, cap_text

__all__ = [
    "STOP_SEQUENCES",
    "TOOL_SPECS",
    "ChatFormat",
    "Completion",
    "EpisodeConfig",
    "FormatError",
    "PromptEncoder",
    "Sampler",
    "Tokenizer",
    "ToolCall",
    "ToolResult",
    "Tools",
    "build_prompt_ids",
    "build_prompts",
    "cap_text",
    "load_tokenizer",
    "parse_tool_call",
    "render_prompts",
    "run_episode",
    "system_prompt",
    "task_prompt",
]
