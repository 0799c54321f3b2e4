"""vLLM's `/v1/completions` on the wire: the request body, the response's parsing and validation, and what
an error status means. Pure functions, no I/O.

Fields (vllm/entrypoints/openai/completion/protocol.py; before 0.11 in .../openai/protocol.py):

* request: ``prompt`` (a list of token ids is one prompt), ``max_tokens``, ``temperature``, ``top_p``,
  ``stop``, ``stop_token_ids``, ``seed``, ``logprobs`` (an int: 0 = the sampled token's logprob only),
  ``return_tokens_as_token_ids`` (logprob tokens as ``"token_id:{id}"``; PR #6626, mid 2024, also as the
  server flag ``--return-tokens-as-token-ids``),
  ``return_token_ids`` (``choices[].token_ids`` and ``choices[].prompt_token_ids``; vLLM >= 0.10.2,
  PR #22587; older servers ignore unknown fields), ``include_stop_str_in_output``.
* response: ``choices[0]``: ``text``, ``logprobs`` {``tokens``, ``token_logprobs``, ``top_logprobs``,
  ``text_offset``}, ``finish_reason`` ("stop" | "length"; "abort" when the engine dropped the request),
  ``stop_reason`` (the stop token id or string; None for EOS or length), ``token_ids``,
  ``prompt_token_ids``; ``usage.prompt_tokens``.
* errors: ``{"error": {"message", "type", "param", "code"}}`` (older releases: the same fields at the top).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import BadResponse, ContextOverflow, LLMError, RequestRejected

__all__ = ["FINISH_REASONS", "NO_TOKEN_IDS", "ParsedCompletion", "classify_error", "completion_body",
           "error_message", "is_context_overflow", "parse_completion"]

FINISH_REASONS = frozenset({"stop", "length", "abort"})

NO_TOKEN_IDS = (
    "the server returned no token ids, and a token-exact trainer cannot re-tokenise text: the server must "
    "return token ids. This client sends `return_token_ids: true` (vLLM >= 0.10.2 answers with "
    "choices[].token_ids) and `logprobs: 0` with `return_tokens_as_token_ids: true` (answered with "
    "'token_id:N' logprob tokens). Use vLLM >= 0.10.2, or start vLLM with --return-tokens-as-token-ids, "
    "and check that no proxy in between drops these fields."
)

# vLLM's wordings for a request that does not fit the context, across releases:
#   "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (...)"
#   "You passed 4000 input tokens and requested 200 output tokens. However, the model's context length is
#    only 4096 tokens, resulting in a maximum input length of 3896 tokens. ..."
#   "The decoder prompt (length 5000) is longer than the maximum model length of 4096. ..."
#   "max_tokens must be at least 1, got -186."   (max_tokens computed from a too-long prompt)
#   "'max_tokens' or 'max_completion_tokens' is too large: 5000. This model's maximum context length ..."
_CONTEXT = re.compile(
    r"maximum context length|context length is only|longer than the maximum model length"
    r"|max_tokens must be at least 1|maximum input length",
    re.IGNORECASE,
)
_TOKEN_ID = "token_id:"


@dataclass(frozen=True, slots=True)
class ParsedCompletion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    stop_reason: int | str | None
    text: str | None
    prompt_tokens: int


def completion_body(
    prompt_ids: list[int],
    *,
    model: str | None,
    max_tokens: int,
    temperature: float,
    top_p: float,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    seed: int | None = None,
    return_token_ids: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """The JSON body for one token-id prompt; `extra` adds or overrides vLLM sampling fields (top_k, ...)."""
    body: dict[str, Any] = {"prompt": prompt_ids, "max_tokens": max_tokens, "temperature": temperature,
                            "top_p": top_p, "logprobs": 0, "return_tokens_as_token_ids": True,
                            "include_stop_str_in_output": True}
    if model is not None:
        body["model"] = model
    if return_token_ids:
        body["return_token_ids"] = True
    if stop:
        body["stop"] = list(stop)
    if stop_token_ids:
        body["stop_token_ids"] = list(stop_token_ids)
    if seed is not None:
        body["seed"] = seed
    if extra:
        body.update(extra)
    try:
        return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"completion request: cannot encode as JSON ({exc}); prompt_ids must be Python ints") from exc


def error_message(body: bytes) -> str:
    """The message of an error response (either vLLM layout, or FastAPI's `detail`), else the raw text."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:500].decode("utf-8", "replace")
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
        for key in ("message", "detail"):
            if key in data:
                return str(data[key])
    return body[:500].decode("utf-8", "replace")


def is_context_overflow(message: str) -> bool:
    return _CONTEXT.search(message) is not None


def classify_error(status: int, body: bytes, endpoint: str) -> tuple[LLMError | None, str]:
    """For a non-2xx answer: (the error to raise now, or None when the request is worth retrying; message).

    A context overflow is the request's, whatever the status; 408, 429 and 5xx are the server's (retry);
    any other 4xx is the request's (`RequestRejected`).
    """
    message = error_message(body)
    if is_context_overflow(message):
        return ContextOverflow(f"{endpoint}: {message}", endpoint=endpoint), message
    if status in (408, 429) or status >= 500:
        return None, message
    return RequestRejected(f"{endpoint}: HTTP {status}: {message}", endpoint=endpoint, status=status), message


def _token_ids_from_logprobs(tokens: Any) -> list[int] | None:
    """Ids from ``"token_id:N"`` strings (return_tokens_as_token_ids), or None if they are not that form."""
    if not isinstance(tokens, list):
        return None
    try:
        ids = [int(t[9:]) for t in tokens if t.startswith(_TOKEN_ID)]
    except (AttributeError, ValueError):
        return None
    return ids if len(ids) == len(tokens) else None


def _is_id_list(values: Any) -> bool:
    # map/set/min run in C: these checks see every token of every answer.
    return isinstance(values, list) and (not values or (set(map(type, values)) == {int} and min(values) >= 0))


def _as_logprobs(values: Any) -> list[float] | None:
    """`values` as floats if it is a list of log-probabilities (real numbers <= 0), else None."""
    if not isinstance(values, list):
        return None
    if not values:
        return []
    try:
        if set(map(type, values)) - {float, int} or max(values) > 1e-6 or math.isnan(sum(values)):
            return None
    except (TypeError, ValueError, OverflowError):
        return None
    return list(map(float, values))


def parse_completion(data: Any, *, prompt_ids: list[int], max_tokens: int, endpoint: str) -> ParsedCompletion:
    """Validate a 200 answer (its decoded JSON); raises `BadResponse` naming what is wrong."""

    def bad(what: str) -> BadResponse:
        return BadResponse(f"{endpoint}: {what}", endpoint=endpoint)

    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise bad("the response has no choices[0]")
    choice = choices[0]
    finish_reason = choice.get("finish_reason")
    if finish_reason not in FINISH_REASONS:
        raise bad(f"unknown finish_reason {finish_reason!r} (expected one of {sorted(FINISH_REASONS)})")

    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        raise bad("the response has no logprobs: the server must honour `logprobs: 0`")
    logprobs = _as_logprobs(lp.get("token_logprobs"))
    if logprobs is None:
        got = repr(lp.get("token_logprobs"))[:200]
        raise bad(f"logprobs.token_logprobs must be log-probabilities (numbers <= 0), got {got}")
    tokens = lp.get("tokens")
    token_ids = choice.get("token_ids")
    if token_ids is None:
        token_ids = _token_ids_from_logprobs(tokens)
        if token_ids is None:
            raise bad(NO_TOKEN_IDS)
    if not _is_id_list(token_ids):
        raise bad("the token ids must be non-negative integers")
    if (isinstance(tokens, list) and tokens and isinstance(tokens[0], str) and tokens[0].startswith(_TOKEN_ID)
            and tokens != [f"token_id:{t}" for t in token_ids]):
        raise bad("choices[0].token_ids and the 'token_id:N' logprob tokens disagree")
    if len(logprobs) != len(token_ids):
        raise bad(f"{len(token_ids)} token ids but {len(logprobs)} logprobs")
    if len(token_ids) > max_tokens:
        raise bad(f"{len(token_ids)} tokens generated, more than max_tokens={max_tokens}")

    echoed = choice.get("prompt_token_ids")
    if echoed is not None and echoed != prompt_ids:
        raise bad(f"the server saw a different prompt ({len(echoed)} tokens echoed, {len(prompt_ids)} sent)")
    usage = data.get("usage")
    prompt_tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    if type(prompt_tokens) is not int:
        prompt_tokens = len(prompt_ids)
    stop_reason = choice.get("stop_reason")
    if stop_reason is not None and type(stop_reason) not in (int, str):
        raise bad(f"stop_reason must be a token id, a string or null, got {stop_reason!r}")
    text = choice.get("text")
    return ParsedCompletion(token_ids, logprobs, finish_reason, stop_reason,
                            text if isinstance(text, str) else None, prompt_tokens)
