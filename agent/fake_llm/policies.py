"""What the fake server generates: the `Policy` protocol and three policies (scripted, random, echo).

A policy sees the prompt's token ids and the parsed request and returns token ids, or a `Generation` when
it wants to choose the logprobs (or text) too. The server, not the policy, applies `max_tokens`, stop
token ids and stop strings, so a policy can return "the whole answer" and stay simple. An *oracle* (for
example one that answers toy tasks from their gold patch) is any object with this `__call__`; it may be
async.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "CompletionRequest",
    "EchoPolicy",
    "Generation",
    "Policy",
    "RandomPolicy",
    "ScriptedPolicy",
    "fake_logprob",
]


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A parsed `/v1/completions` request, with vLLM's field names and defaults."""

    prompt_ids: list[int]
    max_tokens: int = 16
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's and k alternatives
    return_token_ids: bool = False  # vLLM >= 0.10.2: choice.token_ids and choice.prompt_token_ids
    return_tokens_as_token_ids: bool = False  # logprobs.tokens as "token_id:{id}" strings
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    model: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Generation:
    """A policy's answer when it chooses more than the token ids. `logprobs` match `token_ids` 1:1."""

    token_ids: Sequence[int]
    logprobs: Sequence[float] | None = None


PolicyResult = Sequence[int] | Generation


class Policy(Protocol):
    """Given the prompt's token ids and the request, the tokens to answer (sync or async)."""

    def __call__(self, prompt_ids: list[int], request: CompletionRequest) -> PolicyResult | Awaitable[PolicyResult]: ...


def fake_logprob(token_id: int, position: int) -> float:
    """The fake's logprob for a token it did not get one for: deterministic, negative, exact in JSON."""
    return -((token_id * 2654435761 + position * 40503) % 4096 + 1) / 1024.0


class ScriptedPolicy:
    """Answers call i with `responses[i]`; the last response repeats once the script is used up.

    A response is token ids, a `Generation`, or text (then `tokenizer` turns it into ids: any callable
    `str -> list[int]`, such as ``lambda s: tok.encode(s, add_special_tokens=False)``).
    """

    def __init__(self, responses: Sequence[Sequence[int] | Generation | str],
                 tokenizer: Callable[[str], Sequence[int]] | None = None) -> None:
        if not responses:
            raise ValueError("ScriptedPolicy needs at least one response")
        self._responses: list[PolicyResult] = []
        for i, response in enumerate(responses):
            if isinstance(response, str):
                if tokenizer is None:
                    raise ValueError(f"ScriptedPolicy response {i} is text: pass tokenizer=")
                response = list(tokenizer(response))
            self._responses.append(response)
        self.calls = 0

    def __call__(self, prompt_ids: list[int], request: CompletionRequest) -> PolicyResult:
        response = self._responses[min(self.calls, len(self._responses) - 1)]
        self.calls += 1
        return response


class RandomPolicy:
    """Uniform token ids in ``[low, vocab_size)``, `length` of them (or uniform in a range), seeded.

    A request that carries a `seed` gets the same answer every time, as vLLM's per-request seed does.
    """

    def __init__(self, *, vocab_size: int = 32000, length: int | tuple[int, int] = 32, seed: int = 0,
                 low: int = 0) -> None:
        if not 0 <= low < vocab_size:
            raise ValueError(f"RandomPolicy: need 0 <= low < vocab_size, got low={low}, vocab_size={vocab_size}")
        self.vocab_size, self.length, self.low = vocab_size, length, low
        self._ids = range(low, vocab_size)
        self._rng = random.Random(seed)

    def __call__(self, prompt_ids: list[int], request: CompletionRequest) -> list[int]:
        rng = self._rng if request.seed is None else random.Random(request.seed)
        n = self.length if isinstance(self.length, int) else rng.randint(*self.length)
        return rng.choices(self._ids, k=n)


class EchoPolicy:
    """Answers with the prompt's own token ids (the server cuts them at `max_tokens`)."""

    def __call__(self, prompt_ids: list[int], request: CompletionRequest) -> list[int]:
        return prompt_ids
