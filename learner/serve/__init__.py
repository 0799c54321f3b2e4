"""The embedded policy server: an OpenAI/vLLM-compatible sampler on `transformers`, CPU or one GPU.

It owns sampling for the embedded default run (in-process, no socket) and can run on its own
(``python -m learner.serve --model DIR --port N``). It speaks the subset of vLLM's HTTP API that the
agent and the learner use, with vLLM's names and payloads, so one client serves both:

- ``POST /v1/completions`` with token-id prompts, returning token ids (``return_token_ids``),
  per-token logprobs (``logprobs``, ``return_tokens_as_token_ids``), ``finish_reason`` and
  ``stop_reason``; ``GET /v1/models``, ``GET /health``.
- vLLM's RL routes (dev mode, ``VLLM_SERVER_DEV_MODE=1``): ``/pause``, ``/resume``, ``/is_paused``,
  ``/init_weight_transfer_engine``, ``/start_weight_update``, ``/update_weights``,
  ``/finish_weight_update``, ``/weight_info``, ``/get_world_size``; plus ``/policy_version``.

Sources (vllm-project/vllm, main as of this writing):
``vllm/entrypoints/openai/completion/protocol.py`` (CompletionRequest / CompletionResponseChoice:
``token_ids``, ``prompt_token_ids``, ``stop_reason``; CompletionLogProbs), ``vllm/v1/sample/sampler.py``
(``logprobs_mode="raw_logprobs"`` default: logprobs of the raw logits, before temperature and top-k/p),
``vllm/v1/core/sched/utils.py`` (``check_stop``: EOS, then ``stop_token_ids`` with the token kept in the
output and ``stop_reason`` = the id, then the length cap), ``vllm/v1/engine/detokenizer.py``
(``check_stop_strings``), ``vllm/entrypoints/serve/dev/rlhf/api_router.py`` (RL routes, pause modes
``abort|wait|keep``, ``weight_version``), ``vllm/distributed/weight_transfer/{ipc,disk,nccl}_engine.py``
(update payloads), ``examples/rl/rlhf_http_nccl.py`` (the order of calls).

Deviations, by design or assumption: no streaming, no penalties/logit_bias/echo (400 naming the
field); ``n > 1`` with a seed gives choice j the seed ``seed + j`` (vLLM draws all n from one generator);
a request without a seed draws one from the server's seeded stream (``ServeConfig.seed``), so a
whole run is reproducible; an aborted request returns its partial tokens with ``finish_reason="abort"``;
the response carries an extra top-level ``policy_version``. Weight updates take the ``ipc`` backend
(in-process tensors) or the ``disk`` backend (a safetensors directory); NCCL is vLLM's.

Batching: continuous, at token granularity (requests join and leave the decode batch between steps);
the G rollouts of a task share one prefill; the next turn of an episode reuses the previous turn's KV
cache (`ServeConfig.prefix_cache_tokens`, cleared on every weight update). Seeded sampling uses one
generator per request, so a request's tokens do not depend on what it was batched with (logprobs
agree to float32 rounding, ~1e-5).

Modules: `protocol` (pure request/response/stop rules), `engine` (batched decoding, torch),
`weights` (update sources and validation), `server` (the trio state machine), `http` (routes, h11
server, in-process httpx transport).

Exceptions (`protocol`)::

    ServeError (500)
     +-- BadRequest (400)            a field is invalid or unsupported; `param` names it
     |    +-- UpdateRejected (400)   a weight update was refused; the old weights keep serving
     +-- ModelNotFound (404)
     +-- Conflict (409)              weight-update calls out of order
     +-- ServerBusy (503)            queue full, paused for longer than pause_wait_s, or stopped
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import trio

from .engine import BatchStats, LogprobsMode
from .http import InProcessTransport, Router, serve_http
from .protocol import (BadRequest, Completion, Conflict, ModelNotFound, SamplingParams, ServeError, ServerBusy,
                       UpdateRejected)
from .server import PAUSE_MODES, PolicyServer, ServeConfig
from .weights import shared_tensors

__all__ = [
    "PAUSE_MODES", "BadRequest", "BatchStats", "Completion", "Conflict", "InProcessTransport", "LogprobsMode",
    "ModelNotFound", "PolicyServer", "Router", "SamplingParams", "ServeConfig", "ServeError", "ServerBusy",
    "UpdateRejected", "open_policy_server", "serve_http", "shared_tensors",
]


@contextlib.asynccontextmanager
async def open_policy_server(model: Any, tokenizer: Any, config: ServeConfig = ServeConfig(), *,
                             policy_version: int = 0, http_port: int | None = None,
                             host: str = "127.0.0.1") -> AsyncIterator[PolicyServer]:
    """Run a `PolicyServer` for the duration of the block; with `http_port` (0: any free port) also
    serve its routes on TCP and set `server.http_url`."""
    server = PolicyServer(model, tokenizer, config, policy_version=policy_version)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        if http_port is not None:
            port = await nursery.start(serve_http, server, host, http_port)
            server.http_url = f"http://{host}:{port}"
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()
