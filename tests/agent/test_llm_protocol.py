"""agent.llm.protocol: the request body, response validation and error classification (pure, no I/O)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.fake_llm import CompletionRequest, FakeLLM, Generation
from agent.llm import BadResponse, ContextOverflow, RequestRejected
from agent.llm.protocol import classify_error, completion_body, parse_completion

E = "http://e:1"


def response(**choice) -> dict:
    """vLLM's answer for ids [5, 6], logprobs [-0.5, -1.0]; `choice` replaces fields of choices[0]."""
    base = {"index": 0, "text": "x", "finish_reason": "stop", "stop_reason": None,
            "token_ids": [5, 6], "prompt_token_ids": [1, 2],
            "logprobs": {"tokens": ["token_id:5", "token_id:6"], "token_logprobs": [-0.5, -1.0],
                         "top_logprobs": [], "text_offset": []}}
    base.update(choice)
    return {"choices": [base], "usage": {"prompt_tokens": 2, "completion_tokens": 2}}


def parse(data, max_tokens=8):
    return parse_completion(data, prompt_ids=[1, 2], max_tokens=max_tokens, endpoint=E)


def test_a_valid_response():
    p = parse(response())
    assert (p.token_ids, p.logprobs, p.finish_reason, p.stop_reason, p.text, p.prompt_tokens) == \
        ([5, 6], [-0.5, -1.0], "stop", None, "x", 2)
    p = parse(response(token_ids=None, stop_reason=7) | {"usage": None})  # ids from "token_id:N" only
    assert p.token_ids == [5, 6] and p.stop_reason == 7 and p.prompt_tokens == 2


@pytest.mark.parametrize("change, message", [
    ({"finish_reason": "weird"}, "unknown finish_reason"),
    ({"logprobs": None}, "no logprobs"),
    ({"token_ids": None, "logprobs": {"tokens": ["a", "b"], "token_logprobs": [-1.0, -1.0]}}, "must return token ids"),
    ({"token_ids": [5, 7]}, "disagree"),
    ({"token_ids": [5, "6"], "logprobs": {"tokens": ["a", "b"], "token_logprobs": [-1.0, -1.0]}},
     "non-negative integers"),
    ({"token_ids": None, "logprobs": {"tokens": ["token_id:5", "token_id:-6"], "token_logprobs": [-1.0, -1.0]}},
     "non-negative integers"),
    ({"logprobs": {"tokens": ["token_id:5", "token_id:6"], "token_logprobs": [-1.0]}}, "2 token ids but 1 logprobs"),
    ({"logprobs": {"tokens": ["token_id:5", "token_id:6"], "token_logprobs": [-1.0, 0.5]}}, "log-probabilities"),
    ({"logprobs": {"tokens": ["token_id:5", "token_id:6"], "token_logprobs": [-1.0, None]}}, "log-probabilities"),
    ({"logprobs": {"tokens": ["token_id:5", "token_id:6"], "token_logprobs": [-1.0, float("nan")]}},
     "log-probabilities"),
    ({"logprobs": {"tokens": ["token_id:5", "token_id:6"], "token_logprobs": [-1.0, True]}}, "log-probabilities"),
    ({"prompt_token_ids": [1, 3]}, "different prompt"),
    ({"stop_reason": [1]}, "stop_reason"),
])
def test_bad_responses_say_what_is_wrong(change, message):
    with pytest.raises(BadResponse, match=message) as info:
        parse(response(**change))
    assert info.value.endpoint == E


def test_more_tokens_than_asked_for_is_bad():
    with pytest.raises(BadResponse, match="more than max_tokens=1"):
        parse(response(), max_tokens=1)
    with pytest.raises(BadResponse, match="no choices"):
        parse({"choices": []})
    with pytest.raises(BadResponse, match="no choices"):
        parse([1])


@pytest.mark.parametrize("message", [
    "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (4000 in the "
    "messages, 1000 in the completion). Please reduce the length of the messages or completion.",
    "You passed 4000 input tokens and requested 200 output tokens. However, the model's context length is only "
    "4096 tokens, resulting in a maximum input length of 3896 tokens. Please reduce the length of the input prompt.",
    "The decoder prompt (length 5000) is longer than the maximum model length of 4096. Make sure that "
    "`max_model_len` is no smaller than the number of text tokens.",
    "max_tokens must be at least 1, got -186.",
])
@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_vllm_context_errors_are_context_overflow(message, layout):
    fields = {"message": message, "type": "BadRequestError", "param": None, "code": 400}
    body = json.dumps({"error": fields} if layout == "nested" else {"object": "error", **fields}).encode()
    error, text = classify_error(400, body, E)
    assert isinstance(error, ContextOverflow) and text == message


def test_other_errors():
    assert classify_error(500, b'{"error": {"message": "boom"}}', E) == (None, "boom")
    assert classify_error(503, b"Service Unavailable", E) == (None, "Service Unavailable")
    assert classify_error(429, b"{}", E)[0] is None
    error, _ = classify_error(404, b'{"error": {"message": "The model `x` does not exist."}}', E)
    assert isinstance(error, RequestRejected) and error.status == 404
    error, text = classify_error(422, b'{"detail": [{"loc": ["body", "prompt"]}]}', E)
    assert isinstance(error, RequestRejected) and "prompt" in text


def test_request_body_uses_vllm_field_names():
    body = json.loads(completion_body([1, 2], model="m", max_tokens=3, temperature=0.7, top_p=0.9, stop=["x"],
                                      stop_token_ids=[9], seed=4, extra={"top_k": 20, "temperature": 0.5}))
    assert body == {"prompt": [1, 2], "max_tokens": 3, "temperature": 0.5, "top_p": 0.9, "logprobs": 0,
                    "return_tokens_as_token_ids": True, "include_stop_str_in_output": True, "model": "m",
                    "return_token_ids": True, "stop": ["x"], "stop_token_ids": [9], "seed": 4, "top_k": 20}
    body = json.loads(completion_body([1], model=None, max_tokens=3, temperature=1.0, top_p=1.0,
                                      return_token_ids=False))
    assert "model" not in body and "return_token_ids" not in body and "stop" not in body

    class NotAnInt:
        pass

    with pytest.raises(ValueError, match="prompt_ids"):
        completion_body([NotAnInt()], model=None, max_tokens=3, temperature=1.0, top_p=1.0)


@given(ids=st.lists(st.integers(0, 2**31), min_size=1, max_size=40),
       lps=st.lists(st.floats(max_value=0.0, allow_nan=False, allow_infinity=False), min_size=40, max_size=40),
       return_token_ids=st.booleans())
def test_the_fake_and_the_parser_agree_exactly(ids, lps, return_token_ids):
    """Whatever ids and logprobs a policy produces survive JSON both ways, bit for bit."""
    fake = FakeLLM()
    request = CompletionRequest(prompt_ids=[3, 4], max_tokens=64, logprobs=0, return_token_ids=return_token_ids,
                                return_tokens_as_token_ids=True)
    wire = json.dumps(fake._response(request, Generation(ids, lps[: len(ids)]), False)).encode()
    p = parse_completion(json.loads(wire), prompt_ids=[3, 4], max_tokens=64, endpoint=E)
    assert p.token_ids == ids and p.logprobs == lps[: len(ids)]
