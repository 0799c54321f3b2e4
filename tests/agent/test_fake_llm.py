"""The fake vLLM server: vLLM's fields and response shape, policies, stopping, faults, its three fronts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from agent.fake_llm import (
    EchoPolicy,
    FakeLLM,
    FakeTransport,
    Faults,
    Generation,
    RandomPolicy,
    ScriptedPolicy,
    fake_logprob,
    open_fake_server,
    parse_latency,
)

URL = "http://fake:8000"
ROOT = Path(__file__).resolve().parents[2]


def body(**fields) -> bytes:
    return json.dumps({"prompt": [1, 2, 3], "max_tokens": 8, **fields}).encode()


async def complete(fake: FakeLLM, **fields) -> tuple[int, dict]:
    reply = await fake.handle("POST", "/v1/completions", body(**fields))
    return reply.status, json.loads(reply.body)


async def test_answers_with_vllm_token_id_fields():
    fake = FakeLLM(ScriptedPolicy([Generation([7, 8, 9], [-0.5, -0.25, -2.0])]))
    status, data = await complete(fake, logprobs=0, return_token_ids=True, return_tokens_as_token_ids=True)
    assert status == 200
    choice = data["choices"][0]
    assert choice["token_ids"] == [7, 8, 9]
    assert choice["prompt_token_ids"] == [1, 2, 3]
    assert choice["logprobs"]["tokens"] == ["token_id:7", "token_id:8", "token_id:9"]
    assert choice["logprobs"]["token_logprobs"] == [-0.5, -0.25, -2.0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                             "prompt_tokens_details": None}
    assert data["object"] == "text_completion"


async def test_without_the_flags_there_are_no_token_ids():
    fake = FakeLLM(ScriptedPolicy([[7, 8]]))
    _, data = await complete(fake, logprobs=0)
    choice = data["choices"][0]
    assert choice["token_ids"] is None and choice["prompt_token_ids"] is None
    assert choice["logprobs"]["tokens"] == ["<7>", "<8>"]
    assert choice["logprobs"]["token_logprobs"] == [fake_logprob(7, 0), fake_logprob(8, 1)]
    _, data = await complete(fake)
    assert data["choices"][0]["logprobs"] is None


async def test_old_vllm_ignores_return_token_ids():
    fake = FakeLLM(ScriptedPolicy([[7, 8]]), supports_return_token_ids=False)
    _, data = await complete(fake, logprobs=0, return_token_ids=True, return_tokens_as_token_ids=True)
    assert data["choices"][0]["token_ids"] is None
    assert data["choices"][0]["logprobs"]["tokens"] == ["token_id:7", "token_id:8"]


async def test_stops_like_vllm():
    fake = FakeLLM(ScriptedPolicy([[5, 6, 99, 7]]))
    _, data = await complete(fake, stop_token_ids=[99], return_token_ids=True)
    choice = data["choices"][0]
    assert choice["token_ids"] == [5, 6, 99]  # the stop token is generated, so it is kept
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", 99)

    _, data = await complete(fake, max_tokens=2, return_token_ids=True)
    assert data["choices"][0]["token_ids"] == [5, 6]
    assert data["choices"][0]["finish_reason"] == "length"

    eos = FakeLLM(ScriptedPolicy([[5, 2, 6]]), eos_token_id=2)
    _, data = await complete(eos, return_token_ids=True)
    assert data["choices"][0]["token_ids"] == [5, 2]
    assert (data["choices"][0]["finish_reason"], data["choices"][0]["stop_reason"]) == ("stop", None)


async def test_stop_strings_need_a_decoder():
    letters = {1: "a", 2: "b", 3: "</", 4: "x>", 5: "c"}
    fake = FakeLLM(ScriptedPolicy([[1, 2, 3, 4, 5]]), decode=lambda ids: "".join(letters[i] for i in ids))
    _, data = await complete(fake, stop=["</x>"], return_token_ids=True)
    choice = data["choices"][0]
    assert choice["token_ids"] == [1, 2, 3, 4]
    assert (choice["finish_reason"], choice["stop_reason"], choice["text"]) == ("stop", "</x>", "ab")
    _, data = await complete(fake, stop=["</x>"], include_stop_str_in_output=True)
    assert data["choices"][0]["text"] == "ab</x>"


async def test_policies():
    scripted = ScriptedPolicy(["hi", [4, 5]], tokenizer=lambda s: [ord(c) for c in s])
    fake = FakeLLM(scripted)
    ids = [(await complete(fake, return_token_ids=True))[1]["choices"][0]["token_ids"] for _ in range(3)]
    assert ids == [[104, 105], [4, 5], [4, 5]]  # the last response repeats

    seeded = FakeLLM(RandomPolicy(vocab_size=100, length=6, seed=1))
    a = (await complete(seeded, seed=42, return_token_ids=True))[1]["choices"][0]["token_ids"]
    b = (await complete(seeded, seed=42, return_token_ids=True))[1]["choices"][0]["token_ids"]
    c = (await complete(seeded, return_token_ids=True))[1]["choices"][0]["token_ids"]
    assert a == b and len(a) == 6 and all(0 <= t < 100 for t in a) and c != a

    echo = FakeLLM(EchoPolicy())
    assert (await complete(echo, max_tokens=2, return_token_ids=True))[1]["choices"][0]["token_ids"] == [1, 2]

    async def oracle(prompt_ids, request):  # a caller's policy, async
        await trio.lowlevel.checkpoint()
        return [sum(prompt_ids)]

    assert (await complete(FakeLLM(oracle), return_token_ids=True))[1]["choices"][0]["token_ids"] == [6]
    with pytest.raises(ValueError, match="tokenizer"):
        ScriptedPolicy(["text"])


async def test_bad_requests_get_vllm_errors():
    fake = FakeLLM(max_model_len=10)
    reply = await fake.handle("POST", "/v1/completions", b"{not json")
    assert reply.status == 400
    status, data = await complete(fake, prompt="text")
    assert status == 400 and data["error"]["param"] == "prompt"
    status, data = await complete(fake, max_tokens=0)
    assert status == 400 and "max_tokens must be at least 1" in data["error"]["message"]
    status, data = await complete(fake, prompt=[1, -2])
    assert status == 400
    status, data = await complete(fake, model="other")
    assert status == 404
    status, data = await complete(fake, prompt=list(range(5)), max_tokens=6)
    assert status == 400 and "context length is only 10 tokens" in data["error"]["message"]
    assert fake.counts["context_overflow"] == 1
    assert (await fake.handle("GET", "/nope", b"")).status == 404


async def test_models_and_health():
    fake = FakeLLM(model="m", max_model_len=4096)
    health = await fake.handle("GET", "/health", b"")
    assert health.status == 200
    models = json.loads((await fake.handle("GET", "/v1/models", b"")).body)
    assert models["data"][0]["id"] == "m" and models["data"][0]["max_model_len"] == 4096


async def test_faults(autojump_clock):
    assert (await complete(FakeLLM(faults=Faults(error_rate=1.0))))[0] == 500
    malformed = await FakeLLM(faults=Faults(malformed_rate=1.0)).handle("POST", "/v1/completions", body())
    with pytest.raises(ValueError):
        json.loads(malformed.body)
    _, data = await complete(FakeLLM(faults=Faults(missing_token_ids_rate=1.0)), logprobs=0,
                             return_token_ids=True, return_tokens_as_token_ids=True)
    assert data["choices"][0]["token_ids"] is None
    assert not data["choices"][0]["logprobs"]["tokens"][0].startswith("token_id:")
    with trio.move_on_after(1000) as scope:
        await FakeLLM(faults=Faults(hang_rate=1.0)).handle("POST", "/v1/completions", body())
    assert scope.cancelled_caught
    assert (await FakeLLM(faults=Faults(disconnect_rate=1.0)).handle("POST", "/v1/completions", body())).disconnect

    mixed = FakeLLM(faults=Faults(error_rate=0.1, malformed_rate=0.1), seed=3)
    statuses = [(await mixed.handle("POST", "/v1/completions", body())).status for _ in range(400)]
    assert 20 < statuses.count(500) < 60 and 360 - 60 < statuses.count(200) < 380
    with pytest.raises(ValueError, match="add up"):
        Faults(error_rate=0.6, hang_rate=0.6)
    with pytest.raises(ValueError, match="error_rate"):
        Faults(error_rate=-0.1)


async def test_latency_and_token_rate(autojump_clock):
    fake = FakeLLM(ScriptedPolicy([[1] * 10]), latency_s=0.5, tokens_per_s=20.0)
    t0 = trio.current_time()
    await complete(fake)
    assert trio.current_time() - t0 == pytest.approx(0.5 + 8 / 20.0)  # max_tokens=8 of the 10
    assert parse_latency("0.25") == 0.25
    import random
    draw = parse_latency("uniform:1:2")
    assert 1 <= draw(random.Random(0)) <= 2
    assert parse_latency("exp:0.1")(random.Random(0)) >= 0
    with pytest.raises(ValueError, match="latency"):
        parse_latency("gauss:1")


async def test_as_an_httpx_transport():
    fake = FakeLLM(ScriptedPolicy([[3, 4]]))
    async with httpx.AsyncClient(transport=FakeTransport({URL: fake})) as client:
        response = await client.post(URL + "/v1/completions", content=body(return_token_ids=True))
        assert response.json()["choices"][0]["token_ids"] == [3, 4]
        with pytest.raises(httpx.ConnectError):
            await client.get("http://elsewhere:1/health")
        fake.down = True
        with pytest.raises(httpx.ConnectError):
            await client.get(URL + "/health")
        fake.down = False
        fake.faults = Faults(disconnect_rate=1.0)
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(URL + "/v1/completions", content=body())


async def test_on_a_socket_keep_alive_and_disconnects():
    fake = FakeLLM(ScriptedPolicy([[3, 4]]))
    async with open_fake_server(fake) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for _ in range(3):
                response = await client.post("/v1/completions", content=body(return_token_ids=True))
                assert response.json()["choices"][0]["token_ids"] == [3, 4]
            assert fake.counts["connections"] == 1  # one keep-alive connection
            assert (await client.get("/health")).status_code == 200
            fake.faults = Faults(disconnect_rate=1.0)
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post("/v1/completions", content=body())


def test_runs_in_its_own_process():
    proc = subprocess.Popen([sys.executable, "-m", "agent.fake_llm", "--port", "0", "--policy", "echo"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None
        url = json.loads(proc.stdout.readline())["url"]
        response = httpx.post(url + "/v1/completions", content=body(return_token_ids=True), timeout=10)
        assert response.json()["choices"][0]["token_ids"] == [1, 2, 3]
    finally:
        proc.kill()
        proc.wait()
