"""An oracle policy: solves tasks from their gold patch, in the scaffold's tool format.

It is a policy of `agent.fake_llm` (a callable from prompt token ids to answer token ids), stateless:
it reads the conversation so far to know which task it is on (the issue text) and how many turns it has
taken, then takes the next step of a plausible plan:

    view the file to fix -> one str_replace per hunk of the gold patch -> run the tests -> submit

With `noise > 0` a turn is, with that probability, replaced by a detour (viewing another file, a
malformed call, a failing command), which makes its episodes imperfect but still mostly successful:
the kind of data a small model is pre-trained on before RL.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

from runtime.records import Task

from .patch import parse_patch
from .scaffold.chat import ChatFormat, TextCodec

__all__ = ["OraclePolicy", "oracle_plan"]

_ISSUE = re.compile(r"<issue>\n(.*?)\n</issue>", re.DOTALL)


def _call(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>{v}</parameter>\n" for k, v in params.items())
    return f"<function={name}>\n{body}</function>"


@dataclass(frozen=True)
class _Edit:
    path: str
    old: str
    new: str


def _edits(gold_patch: str) -> list[_Edit]:
    edits = []
    for fp in parse_patch(gold_patch):
        if fp.is_binary or fp.is_deleted or fp.new_path is None:
            continue
        for hunk in fp.hunks:
            old, new = [], []
            for line in hunk.lines:
                tag, text = line[:1], line[1:]
                if tag in (" ", "-"):
                    old.append(text)
                if tag in (" ", "+"):
                    new.append(text)
            edits.append(_Edit(fp.new_path, "\n".join(old), "\n".join(new)))
    return edits


def oracle_plan(task: Task, test_command: str = "python3 -m pytest -q -p no:cacheprovider") -> list[str]:
    """The oracle's turns for `task`, as text (each turn one tool call)."""
    if not task.gold_patch:
        raise ValueError(f"{task.id}: the oracle needs a gold patch")
    edits = _edits(task.gold_patch)
    if not edits:
        raise ValueError(f"{task.id}: gold patch has no text hunks")
    turns = [f"Let me look at {edits[0].path}.\n" + _call("view", path=edits[0].path)]
    for edit in edits:
        turns.append(f"I will fix the code in {edit.path}.\n" + _call("str_replace", path=edit.path, old=edit.old, new=edit.new))
    turns.append("Now run the tests.\n" + _call("bash", command=test_command))
    turns.append("The fix is done.\n" + _call("submit"))
    return turns


def _detour(rng: random.Random, task: Task) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return "Let me look around.\n" + _call("bash", command="ls")
    if kind == 1:
        return "I think the problem is elsewhere.\n<function=view>\n<parameter=path>"  # malformed: never closed
    return "Let me check git.\n" + _call("bash", command="git status --short")


class OraclePolicy:
    """A fake_llm policy that solves `tasks` from their gold patches (see the module docstring)."""

    def __init__(self, tasks: Iterable[Task], tokenizer, *, noise: float = 0.0, seed: int = 0,
                 test_command: str = "python3 -m pytest -q -p no:cacheprovider") -> None:
        if not 0.0 <= noise < 1.0:
            raise ValueError(f"noise must be in [0, 1), got {noise}")
        self.tokenizer = tokenizer
        self.codec = TextCodec(tokenizer)
        self.chat = ChatFormat.from_tokenizer(tokenizer)
        self.noise = noise
        self.seed = seed
        self.plans: dict[str, tuple[Task, list[str]]] = {}
        for task in tasks:
            self.plans[task.problem_statement.strip()] = (task, oracle_plan(task, test_command))
        self.end_ids = list(self.chat.stop_token_ids[:1])
        self.unknown = 0  # prompts about no known task (answered with a bare submit)

    def _answer(self, text: str) -> list[int]:
        return list(self.codec.encode(text)) + self.end_ids

    def __call__(self, prompt_ids: list[int], request: object = None) -> list[int]:
        # Special tokens kept: the turn markers are what the oracle counts.
        text = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        match = _ISSUE.search(text)
        entry = self.plans.get(match.group(1).strip()) if match else None
        if entry is None:
            self.unknown += 1
            return self._answer("I do not know this task.\n" + _call("submit"))
        task, plan = entry
        marker = self.chat.observation_suffix.strip()
        turn = max(0, text.count(marker) - 1) if marker else 0
        rng = random.Random(f"{self.seed}:{task.id}:{turn}")
        if self.noise and rng.random() < self.noise:
            return self._answer(_detour(rng, task))
        return self._answer(plan[min(_steps_done(text, plan), len(plan) - 1)])


def _steps_done(text: str, plan: list[str]) -> int:
    """How many plan steps already appear, in order, in the conversation (detours do not count)."""
    pos = 0
    for done, step in enumerate(plan):
        found = text.find(step, pos)
        if found < 0:
            return done
        pos = found + len(step)
    return len(plan)
