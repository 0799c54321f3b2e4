"""The OpenAI/vLLM completions protocol as pure data: request validation, stop rules, responses.

No I/O and no torch here (h11-style): `parse_completion_request` turns a JSON body into a validated
`CompletionRequest` or raises `BadRequest` naming the field; `completion_response` turns the engine's
`Completion`s back into the JSON vLLM would send. `IncrementalDetokenizer` and `check_stop_strings`
are the text side of the stop rules, ported from vLLM v1 (`vllm/v1/engine/detokenizer.py`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BadRequest", "Completion", "CompletionRequest", "Conflict", "IncrementalDetokenizer", "ModelNotFound",
    "SamplingParams", "ServeError", "ServerBusy", "UpdateRejected", "check_stop_strings",
    "completion_response", "error_body", "parse_completion_request",
]

LOGPROB_FLOOR = -9999.0  # vLLM clamps -inf logprobs to this in JSON responses
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs


class ServeError(Exception):
    """Base of the server's errors; `status` is the HTTP status, `param` the offending request field."""

    status = 500
    kind = "InternalServerError"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class BadRequest(ServeError):
    """The request is malformed or asks for something this server does not do (the client's fault)."""

    status = 400
    kind = "BadRequestError"


class UpdateRejected(BadRequest):
    """A weight update was refused (unknown name, wrong shape, non-finite values); old weights serve on."""


class ModelNotFound(ServeError):
    status = 404
    kind = "NotFoundError"


class Conflict(ServeError):
    """The request is valid but out of order, e.g. `update_weights` without `start_weight_update`."""

    status = 409
    kind = "ConflictError"


class ServerBusy(ServeError):
    """The waiting queue is full, or the server stayed paused longer than the request may wait."""

    status = 503
    kind = "ServiceUnavailableError"


def error_body(exc: ServeError) -> dict[str, Any]:
    """vLLM's `ErrorResponse` shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": str(exc), "type": exc.kind, "param": exc.param, "code": exc.status}}


@dataclass(frozen=True)
class SamplingParams:
    """vLLM `SamplingParams` subset; defaults are vLLM's for `/v1/completions`."""

    max_tokens: int = 16
    temperature: float = 1.0  # < 1e-5 means greedy, as in vLLM (_SAMPLING_EPS)
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    seed: int | None = None  # None: drawn from the server's seeded stream
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # top alternatives per token in the HTTP response; None: no logprobs object

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_float("temperature", self.temperature, minimum=0.0)
        _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise BadRequest(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        _check_int("top_k", self.top_k, minimum=-1)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=-(2**63))
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
            raise BadRequest(f"stop must be a string or a list of non-empty strings, got {stop!r}", param="stop")
        set_(self, "stop", tuple(stop))
        if not isinstance(self.stop_token_ids, Sequence):
            raise BadRequest("stop_token_ids must be a list of ints", param="stop_token_ids")
        for i, t in enumerate(self.stop_token_ids):
            _check_int(f"stop_token_ids[{i}]", t, minimum=0)
        set_(self, "stop_token_ids", tuple(self.stop_token_ids))
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise BadRequest(f"{name} must be a bool, got {getattr(self, name)!r}", param=name)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0)
            if self.logprobs > MAX_LOGPROBS:
                raise BadRequest(f"logprobs must be <= {MAX_LOGPROBS}, got {self.logprobs}", param="logprobs")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, got {value!r}", param=name)
    if value < minimum:
        raise BadRequest(f"{name} must be >= {minimum}, got {value}", param=name)


def _check_float(name: str, value: Any, *, minimum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a finite number, got {value!r}", param=name)
    if minimum is not None and value < minimum:
        raise BadRequest(f"{name} must be >= {minimum}, got {value}", param=name)


@dataclass(frozen=True)
class Completion:
    """One generated sequence. `logprobs[i]` is the logprob of `token_ids[i]` (see `logprobs_mode`)."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "abort"
    stop_reason: int | str | None  # the stop token id or stop string; None for EOS, length and abort
    text: str
    prompt_token_ids: list[int] = field(repr=False)
    policy_version: int = 0  # weights that sampled the first token
    top_logprobs: list[dict[int, float]] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class CompletionRequest:
    prompts: list[list[int]]
    params: SamplingParams
    n: int = 1
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False


# Fields a vLLM client may send that this server accepts only at their default (None also accepted).
_DEFAULT_ONLY: dict[str, Any] = {
    "stream": False, "echo": False, "best_of": 1, "suffix": None, "frequency_penalty": 0.0,
    "presence_penalty": 0.0, "repetition_penalty": 1.0, "min_p": 0.0, "min_tokens": 0, "logit_bias": None,
    "stream_options": None, "prompt_logprobs": None, "truncate_prompt_tokens": None, "priority": 0,
    "spaces_between_special_tokens": True, "response_format": None, "structured_outputs": None,
}
_ANY_VALUE = frozenset({"user", "request_id", "cache_salt", "add_special_tokens"})
_PARAM_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
                 "include_stop_str_in_output", "skip_special_tokens", "logprobs")
_OWN_FIELDS = frozenset({"model", "prompt", "n", "return_token_ids", "return_tokens_as_token_ids", *_PARAM_FIELDS})


def parse_completion_request(body: Any, *, model_name: str, vocab_size: int, max_model_len: int,
                             tokenizer: Any = None) -> CompletionRequest:
    """Validate a `/v1/completions` JSON body. Raises `BadRequest` (field named) or `ModelNotFound`."""
    if not isinstance(body, Mapping):
        raise BadRequest("request body must be a JSON object")
    for key, value in body.items():
        if key in _OWN_FIELDS or key in _ANY_VALUE:
            continue
        if key not in _DEFAULT_ONLY:
            raise BadRequest(f"unknown field {key!r}", param=key)
        if value is not None and value != _DEFAULT_ONLY[key]:
            raise BadRequest(f"{key}={value!r} is not supported by the embedded server "
                             f"(only {_DEFAULT_ONLY[key]!r})", param=key)
    model = body.get("model")
    if model is not None and model != model_name:
        raise ModelNotFound(f"The model `{model}` does not exist (serving `{model_name}`).", param="model")
    kwargs = {k: body[k] for k in _PARAM_FIELDS if body.get(k) is not None}
    if "stop" in kwargs and isinstance(kwargs["stop"], list):
        kwargs["stop"] = tuple(kwargs["stop"])
    params = SamplingParams(**kwargs)
    for i, t in enumerate(params.stop_token_ids):
        if t >= vocab_size:
            raise BadRequest(f"stop_token_ids[{i}]={t} is outside the vocabulary ({vocab_size})",
                             param="stop_token_ids")
    n = body.get("n", 1) if body.get("n") is not None else 1
    _check_int("n", n, minimum=1)
    flags = {}
    for name in ("return_token_ids", "return_tokens_as_token_ids"):
        value = body.get(name) or False
        if not isinstance(value, bool):
            raise BadRequest(f"{name} must be a bool, got {value!r}", param=name)
        flags[name] = value
    prompts = _parse_prompts(body.get("prompt"), vocab_size=vocab_size, tokenizer=tokenizer,
                             add_special_tokens=body.get("add_special_tokens", True))
    for i, ids in enumerate(prompts):
        if len(ids) + params.max_tokens > max_model_len:
            raise BadRequest(f"'max_tokens' is too large: {params.max_tokens}. This model's maximum context "
                             f"length is {max_model_len} tokens and prompt {i} has {len(ids)} input tokens.",
                             param="max_tokens")
    return CompletionRequest(prompts, params, n, **flags)


def _parse_prompts(prompt: Any, *, vocab_size: int, tokenizer: Any, add_special_tokens: bool) -> list[list[int]]:
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)):
        if tokenizer is None:
            raise BadRequest("text prompts need a tokenizer; send token ids", param="prompt")
        texts = [prompt] if isinstance(prompt, str) else prompt
        prompts = [list(tokenizer.encode(t, add_special_tokens=add_special_tokens)) for t in texts]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list):
        prompts = [prompt]
    else:
        raise BadRequest(f"prompt must be token ids, a list of token-id lists, or text; got {prompt!r:.80}",
                         param="prompt")
    for i, ids in enumerate(prompts):
        if not ids:
            raise BadRequest(f"prompt {i} is empty", param="prompt")
        for j, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise BadRequest(f"prompt[{i}][{j}]={t!r} is not a token id in [0, {vocab_size})", param="prompt")
    return [list(ids) for ids in prompts]


def completion_response(request: CompletionRequest, results: Sequence[Completion], *, request_id: str,
                        created: int, model_name: str, tokenizer: Any) -> dict[str, Any]:
    """The JSON of a non-streaming vLLM `CompletionResponse`; `results` are in choice order."""
    choices = []
    for index, c in enumerate(results):
        choice: dict[str, Any] = {
            "index": index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason, "prompt_logprobs": None,
            "token_ids": list(c.token_ids) if request.return_token_ids else None,
            "prompt_token_ids": list(c.prompt_token_ids) if request.return_token_ids else None,
        }
        if request.params.logprobs is not None:
            choice["logprobs"] = _logprobs_json(c, request.return_tokens_as_token_ids, tokenizer)
        choices.append(choice)
    prompt_tokens = sum(len(p) for p in request.prompts)
    completion_tokens = sum(len(c.token_ids) for c in results)
    return {
        "id": request_id, "object": "text_completion", "created": created, "model": model_name,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        # Extension (not in vLLM): the weights that sampled these choices, for the trajectory record.
        "policy_version": min((c.policy_version for c in results), default=0),
    }


def _logprobs_json(c: Completion, as_ids: bool, tokenizer: Any) -> dict[str, Any]:
    def token_str(t: int) -> str:
        return f"token_id:{t}" if as_ids or tokenizer is None else tokenizer.decode([t])

    tokens = [token_str(t) for t in c.token_ids]
    offsets, pos = [], 0
    for s in tokens:
        offsets.append(pos)
        pos += 0 if as_ids else len(s)
    tops = []
    for i, (t, lp) in enumerate(zip(c.token_ids, c.logprobs)):
        top = {token_str(k): max(v, LOGPROB_FLOOR) for k, v in (c.top_logprobs[i] if c.top_logprobs else {}).items()}
        top[token_str(t)] = max(lp, LOGPROB_FLOOR)
        tops.append(top)
    return {"text_offset": offsets, "token_logprobs": [max(lp, LOGPROB_FLOOR) for lp in c.logprobs],
            "tokens": tokens, "top_logprobs": tops}


class IncrementalDetokenizer:
    """Text of a growing token sequence, decoded a few tokens at a time (vLLM's prefix/read offsets).

    Each `push` decodes only the window since the last complete character, so a turn of T tokens costs
    O(T) decode work instead of O(T^2); a byte-level token that ends inside a UTF-8 character adds no
    text until the character completes.
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> int:
        """Append one token; returns how many characters `text` grew by."""
        self.ids.append(token_id)
        if self.tokenizer is None:
            return 0
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self._prefix:self._read], skip_special_tokens=self.skip_special_tokens)
        new_text = decode(self.ids[self._prefix:], skip_special_tokens=self.skip_special_tokens)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return 0
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return len(delta)


def check_stop_strings(text: str, new_char_count: int, stop: Sequence[str],
                       include_in_output: bool) -> tuple[str, int] | None:
    """``(stop_string, truncate_to)`` when a stop string completes in the last `new_char_count` chars.

    vLLM v1 semantics: only the tail can hold a new match (searched from ``new_char_count +
    len(stop) - 1`` back); the earliest-completing stop string wins, ties go to list order;
    `truncate_to` is where the text is cut (before the stop string, or after it when it is
    included), -1 for no cut. Token ids are never cut: they keep every sampled token.
    """
    if not new_char_count or not stop:
        return None
    best: tuple[int, str, int] | None = None
    for stop_str in stop:
        index = text.find(stop_str, max(0, len(text) + 1 - new_char_count - len(stop_str)))
        if index == -1:
            continue
        end = index + len(stop_str)
        if best is None or end < best[0]:
            best = (end, stop_str, index)
    if best is None:
        return None
    end, stop_str, index = best
    if include_in_output:
        return stop_str, (-1 if end >= len(text) else end)
    return stop_str, index
