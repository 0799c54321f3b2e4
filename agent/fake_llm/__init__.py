"""A fake OpenAI-compatible completions server that speaks vLLM's token-id fields, for tests and benches.

Routes: ``POST /v1/completions`` (token-id prompts; answers with ``choices[0].token_ids`` and
``prompt_token_ids`` when asked with ``return_token_ids``, and ``logprobs.tokens`` as ``"token_id:N"``
with ``return_tokens_as_token_ids``), ``GET /v1/models`` (with ``max_model_len``) and ``GET /health``.

What it answers comes from a `Policy` (scripted, random, echo, or any object the caller plugs in, such
as an oracle that solves toy tasks). Latency (fixed or drawn), a token rate, and faults (500s, hangs,
disconnects mid-response, malformed JSON, responses without token ids, ``finish_reason: abort``,
context-length errors above `max_model_len`) are configurable.

Three ways to run it:

* in process as an httpx transport: ``FakeTransport({"http://a:8000": FakeLLM(...)})``;
* in process on a socket: ``async with open_fake_server(FakeLLM(...)) as url: ...`` (or `serve_http`
  under a nursery);
* in its own process: ``python -m agent.fake_llm --port 8000 --policy random --error-rate 0.1``.
"""

from .policies import CompletionRequest, EchoPolicy, Generation, Policy, RandomPolicy, ScriptedPolicy, fake_logprob
from .server import Faults, FakeLLM, FakeTransport, Reply, open_fake_server, parse_latency, serve_http

__all__ = [
    "CompletionRequest",
    "EchoPolicy",
    "FakeLLM",
    "FakeTransport",
    "Faults",
    "Generation",
    "Policy",
    "RandomPolicy",
    "Reply",
    "ScriptedPolicy",
    "fake_logprob",
    "open_fake_server",
    "parse_latency",
    "serve_http",
]
