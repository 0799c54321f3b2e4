"""Weight pushes to embedded servers (in-process ipc and HTTP disk), failures named, versions checked."""

from __future__ import annotations

import pickle
import socket
import sys
import types

import httpx
import pytest
import torch

from learner.serve import open_policy_server
from learner.tiny import shared_tokenizer, sync_state, tiny_model
from learner.weight_sync import (BackendUnavailable, EndpointUnreachable, RouteFailed, VersionMismatch, WeightEndpoint,
                                 WeightSync, WeightSyncError, nccl_rank_layout, push_weights, vllm_unique_id_pickle)

INIT_STD = 0.3


@pytest.fixture(scope="module")
def tok():
    return shared_tokenizer()


@pytest.fixture
def prompt(tok):
    return tok.encode("def add(a, b):\n    return")


def greedy_ids(model, prompt, n=10):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


async def greedy(server, prompt):
    return (await server.complete(prompt, max_tokens=10, temperature=0.0, ignore_eos=True)).token_ids


async def test_push_reaches_in_process_and_http_endpoints(tok, prompt, tmp_path):
    trainer = tiny_model(tok, seed=1, init_std=INIT_STD)
    async with open_policy_server(tiny_model(tok, seed=0, init_std=INIT_STD), tok) as local, \
            open_policy_server(tiny_model(tok, seed=0, init_std=INIT_STD), tok, http_port=0) as remote:
        old = await greedy(local, prompt)
        async with WeightSync([local, WeightEndpoint(remote.http_url, "disk")], disk_dir=tmp_path) as sync:
            await sync.push(trainer, version=1)
            assert [local.policy_version, remote.policy_version] == [1, 1]
            assert not local.is_paused and not remote.is_paused
            expected = greedy_ids(trainer, prompt)
            assert await greedy(local, prompt) == await greedy(remote, prompt) == expected != old
            # the next step's weights replace this one's
            with torch.no_grad():
                for p in trainer.parameters():
                    p.mul_(1.5)
            await sync.push(trainer, version=2)
            assert [local.policy_version, remote.policy_version] == [2, 2]
            assert await greedy(remote, prompt) == greedy_ids(trainer, prompt)
            assert [p.name for p in tmp_path.iterdir()] == ["v2"]  # the previous checkpoint was removed


async def test_rejecting_endpoint_is_named_and_left_paused_with_old_weights(tok, prompt):
    trainer = tiny_model(tok, seed=1, init_std=INIT_STD)
    async with open_policy_server(tiny_model(tok, seed=0, init_std=INIT_STD), tok) as good, \
            open_policy_server(tiny_model(tok, seed=0, init_std=INIT_STD, num_layers=1), tok, http_port=0) as bad:
        old = await greedy(bad, prompt)
        bad_url = bad.http_url
        with pytest.raises(WeightSyncError) as info:
            await push_weights([good, WeightEndpoint(bad_url, "disk")], trainer, 5)
        err = info.value
        assert bad_url in str(err) and "model.layers.1" in str(err)  # names the endpoint and the parameter
        assert list(err.failures) == [bad_url] and isinstance(err.failures[bad_url], RouteFailed)
        assert err.updated == [WeightEndpoint.embedded(good).url]
        assert good.policy_version == 5 and not good.is_paused
        assert bad.policy_version == 0 and bad.is_paused  # nothing samples stale weights as version 5
        await bad.resume()
        assert await greedy(bad, prompt) == old


async def test_wrong_version_after_push_is_an_error():
    def fake_vllm(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/weight_info":
            return httpx.Response(200, json={"weight_version": None})  # e.g. an old vLLM ignoring the version
        return httpx.Response(200, json={"message": "ok"})

    endpoint = WeightEndpoint("http://fake-vllm:8000", "disk", httpx.MockTransport(fake_vllm))
    with pytest.raises(WeightSyncError) as info:
        await push_weights([endpoint], {"w": torch.zeros(2)}, 3)
    assert isinstance(info.value.failures["http://fake-vllm:8000"], VersionMismatch)
    assert "http://fake-vllm:8000/weight_info" in str(info.value)


async def test_unreachable_endpoint_is_named():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens here
    with pytest.raises(WeightSyncError) as info:
        await push_weights([url], {"w": torch.zeros(2)}, 1, timeout_s=5)
    assert isinstance(info.value.failures[url], EndpointUnreachable) and url in str(info.value)


async def test_nccl_without_cuda_fails_before_pausing(tok, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    async with open_policy_server(tiny_model(tok), tok, http_port=0) as server:
        with pytest.raises(BackendUnavailable, match=server.http_url):
            await push_weights([WeightEndpoint(server.http_url, "nccl")], {"w": torch.zeros(2)}, 1)
        assert not server.is_paused


def test_nccl_rank_layout():
    assert nccl_rank_layout([1]) == (2, [1])
    assert nccl_rank_layout([2, 4, 1]) == (8, [1, 3, 7])  # trainer is rank 0, each endpoint's ranks follow
    with pytest.raises(ValueError):
        nccl_rank_layout([0])


def test_unique_id_unpickles_as_vllms_struct(monkeypatch):
    """vLLM's workers unpickle the id into their own ctypes `ncclUniqueId` (faked here)."""
    import ctypes

    class ncclUniqueId(ctypes.Structure):  # vllm/distributed/device_communicators/pynccl_wrapper.py
        _fields_ = [("internal", ctypes.c_byte * 128)]

    names = ["vllm", "vllm.distributed", "vllm.distributed.device_communicators",
             "vllm.distributed.device_communicators.pynccl_wrapper"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[-1]].ncclUniqueId = ncclUniqueId
    raw = bytes(range(128))
    uid = pickle.loads(vllm_unique_id_pickle(raw))
    assert isinstance(uid, ncclUniqueId) and bytes(uid) == raw
    with pytest.raises(ValueError):
        vllm_unique_id_pickle(b"short")


def test_sync_state_sends_tied_embedding_once(tok):
    state = sync_state(tiny_model(tok))
    assert "model.embed_tokens.weight" in state and "lm_head.weight" not in state
