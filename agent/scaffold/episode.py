"""One episode: prompt once, then turns of (model tokens, tool, observation tokens) until a finish.

The loop reads top to bottom (in the manner of mini-swe-agent): `run_episode` repeats `_step` until the
model submits or a limit is hit. The episode is token ids from start to end: the prompt is rendered by
the chat template once, every turn appends exactly the ids the sampler returned (trained) and the ids of
the observation (masked), so the learner trains on precisely what the model produced and saw.

Errors of the infrastructure (a lost sandbox node, a dead endpoint) propagate: the scheduler requeues
the episode from its start. Errors of the model (no parsable call, a tool that fails) become
observations and the episode goes on.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from runtime.records import FinishReason, Task, Trajectory, Turn

from ..llm.errors import ContextOverflow
from ..workspace import Workspace
from .chat import ChatFormat, TextCodec, Tokenizer
from .parsing import STOP_SEQUENCES, FormatError, parse_tool_call
from .prompts import system_prompt, task_prompt
from .tools import Tools

__all__ = ["Completion", "EpisodeConfig", "PromptEncoder", "Sampler", "build_prompt_ids", "build_prompts",
           "render_prompts", "run_episode"]


class Completion(Protocol):
    """What a sampler returns for one turn (agent.llm.Completion has these fields)."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


class Sampler(Protocol):
    """Samples one turn: an `agent.llm` client bound to an endpoint, or a fake for tests."""

    async def complete(self, prompt_ids: list[int], *, max_tokens: int, stop: Sequence[str],
                       stop_token_ids: Sequence[int]) -> Completion: ...


@dataclass(frozen=True)
class EpisodeConfig:
    max_turns: int = 30  # model turns before the episode ends with max_turns
    max_context_tokens: int = 32768  # the whole episode (prompt + turns) must fit the model's context
    max_turn_tokens: int = 2048  # tokens one model turn may generate
    min_turn_tokens: int = 16  # fewer left than this: context_overflow instead of a useless turn
    wall_time_s: float = 1800.0  # the episode's budget, tools and sampling included
    bash_timeout_s: float = 60.0
    max_observation_chars: int = 12000
    diff_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_context_tokens", "max_turn_tokens", "min_turn_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EpisodeConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("wall_time_s", "bash_timeout_s", "diff_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"EpisodeConfig.{name} must be > 0, got {getattr(self, name)}")


def build_prompt_ids(tokenizer: Tokenizer, task: Task, workdir: str = "/testbed") -> list[int]:
    """The prompt, rendered by the tokenizer's chat template once."""
    return build_prompts(tokenizer, [(task, workdir)])[0]


def render_prompts(tokenizer: Tokenizer, tasks: Sequence[tuple[Task, str]]) -> list[str]:
    """The chat-template text of each (task, workdir)'s prompt, ready to encode without special tokens."""
    return [tokenizer.apply_chat_template(
        [{"role": "system", "content": system_prompt()},
         {"role": "user", "content": task_prompt(task.problem_statement, workdir)}],
        tokenize=False, add_generation_prompt=True) for task, workdir in tasks]


def build_prompts(tokenizer: Tokenizer, tasks: Sequence[tuple[Task, str]]) -> list[list[int]]:
    """`build_prompt_ids` of each (task, workdir): the same ids as one at a time. A Hugging Face fast
    tokenizer encodes them as one batch in its Rust backend, on every core and without the GIL (512
    prompts of ~400 tokens: 76 ms here instead of 136); the backend's encode is read-only, safe to
    run in a worker thread beside an event loop's own calls."""
    return _encode_whole(tokenizer, render_prompts(tokenizer, tasks))


def _encode_whole(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [list(e.ids) for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return [list(tokenizer.encode(text, add_special_tokens=False)) for text in texts]


class PromptEncoder:
    """Encodes rendered prompts (`render_prompts`) with a fast tokenizer's Rust backend: the system
    message that every prompt starts with once, and per prompt only the rest.

    Exact: a Hugging Face tokenizer splits its input at added tokens (``<|im_start|>``, ...) before
    anything else and encodes the pieces between them on their own, so a text cut right before one
    encodes as its two halves' ids end to end. The cut is the last added token inside the text that two
    different probe prompts share. It is checked on the probes when this is built (whole == prefix +
    rest), and a caller checks it again on the first prompt of every batch (`check`); where either
    differs, prompts are encoded whole. Without a backend (a slow tokenizer) prompts are encoded whole.

    `encode_raw` is for a worker thread (Rust only, no GIL held for long); `to_ids` turns its result
    into lists in the caller's thread. `encode` does both.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.prefix = ""
        self.prefix_ids: list[int] = []
        if self.backend is not None:
            try:
                self._find_prefix()
            except Exception:  # an odd template or backend: encode prompts whole
                self.prefix, self.prefix_ids = "", []

    def _find_prefix(self) -> None:
        assert self.backend is not None
        probe = Task(id="probe", repo="probe/probe", base_commit="HEAD", problem_statement="x", image="host",
                     test_patch="", FAIL_TO_PASS=["t"], PASS_TO_PASS=[], test_command="true", log_parser="pytest")
        other = dataclasses.replace(probe, problem_statement="Another, longer one.\n  y")
        texts = render_prompts(self.tokenizer, [(probe, "/a"), (other, "/probe/b")])
        common = os.path.commonprefix(texts)
        added = [t.content for t in self.backend.get_added_tokens_decoder().values() if t.content]
        cut = max((common.rfind(token) for token in added), default=-1)
        if cut <= 0:
            return
        self.prefix, self.prefix_ids = common[:cut], self._whole([common[:cut]])[0]
        if not all(self.check(text) for text in texts):
            self.prefix, self.prefix_ids = "", []

    def _whole(self, texts: Sequence[str]) -> list[list[int]]:
        return _encode_whole(self.tokenizer, texts)

    def check(self, text: str) -> bool:
        """Whether `text` encodes the same whole and cut (True where nothing is cut)."""
        if not (self.prefix and text.startswith(self.prefix)):
            return True
        return self._whole([text])[0] == self.prefix_ids + self._whole([text[len(self.prefix):]])[0]

    def disable(self) -> None:
        self.prefix, self.prefix_ids = "", []

    def encode_raw(self, texts: Sequence[str]) -> tuple[list[int] | None, Any]:
        """The backend's encodings of `texts`, cut or whole, and the prefix ids that go before each."""
        if self.backend is None:
            return None, self._whole(texts)
        prefix, prefix_ids = self.prefix, self.prefix_ids
        if prefix and all(text.startswith(prefix) for text in texts):
            n = len(prefix)
            return prefix_ids, self.backend.encode_batch([text[n:] for text in texts], add_special_tokens=False)
        return [], self.backend.encode_batch(list(texts), add_special_tokens=False)

    def to_ids(self, raw: tuple[list[int] | None, Any]) -> list[list[int]]:
        prefix_ids, encoded = raw
        if prefix_ids is None:
            return encoded
        return [prefix_ids + e.ids for e in encoded]

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.to_ids(self.encode_raw(texts))


async def run_episode(
    task: Task,
    workspace: Workspace,
    sampler: Sampler,
    tokenizer: Tokenizer,
    chat: ChatFormat,
    config: EpisodeConfig = EpisodeConfig(),
    *,
    episode_id: str,
    group_id: str,
    policy_version: int = 0,
    endpoint: str = "",
    diff: Any = None,
    prompt_ids: list[int] | None = None,
    prompt_checked: bool = False,
    codec: TextCodec | None = None,
) -> Trajectory:
    """Run one episode in `workspace` (a fresh checkout of the task) and return its trajectory.

    `diff`: async callable `(base_commit) -> patch`; defaults to `workspace.diff`. `prompt_ids`: the
    rendered prompt when the caller has it already (the G rollouts of a task share it);
    `prompt_checked`: it came from `Trajectory.check_prompt_ids` (a scheduler checks a task's prompt
    once for its rollouts), so it is copied, not checked again.
    """
    t_start = time.perf_counter()
    if prompt_ids is None:
        prompt_ids = build_prompt_ids(tokenizer, task, workspace.workdir)
    # Checked now, before the first sample, as the record's constructor would check it at the end
    # (where `Trajectory.from_checked` takes it and the turns as they are).
    prompt_ids = list(prompt_ids) if prompt_checked else Trajectory.check_prompt_ids(prompt_ids)
    codec = codec or TextCodec(tokenizer)
    tools = Tools(workspace, bash_timeout_s=config.bash_timeout_s, max_observation_chars=config.max_observation_chars)
    context: list[int] = list(prompt_ids)
    turns: list[Turn] = []
    finish = FinishReason.MAX_TURNS

    perf_counter = time.perf_counter
    stop_token_ids = chat.stop_token_ids
    check_action, make_turn = Turn.check_action, Turn.from_checked
    max_context, min_turn, max_turn_tokens = config.max_context_tokens, config.min_turn_tokens, config.max_turn_tokens
    format_errors = tool_failures = 0
    with trio.move_on_after(config.wall_time_s) as budget:
        for _ in range(config.max_turns):
            room = max_context - len(context)
            if room < min_turn:
                finish = FinishReason.CONTEXT_OVERFLOW
                break
            t0 = perf_counter()
            try:
                completion = await sampler.complete(
                    context, max_tokens=min(max_turn_tokens, room), stop=STOP_SEQUENCES,
                    stop_token_ids=stop_token_ids,
                )
            except ContextOverflow:  # the server's context is shorter than the configured one
                finish = FinishReason.CONTEXT_OVERFLOW
                break
            t1 = perf_counter()
            # What the sampler returned is checked as it arrives (the errors `Turn` gives: ids in
            # int32 and >= 0, finite logprobs, one per id), before anything decodes it; the checked
            # copies go into the turn as they are (`Turn.from_checked`).
            action_ids, action_logprobs = check_action(completion.token_ids, completion.logprobs)
            context += action_ids
            text = codec.decode(action_ids)
            t2 = perf_counter()
            # The tool call (inline rather than a helper coroutine: one frame less to resume at each
            # of the tool's awaits). The model's errors become observations; the infrastructure's raise.
            submitted = failed = format_error = False
            try:
                call = parse_tool_call(text)
            except FormatError as exc:
                observation, tool, format_error = str(exc), "", True
                format_errors += 1
            else:
                tool = call.name
                try:  # (Tools.run inline: one frame less to resume at each of the tool's awaits)
                    result = tools.capped(await tools.handler(tool)(**call.arguments))
                except OSError as exc:  # a local workspace's file error: the model's to handle
                    observation, failed = f"Error: {exc}", True
                except Exception as exc:
                    # Typed sandbox errors about the request (a path outside the repository, a file
                    # too large) are the model's to handle; a lost node or endpoint is the scheduler's.
                    if getattr(exc, "code", None) not in ("bad_request", "not_found", "limit"):
                        raise
                    observation, failed = f"Error: {exc}", True
                else:
                    observation, submitted, failed = result.observation, result.submitted, result.failed
                tool_failures += failed
            t3 = perf_counter()
            observation_ids: list[int] = []
            if not submitted:
                turn_closed = bool(action_ids) and action_ids[-1] in stop_token_ids
                observation_ids = codec.encode(chat.observation_text(observation, turn_closed=turn_closed))
            overflow = len(context) + len(observation_ids) > max_context
            if overflow:
                observation_ids = []  # the model never sees it: nothing to keep
            turns.append(make_turn(action_ids, action_logprobs, observation_ids, tool, format_error, t1 - t0, t3 - t2))
            context += observation_ids
            if submitted:
                finish = FinishReason.SUBMITTED
                break
            if overflow or (completion.finish_reason == "length" and len(context) >= max_context):
                finish = FinishReason.CONTEXT_OVERFLOW
                break
    if budget.cancelled_caught:
        finish = FinishReason.TIMEOUT

    get_diff = diff or workspace.diff  # type: ignore[attr-defined]
    # trio.fail_after, without its generator wrapper (thousands of episodes end together in a batch)
    with trio.CancelScope(deadline=trio.current_time() + config.diff_timeout_s) as diff_scope:
        patch = await get_diff(task.base_commit)
    if diff_scope.cancelled_caught:
        raise trio.TooSlowError(f"the diff took longer than {config.diff_timeout_s:g} s")
    metrics = {
        "turns": float(len(turns)),
        "format_errors": float(format_errors),
        "tool_failures": float(tool_failures),
        "wall_s": time.perf_counter() - t_start,
        "tokens": float(len(context)),
    }
    return Trajectory.from_checked(episode_id=episode_id, task_id=task.id, group_id=group_id, prompt_ids=prompt_ids,
                                   turns=turns, reward=0.0, finish_reason=finish, policy_version=policy_version,
                                   endpoint=endpoint, patch=patch, resolved=None, metrics=metrics)
