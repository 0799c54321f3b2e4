"""The completions protocol without a model: request validation, stop rules, detokenizing, responses."""

from __future__ import annotations

import pytest
import torch

from learner.serve.engine import SequenceState
from learner.serve.protocol import (BadRequest, Completion, IncrementalDetokenizer, ModelNotFound, SamplingParams,
                                    check_stop_strings, completion_response, parse_completion_request)
from learner.tiny import shared_tokenizer


@pytest.fixture(scope="module")
def tok():
    return shared_tokenizer()


def parse(body, **kw):
    return parse_completion_request(body, model_name="policy", vocab_size=549, max_model_len=64, **kw)


def test_check_stop_strings_vllm_rules():
    # a stop string straddling the previous text and the new chars is found
    assert check_stop_strings("abc</fun", 4, ["</fun"], False) == ("</fun", 3)
    # text checked before the new chars is not searched again
    assert check_stop_strings("</fun>xyz", 3, ["</fun>"], False) is None
    # the earliest-completing stop wins, whatever the list order
    assert check_stop_strings("a STOP b END", 12, ["END", "STOP"], False) == ("STOP", 2)
    # included in the output: cut after it, or no cut when it ends the text
    assert check_stop_strings("x END y", 7, ["END"], True) == ("END", 5)
    assert check_stop_strings("x END", 5, ["END"], True) == ("END", -1)
    assert check_stop_strings("x END", 0, ["END"], False) is None


def test_incremental_detokenizer_matches_full_decode(tok):
    text = "def héllo(x):\n    return '✓ 世界' + x  # naïve\n"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    grown = [detok.push(t) for t in ids]
    assert detok.text == tok.decode(ids) == text
    assert sum(grown) == len(text)
    assert 0 in grown  # byte tokens inside a multi-byte character add no text until it completes


def sequence(tok, **params):
    return SequenceState([1, 2, 3], SamplingParams(**params), generator=torch.Generator(),
                         eos_token_ids=[tok.eos_token_id], max_model_len=64, tokenizer=tok, policy_version=5)


def test_stop_token_id_ends_with_stop_and_keeps_the_token(tok):
    s = sequence(tok, max_tokens=10, stop_token_ids=[7])
    for t in (40, 41, 7):
        s.append(t, -1.0, None)
    r = s.result()
    assert (r.finish_reason, r.stop_reason, r.token_ids) == ("stop", 7, [40, 41, 7])
    assert r.text == tok.decode([40, 41])  # the stop token's text is left out
    assert r.policy_version == 5


def test_eos_stops_unless_ignored(tok):
    s = sequence(tok, max_tokens=10)
    s.append(tok.eos_token_id, -1.0, None)
    assert (s.finish_reason, s.stop_reason) == ("stop", None)
    s = sequence(tok, max_tokens=10, ignore_eos=True)
    s.append(tok.eos_token_id, -1.0, None)
    assert not s.finished


def test_max_tokens_gives_length_and_stop_string_overrides_it(tok):
    s = sequence(tok, max_tokens=2)
    s.append(40, -1.0, None)
    assert not s.finished
    s.append(41, -1.0, None)
    assert (s.finish_reason, s.stop_reason) == ("length", None)
    piece = tok.decode([41])
    s = sequence(tok, max_tokens=2, stop=[piece])
    s.append(40, -1.0, None)
    s.append(41, -1.0, None)
    r = s.result()
    assert (r.finish_reason, r.stop_reason) == ("stop", piece)
    assert r.token_ids == [40, 41] and r.text == tok.decode([40])  # ids keep every token, text is cut


def test_context_length_ends_generation(tok):
    s = SequenceState(list(range(60)), SamplingParams(max_tokens=100), generator=torch.Generator(),
                      eos_token_ids=[], max_model_len=62, tokenizer=tok, policy_version=0)
    s.append(40, -1.0, None)
    assert not s.finished
    s.append(40, -1.0, None)
    assert s.finish_reason == "length"


@pytest.mark.parametrize(("body", "param", "exc"), [
    ({"prompt": [1, 2], "bogus": 1}, "bogus", BadRequest),
    ({"prompt": [1, 2], "stream": True}, "stream", BadRequest),
    ({"prompt": [1, 2], "presence_penalty": 0.5}, "presence_penalty", BadRequest),
    ({"prompt": [1, 999]}, "prompt", BadRequest),
    ({"prompt": []}, "prompt", BadRequest),
    ({"prompt": [1, 2], "max_tokens": 63}, "max_tokens", BadRequest),
    ({"prompt": [1, 2], "max_tokens": 0}, "max_tokens", BadRequest),
    ({"prompt": [1, 2], "temperature": -1}, "temperature", BadRequest),
    ({"prompt": [1, 2], "top_p": 0}, "top_p", BadRequest),
    ({"prompt": [1, 2], "stop": ["ok", ""]}, "stop", BadRequest),
    ({"prompt": [1, 2], "stop_token_ids": [600]}, "stop_token_ids", BadRequest),
    ({"prompt": [1, 2], "logprobs": 21}, "logprobs", BadRequest),
    ({"prompt": [1, 2], "return_token_ids": "yes"}, "return_token_ids", BadRequest),
    ({"prompt": [1, 2], "model": "gpt-4"}, "model", ModelNotFound),
])
def test_bad_requests_name_the_field(body, param, exc):
    with pytest.raises(exc) as info:
        parse(body)
    assert info.value.param == param
    assert param in str(info.value) or param in ("prompt", "model")


def test_parse_accepts_vllm_shapes(tok):
    req = parse({"prompt": [[1, 2], [3]], "stop": "END", "max_tokens": 5, "n": 2, "stream": False,
                 "user": "x", "return_token_ids": True, "presence_penalty": 0.0})
    assert req.prompts == [[1, 2], [3]] and req.n == 2 and req.params.stop == ("END",)
    assert parse({"prompt": "def add"}, tokenizer=tok).prompts == [tok.encode("def add")]


def test_response_fields(tok):
    req = parse({"prompt": [1, 2], "logprobs": 0, "return_token_ids": True, "return_tokens_as_token_ids": True})
    c = Completion(token_ids=[40, 7], logprobs=[-0.5, float("-inf")], finish_reason="stop", stop_reason=7,
                   text="x", prompt_token_ids=[1, 2], policy_version=3)
    body = completion_response(req, [c], request_id="cmpl-1", created=0, model_name="policy", tokenizer=tok)
    choice = body["choices"][0]
    assert choice["token_ids"] == [40, 7] and choice["prompt_token_ids"] == [1, 2]
    assert choice["logprobs"]["tokens"] == ["token_id:40", "token_id:7"]
    assert choice["logprobs"]["token_logprobs"] == [-0.5, -9999.0]  # vLLM's floor for -inf
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", 7)
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    assert body["policy_version"] == 3
    plain = completion_response(parse({"prompt": [1, 2]}), [c], request_id="cmpl-1", created=0,
                                model_name="policy", tokenizer=tok)["choices"][0]
    assert plain["token_ids"] is None and plain["logprobs"] is None
