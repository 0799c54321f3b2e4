"""Deterministic fakes of the scheduler's pluggable parts, for tests and benchmarks.

`FakeNode` stands for a sandboxd node (`sandboxd.client.SandboxClient`): sandboxes are in-memory file
maps, commands are answered by a function, and the node can be "killed" (every call then raises
`ConnectionLost`, as a dead daemon would). `ScriptedPolicy` stands for inference endpoints: it answers
turns from a script of texts, with optional latency and injected endpoint failures.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from trio.lowlevel import Abort, RunVar, current_task, reschedule, spawn_system_task, wait_task_rescheduled

from runtime.wire import ConnectionLost, NotFound

from .llm.errors import EndpointDown
from .workspace import ExecResult

__all__ = ["CHATML_TEMPLATE", "CallablePolicy", "chatml_bpe", "EndpointDown", "FakeNode", "FakeSandbox", "ScriptedPolicy", "TurnReply",
           "fake_latency", "tiny_tokenizer"]

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chatml_bpe(corpus: Sequence[str], vocab_size: int, *, split_words: bool = True) -> Any:
    """A byte-level BPE trained on `corpus`, wrapped as a `PreTrainedTokenizerFast` with a ChatML
    template (`<|im_end|>` ends a turn, `<|endoftext|>` pads). Byte-level: every string round-trips.
    Deterministic for a corpus.

    `split_words`: merges stay inside words (GPT-2's pre-tokenisation regex), as in general-purpose
    tokenizers. False: merges may cross spaces and punctuation, so frequent phrases of the corpus
    (whole code lines of a small domain) become a few tokens; text outside the corpus still encodes,
    in smaller pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHATML_TEMPLATE
    return hf


def tiny_tokenizer(extra_corpus: Sequence[str] = (), vocab_size: int = 800) -> Any:
    """A small byte-level BPE with a ChatML template, trained in about a second (no hub download)."""
    from .scaffold import system_prompt

    corpus = [system_prompt(), "def add(a, b):\n    return a + b\n",
              "<function=bash>\n<parameter=command>ls</parameter>\n</function>", *extra_corpus]
    return chatml_bpe(corpus * 20, vocab_size)


class _Alarms(trio.abc.Instrument):
    """Wakes every `fake_latency` sleeper of a trio run when its time comes, as a socket reply would.

    `trio.sleep` arms a cancel scope per call and ends by raising and catching `Cancelled`: about 25 us
    of CPU on this machine (81,920 sleeps of 4,096 tasks took 2.0 s of CPU, measured alone). A fake
    endpoint's latency stands for a reply arriving on a socket, which trio delivers right after its
    I/O wait by rescheduling the parked task, to run in the next pass over the runnable tasks. So here
    sleepers park in a heap, and this instrument's `after_io_wait` (called by the run loop at that very
    point) reschedules everyone due. One system task holds a cancel scope whose deadline is kept at the
    earliest sleeper's, so that the loop's I/O wait ends in time; it is moved on before it expires
    (an expiry, which costs an exception, is handled the same way). A relay task that woke sleepers
    itself would add a pass of the run loop to every wake.
    """

    def __init__(self) -> None:
        self.heap: list[list[Any]] = []  # [deadline, sequence, task or None once cancelled]
        self.sequence = itertools.count()
        self.scope: trio.CancelScope | None = None  # the system task's, while it waits

    def park(self, seconds: float) -> Callable[[Any], Abort]:
        """Register the current task to wake in `seconds`; it then parks with the returned abort
        function (`wait_task_rescheduled`). Not a coroutine: one frame less to resume per wake."""
        entry = [trio.current_time() + seconds, next(self.sequence), current_task()]
        heapq.heappush(self.heap, entry)
        scope = self.scope
        if scope is not None and entry[0] < scope.deadline:
            scope.deadline = entry[0]

        def abort(_: Any) -> Abort:
            entry[2] = None  # cancelled: skipped when its time comes
            return Abort.SUCCEEDED

        return abort

    def after_io_wait(self, timeout: float) -> None:
        if self.heap:
            self._wake_due()

    def _wake_due(self) -> None:
        heap = self.heap
        now = trio.current_time()
        while heap and (heap[0][0] <= now or heap[0][2] is None):
            task = heapq.heappop(heap)[2]
            if task is not None:
                reschedule(task)
        if self.scope is not None:
            self.scope.deadline = heap[0][0] if heap else math.inf

    async def run(self) -> None:
        while True:
            with trio.CancelScope(deadline=self.heap[0][0] if self.heap else math.inf) as self.scope:
                await trio.sleep_forever()
            self.scope = None  # it expired before after_io_wait moved it on: wake who is due, arm again
            self._wake_due()


_ALARMS: RunVar[_Alarms] = RunVar("agent.fakes.alarms")


async def fake_latency(seconds: float) -> None:
    """`trio.sleep(seconds)` for fakes of remote calls, at a fraction of its CPU cost (see `_Alarms`)."""
    if not seconds > 0:
        await trio.lowlevel.checkpoint()
        return
    try:
        alarms = _ALARMS.get()
    except LookupError:
        alarms = _Alarms()
        _ALARMS.set(alarms)
        trio.lowlevel.add_instrument(alarms)
        spawn_system_task(alarms.run, name="agent.fakes.alarms")
    await wait_task_rescheduled(alarms.park(seconds))


class FakeSandbox:
    def __init__(self, node: FakeNode, sandbox_id: str, files: dict[str, bytes], workdir: str = "/testbed") -> None:
        self.node = node
        self.id = sandbox_id
        self.workdir = workdir
        self.files = dict(files)
        self.base = dict(files)

    async def __aenter__(self) -> FakeSandbox:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # A real client shields its destroy call from cancellation; this one never waits, so there is
        # nothing to shield (and every one of thousands of episodes ends here).
        try:
            await self.destroy()
        except (ConnectionLost, NotFound):
            pass

    async def exec(self, argv: Sequence[str] | str, *, timeout_s: float = 600.0, **kwargs: Any) -> ExecResult:
        node = self.node  # the tool of most turns: _check and _delay inline
        if node.dead:
            node._check()
        if node.latency_s:
            await fake_latency(node.latency_s)
        else:
            await trio.lowlevel.checkpoint()
        out = node.run_command(argv if isinstance(argv, str) else " ".join(argv))
        return ExecResult(0, out, False, False, 0.0, len(out))

    async def read_file(self, path: str, **kwargs: Any) -> bytes:
        self.node._check()
        if path not in self.files:
            raise NotFound(f"no file {path!r}", field="path")
        return self.files[path]

    async def write_file(self, path: str, data: bytes, **kwargs: Any) -> None:
        self.node._check()
        self.files[path] = bytes(data)

    async def diff(self, base_commit: str, **kwargs: Any) -> str:
        self.node._check()
        parts = []
        for path in sorted(self.files):
            if self.files[path] != self.base.get(path):
                new = self.files[path].decode(errors="replace").splitlines()
                parts.append(f"--- a/{path}\n+++ b/{path}\n@@ -1 +1,{len(new)} @@\n" + "".join(f"+{l}\n" for l in new))
        return "".join(parts)

    async def snapshot(self) -> str:
        self.node._check()
        return self.node._add_snapshot(self.files)

    async def restore(self, snapshot: str | None = None) -> None:
        self.node._check()
        self.files = dict(self.node.snapshots[snapshot]) if snapshot else dict(self.base)

    async def destroy(self) -> None:
        self.node._check()
        if self.node.sandboxes.pop(self.id, None) is None:
            raise NotFound(f"no sandbox {self.id!r}", field="sandbox")


class FakeNode:
    """An in-memory sandbox node. `kill()` makes every later call fail like a dead daemon."""

    def __init__(self, name: str, *, files: dict[str, bytes] | None = None,
                 run_command: Callable[[str], bytes] | None = None, latency_s: float = 0.0) -> None:
        self.node = name
        self.files = files or {"pkg/calc.py": b"def add(a, b):\n    return a - b\n"}
        self.run_command = run_command or (lambda cmd: b"ok\n")
        self.latency_s = latency_s
        self.sandboxes: dict[str, FakeSandbox] = {}
        self.snapshots: dict[str, dict[str, bytes]] = {}
        self.dead = False
        self.created = 0
        self._ids = itertools.count(1)

    def kill(self) -> None:
        self.dead = True

    def _check(self) -> None:
        if self.dead:
            raise ConnectionLost(f"connection to {self.node} lost: node killed")

    async def _delay(self) -> None:
        if self.latency_s:
            await fake_latency(self.latency_s)
        else:
            await trio.lowlevel.checkpoint()

    def _add_snapshot(self, files: dict[str, bytes]) -> str:
        sid = f"sn-{next(self._ids)}"
        self.snapshots[sid] = dict(files)
        return sid

    def _new(self, files: dict[str, bytes], workdir: str) -> FakeSandbox:
        sb = FakeSandbox(self, f"sb-{next(self._ids)}", files, workdir)
        self.sandboxes[sb.id] = sb
        self.created += 1
        return sb

    async def create(self, image: str = "host", *, repo: str | None = None, workdir: str = "/testbed",
                     **kwargs: Any) -> FakeSandbox:
        self._check()
        await self._delay()
        return self._new(self.files, workdir)

    async def fork(self, snapshot: str, *, workdir: str = "/testbed", **kwargs: Any) -> FakeSandbox:
        self._check()
        await self._delay()
        if snapshot not in self.snapshots:
            raise NotFound(f"no snapshot {snapshot!r}", field="snapshot")
        return self._new(self.snapshots[snapshot], workdir)

    async def delete_snapshot(self, snapshot: str) -> None:
        self._check()
        self.snapshots.pop(snapshot, None)


@dataclass
class TurnReply:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str = "stop"


class ScriptedPolicy:
    """Endpoints that answer each turn with the next text of `script` (the last one repeats).

    `failure_rate`: fraction of turns that raise `EndpointDown` (seeded). `latency_s`: per turn.
    """

    def __init__(self, tokenizer: Any, script: Sequence[str], *, endpoints: Sequence[str] = ("fake://0",),
                 failure_rate: float = 0.0, latency_s: float = 0.0, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.endpoints = list(endpoints)
        self.failure_rate = failure_rate
        self.latency_s = latency_s
        self.rng = random.Random(seed)
        self._encoded = [list(tokenizer.encode(t, add_special_tokens=False)) for t in script]
        self._next = itertools.cycle(self.endpoints)
        self.failures: dict[str, int] = {}
        self.episodes = dict.fromkeys(self.endpoints, 0)  # assigned and not yet released, per endpoint
        self.calls = 0

    def assign_endpoint(self) -> str:
        endpoint = next(self._next)
        self.episodes[endpoint] += 1
        return endpoint

    def release_endpoint(self, endpoint: str) -> None:
        self.episodes[endpoint] -= 1

    def report_failure(self, endpoint: str, exc: BaseException) -> None:
        self.failures[endpoint] = self.failures.get(endpoint, 0) + 1

    def sampler(self, endpoint: str) -> _ScriptedSampler:
        return _ScriptedSampler(self, endpoint)


class _ScriptedSampler:
    def __init__(self, policy: ScriptedPolicy, endpoint: str) -> None:
        self.policy = policy
        self.endpoint = endpoint
        self.turn = 0

    async def complete(self, prompt_ids: list[int], *, max_tokens: int, stop: Sequence[str],
                       stop_token_ids: Sequence[int]) -> TurnReply:
        policy = self.policy
        policy.calls += 1
        if policy.latency_s:
            await fake_latency(policy.latency_s)
        else:
            await trio.lowlevel.checkpoint()
        if policy.failure_rate and policy.rng.random() < policy.failure_rate:
            raise EndpointDown(f"{self.endpoint}: injected failure")
        ids = policy._encoded[min(self.turn, len(policy._encoded) - 1)]
        self.turn += 1
        ids = ids[: max(0, max_tokens - 1)] + [stop_token_ids[0]]
        return TurnReply(ids, [-0.5] * len(ids))


class CallablePolicy:
    """In-process endpoints answering with a fake_llm-style policy: `fn(prompt_ids, request) -> ids`.

    The scheduler's `Policy` without HTTP: for tests and benchmarks of everything but the network.
    """

    def __init__(self, fn: Callable[[list[int], Any], Sequence[int]], *, endpoints: Sequence[str] = ("inproc://0",)) -> None:
        self.fn = fn
        self.endpoints = list(endpoints)
        self._next = itertools.cycle(self.endpoints)
        self.failures: dict[str, int] = {}
        self.episodes = dict.fromkeys(self.endpoints, 0)  # assigned and not yet released, per endpoint

    def assign_endpoint(self) -> str:
        endpoint = next(self._next)
        self.episodes[endpoint] += 1
        return endpoint

    def release_endpoint(self, endpoint: str) -> None:
        self.episodes[endpoint] -= 1

    def report_failure(self, endpoint: str, exc: BaseException) -> None:
        self.failures[endpoint] = self.failures.get(endpoint, 0) + 1

    def sampler(self, endpoint: str) -> _CallableSampler:
        return _CallableSampler(self.fn)


class _CallableSampler:
    def __init__(self, fn: Callable[[list[int], Any], Sequence[int]]) -> None:
        self.fn = fn

    async def complete(self, prompt_ids: list[int], *, max_tokens: int, stop: Sequence[str],
                       stop_token_ids: Sequence[int]) -> TurnReply:
        await trio.lowlevel.checkpoint()
        ids = list(self.fn(prompt_ids, None))
        finish = "stop"
        for i, tok in enumerate(ids):
            if tok in stop_token_ids:
                ids = ids[: i + 1]  # like vLLM: the stop token is kept
                break
        if len(ids) > max_tokens:
            ids, finish = ids[:max_tokens], "length"
        return TurnReply(ids, [-0.5] * len(ids), finish)
