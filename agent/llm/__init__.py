"""The LLM client: token-id completions from OpenAI-compatible (vLLM) endpoints, token-exact.

A prompt goes out as token ids (``/v1/completions``, ``prompt: [ids]``) and the answer comes back as
token ids and their logprobs (vLLM's ``return_token_ids``, and ``logprobs`` with
``return_tokens_as_token_ids`` as the fallback), validated before it is returned: what the learner
trains on is exactly what the model produced. Episodes stick to one endpoint (its prefix cache holds
their context); `LLMClient.assign_endpoint` spreads new ones over the healthy endpoints. Failed attempts
are retried with backoff; an endpoint that keeps failing is drained and probed until it is back.

Modules: `protocol` (the wire format; pure), `transport` (`LeanTransport`, HTTP/1.1 on trio + h11 for
httpx), `client` (`LLMClient`). The fake server for tests and benches is `agent.fake_llm`.

Exceptions::

    LLMError
     ├── EndpointDown      the endpoint is drained, or no attempt reached it: requeue the episode elsewhere
     ├── RequestTimeout    every attempt ran past timeout_s
     ├── BadResponse       200 but unusable: not JSON, no token ids (the server must return them), mismatches
     ├── ContextOverflow   the prompt leaves no room: vLLM's 400, or the local check against max_model_len
     └── RequestRejected   any other 4xx (unknown model, bad parameter); carries `status`
"""

from .client import Completion, EndpointSampler, LLMClient, normalize_endpoint
from .errors import BadResponse, ContextOverflow, EndpointDown, LLMError, RequestRejected, RequestTimeout
from .protocol import NO_TOKEN_IDS
from .transport import LeanTransport

__all__ = [
    "NO_TOKEN_IDS",
    "BadResponse",
    "Completion",
    "ContextOverflow",
    "EndpointDown",
    "EndpointSampler",
    "LLMClient",
    "LLMError",
    "LeanTransport",
    "RequestRejected",
    "RequestTimeout",
    "normalize_endpoint",
]
