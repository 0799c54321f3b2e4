"""The LLM client's exceptions (the tree is drawn in `agent.llm`'s docstring)."""

from __future__ import annotations

__all__ = ["BadResponse", "ContextOverflow", "EndpointDown", "LLMError", "RequestRejected", "RequestTimeout"]


class LLMError(Exception):
    """Base of the client's errors; `endpoint` is the endpoint's base URL when one is concerned."""

    def __init__(self, message: str, *, endpoint: str | None = None) -> None:
        super().__init__(message)
        self.endpoint = endpoint


class EndpointDown(LLMError):
    """The endpoint is drained (dead), or every attempt failed to reach it: requeue the episode elsewhere."""


class RequestTimeout(LLMError):
    """Every attempt hit `timeout_s` without an answer."""


class BadResponse(LLMError):
    """The server answered 200 with something unusable: not JSON, no token ids, logprobs that do not match."""


class ContextOverflow(LLMError):
    """The prompt leaves no room to generate (vLLM's 400 for a too-long request, or the local check)."""


class RequestRejected(LLMError):
    """Any other 4xx: the request itself is wrong (unknown model, bad parameter); not retried."""

    def __init__(self, message: str, *, endpoint: str | None = None, status: int) -> None:
        super().__init__(message, endpoint=endpoint)
        self.status = status
