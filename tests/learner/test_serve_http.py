"""The embedded server over HTTP (h11 on a real socket): vLLM's completion fields and RL routes."""

from __future__ import annotations

import httpx
import pytest
import torch
from safetensors.torch import save_file

from learner.serve import open_policy_server
from learner.tiny import shared_tokenizer, tiny_model

INIT_STD = 0.3


@pytest.fixture(scope="module")
def tok():
    return shared_tokenizer()


@pytest.fixture
def prompt(tok):
    return tok.encode("def add(a, b):\n    return")


def checkpoint(tmp_path, state, name="ckpt"):
    """A disk-backend update directory holding `state`."""
    path = tmp_path / name
    path.mkdir()
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return str(path)


async def test_completions_over_http(tok, prompt):
    model = tiny_model(tok, seed=0, init_std=INIT_STD)
    async with open_policy_server(model, tok, http_port=0) as server, \
            httpx.AsyncClient(base_url=server.http_url) as client:
        assert (await client.get("/health")).status_code == 200
        models = (await client.get("/v1/models")).json()
        assert models["data"][0]["id"] == "policy" and models["data"][0]["policy_version"] == 0
        body = {"model": "policy", "prompt": prompt, "max_tokens": 6, "seed": 4, "logprobs": 2, "n": 2,
                "return_token_ids": True, "return_tokens_as_token_ids": True, "ignore_eos": True}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        solo = await server.complete(prompt, max_tokens=6, seed=4, ignore_eos=True)
        assert [c["index"] for c in out["choices"]] == [0, 1]
        first = out["choices"][0]
        assert first["token_ids"] == solo.token_ids and first["prompt_token_ids"] == prompt
        assert first["text"] == solo.text and first["finish_reason"] == "length" and first["stop_reason"] is None
        lp = first["logprobs"]
        assert lp["tokens"] == [f"token_id:{t}" for t in solo.token_ids]
        assert lp["token_logprobs"] == pytest.approx(solo.logprobs, abs=1e-4)
        assert all(2 <= len(top) <= 3 for top in lp["top_logprobs"])  # top-2 plus the sampled token
        assert out["choices"][1]["token_ids"] != first["token_ids"]  # choice 1 samples with seed + 1
        assert out["usage"]["completion_tokens"] == 12
        # keep-alive: the client reused one connection for all of the above
        r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "logit_bias": {"1": 5}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
        assert (await client.post("/v1/completions", content=b"{nope")).status_code == 400
        assert (await client.get("/v2/anything")).status_code == 404
        assert (await client.get("/v1/completions")).status_code == 405


async def test_weight_update_routes_change_outputs_and_version(tok, prompt, tmp_path):
    model = tiny_model(tok, seed=0, init_std=INIT_STD)
    new = tiny_model(tok, seed=1, init_std=INIT_STD)
    greedy = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "return_token_ids": True, "logprobs": 0,
              "ignore_eos": True}
    async with open_policy_server(model, tok, http_port=0) as server, \
            httpx.AsyncClient(base_url=server.http_url) as client:
        before = (await client.post("/v1/completions", json=greedy)).json()["choices"][0]
        assert (await client.post("/init_weight_transfer_engine", json={"init_info": {}})).status_code == 200
        assert (await client.post("/pause", params={"mode": "wait"})).json() == {"status": "paused"}
        assert (await client.get("/is_paused")).json() == {"is_paused": True}
        assert (await client.post("/start_weight_update", json={"is_checkpoint_format": True})).status_code == 200
        path = checkpoint(tmp_path, dict(new.named_parameters()))
        r = await client.post("/update_weights", json={"update_info": {"path": path}})
        assert r.status_code == 200, r.text
        assert (await client.post("/finish_weight_update", json={"weight_version": "3"})).status_code == 200
        assert (await client.get("/weight_info")).json() == {"weight_version": "3"}
        assert (await client.post("/resume")).json() == {"status": "resumed"}
        after = (await client.post("/v1/completions", json=greedy)).json()["choices"][0]
        assert (await client.get("/policy_version")).json() == {"policy_version": 3}
    assert after["token_ids"] != before["token_ids"]
    expected = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            expected.append(int(new(torch.tensor([expected])).logits[0, -1].argmax()))
    assert after["token_ids"] == expected[len(prompt):]


@pytest.mark.parametrize("corrupt", ["shape", "name", "nan"])
async def test_rejected_update_names_the_parameter_and_keeps_old_weights(tok, prompt, tmp_path, corrupt):
    model = tiny_model(tok, seed=0, init_std=INIT_STD)
    state = dict(tiny_model(tok, seed=1, init_std=INIT_STD).named_parameters())
    bad = {"shape": "model.layers.1.mlp.up_proj.weight", "name": "model.layers.9.mlp.up_proj.weight",
           "nan": "model.norm.weight"}[corrupt]
    if corrupt == "shape":
        state[bad] = torch.zeros(3, 3)
    elif corrupt == "name":
        state[bad] = torch.zeros(3, 3)
    else:
        state[bad] = torch.full((64,), float("nan"))
    greedy = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "return_token_ids": True, "logprobs": 0}
    async with open_policy_server(model, tok, http_port=0) as server, \
            httpx.AsyncClient(base_url=server.http_url) as client:
        before = (await client.post("/v1/completions", json=greedy)).json()["choices"][0]
        await client.post("/start_weight_update", json={})
        r = await client.post("/update_weights", json={"update_info": {"path": checkpoint(tmp_path, state)}})
        assert r.status_code == 400 and bad in r.json()["error"]["message"]
        assert "old weights kept" in r.json()["error"]["message"]
        r = await client.post("/finish_weight_update", json={"weight_version": 1})
        assert r.status_code == 409  # the rejected update ended the session
        after = (await client.post("/v1/completions", json=greedy)).json()["choices"][0]
        assert (await client.get("/weight_info")).json() == {"weight_version": "0"}
    assert after["token_ids"] == before["token_ids"]
    assert after["logprobs"]["token_logprobs"] == before["logprobs"]["token_logprobs"]


async def test_weight_routes_refuse_bad_order_and_foreign_backends(tok, tmp_path):
    async with open_policy_server(tiny_model(tok), tok, http_port=0) as server, \
            httpx.AsyncClient(base_url=server.http_url) as client:
        r = await client.post("/update_weights", json={"update_info": {"path": str(tmp_path)}})
        assert r.status_code == 409 and "start_weight_update" in r.json()["error"]["message"]
        r = await client.post("/init_weight_transfer_engine", json={"init_info": {
            "master_address": "10.0.0.1", "master_port": 29500, "rank_offset": 1, "world_size": 2}})
        assert r.status_code == 400 and "NCCL" in r.json()["error"]["message"]
        await client.post("/start_weight_update")
        assert (await client.post("/start_weight_update")).status_code == 409
        r = await client.post("/update_weights", json={"update_info": {"names": ["x"], "dtype_names": ["float32"],
                                                                       "shapes": [[1]], "packed": False}})
        assert r.status_code == 400 and "NCCL" in r.json()["error"]["message"]
        await client.post("/start_weight_update")
        r = await client.post("/update_weights", json={"update_info": {"path": str(tmp_path)}})
        assert r.status_code == 400 and "no .safetensors" in r.json()["error"]["message"]
        r = await client.post("/update_weights", json={"update_info": {"path": "relative/dir"}})
        assert r.status_code == 409  # the previous rejection closed the session
        assert (await client.post("/pause", params={"mode": "later"})).status_code == 400


async def test_internal_error_is_a_500_and_the_server_serves_on(tok, prompt, monkeypatch):
    async with open_policy_server(tiny_model(tok), tok, http_port=0) as server, \
            httpx.AsyncClient(base_url=server.http_url) as client:
        real = server.complete

        async def broken(*args, **kwargs):
            raise RuntimeError("boom")

        monkeypatch.setattr(server, "complete", broken)
        r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
        monkeypatch.setattr(server, "complete", real)
        r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
        assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) >= 0


async def test_agent_llm_client_samples_from_the_embedded_server(tok, prompt):
    llm = pytest.importorskip("agent.llm")
    async with open_policy_server(tiny_model(tok, init_std=INIT_STD), tok) as server:
        async with llm.LLMClient(["http://embedded"], model="policy", transport=server.transport()) as client:
            c = await client.complete(prompt, max_tokens=12, stop_token_ids=[tok.eos_token_id], seed=9)
        direct = await server.complete(prompt, max_tokens=12, stop_token_ids=[tok.eos_token_id], seed=9)
    assert c.token_ids == direct.token_ids and c.finish_reason == direct.finish_reason
    assert c.logprobs == pytest.approx(direct.logprobs, abs=1e-6)
