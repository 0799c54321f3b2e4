"""The embedded policy server in process: exact tokens and logprobs, stop rules, batching, pause."""

from __future__ import annotations

import pytest
import torch
import trio

from learner.serve import PolicyServer, ServeConfig, ServeError, ServerBusy, open_policy_server
from learner.tiny import shared_tokenizer, tiny_model

# Peaked enough that greedy runs of two seeds differ and text has recognisable pieces.
INIT_STD = 0.3


@pytest.fixture(scope="module")
def tok():
    return shared_tokenizer()


@pytest.fixture
def model(tok):
    return tiny_model(tok, seed=0, init_std=INIT_STD)


@pytest.fixture
def prompt(tok):
    return tok.encode("def add(a, b):\n    return")


def teacher_forced(model, prompt, output, temperature=1.0):
    """Logprobs of `output` given `prompt` from one plain float32 forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0].float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(output)]


async def test_tokens_and_logprobs_match_teacher_forcing(model, tok, prompt):
    async with open_policy_server(model, tok) as server:
        sampled = await server.complete(prompt, max_tokens=24, seed=1, ignore_eos=True)
        nucleus = await server.complete(prompt, max_tokens=24, seed=2, temperature=0.7, top_p=0.9, top_k=50,
                                        ignore_eos=True)
        greedy = await server.complete(prompt, max_tokens=24, temperature=0.0, ignore_eos=True)
    for c in (sampled, nucleus, greedy):
        assert len(c.token_ids) == len(c.logprobs) == 24 and c.finish_reason == "length"
        # vLLM's default raw_logprobs: the model's distribution at T=1, whatever the sampling settings
        assert c.logprobs == pytest.approx(teacher_forced(model, prompt, c.token_ids), abs=1e-4)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(24):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert greedy.token_ids == ids[len(prompt):]
    assert greedy.text == tok.decode(greedy.token_ids)


async def test_processed_logprobs_are_under_the_sampling_temperature(model, tok, prompt):
    async with open_policy_server(model, tok, ServeConfig(logprobs_mode="processed_logprobs")) as server:
        c = await server.complete(prompt, max_tokens=16, seed=3, temperature=0.6, ignore_eos=True)
    assert c.logprobs == pytest.approx(teacher_forced(model, prompt, c.token_ids, temperature=0.6), abs=1e-4)
    assert c.logprobs != pytest.approx(teacher_forced(model, prompt, c.token_ids), abs=1e-2)


async def test_seeds_make_sampling_reproducible(model, tok, prompt):
    async with open_policy_server(model, tok) as server:
        a = await server.complete(prompt, max_tokens=16, seed=7, ignore_eos=True)
        b = await server.complete(prompt, max_tokens=16, seed=7, ignore_eos=True)
        c = await server.complete(prompt, max_tokens=16, seed=8, ignore_eos=True)
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    assert a.token_ids != c.token_ids


async def test_stop_token_ids_and_stop_strings_end_with_stop(model, tok, prompt):
    async with open_policy_server(model, tok) as server:
        free = await server.complete(prompt, max_tokens=40, seed=5, ignore_eos=True)
        k = 6
        stop_id = free.token_ids[k]
        first = free.token_ids.index(stop_id)
        by_id = await server.complete(prompt, max_tokens=40, seed=5, ignore_eos=True, stop_token_ids=[stop_id])
        # a stop string that first completes inside the free run's text
        stop_str = next(s for s in (free.text[10:13], free.text[15:17], free.text[20:21]) if s.strip())
        by_str = await server.complete(prompt, max_tokens=40, seed=5, ignore_eos=True, stop=[stop_str])
    # vLLM keeps the stop token in token_ids and reports it as stop_reason
    assert by_id.token_ids == free.token_ids[:first + 1]
    assert (by_id.finish_reason, by_id.stop_reason) == ("stop", stop_id)
    assert by_str.finish_reason == "stop" and by_str.stop_reason == stop_str
    assert by_str.text == free.text[:free.text.index(stop_str)]
    assert free.token_ids[:len(by_str.token_ids)] == by_str.token_ids  # ids up to the completing token
    assert stop_str in tok.decode(by_str.token_ids) and stop_str not in tok.decode(by_str.token_ids[:-1])
    assert (free.finish_reason, free.stop_reason) == ("length", None)


async def test_concurrent_requests_are_batched_and_match_solo_runs(model, tok):
    rows_seen = []
    model.register_forward_pre_hook(lambda m, args, kw: rows_seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    prompts = [tok.encode(t) for t in ("def add(a, b):", "return a - b", "<function=bash>", "ls", "def",
                                       "def add(a, b):", "parameter", "x = 1\n")]
    async with open_policy_server(model, tok) as server:
        together = [None] * 8

        async def one(i):
            together[i] = await server.complete(prompts[i], max_tokens=12 + i, seed=100 + i, ignore_eos=True)

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(one, i)
        batched_rows = max(rows_seen)
        rows_seen.clear()
        alone = [await server.complete(prompts[i], max_tokens=12 + i, seed=100 + i, ignore_eos=True)
                 for i in range(8)]
    assert batched_rows > 1 and server.stats.max_decode_rows == 8
    assert max(rows_seen) == 1
    assert server.stats.prefill_shared >= 1  # the two requests with the same prompt shared a prefill
    for t, a in zip(together, alone):
        assert t.token_ids == a.token_ids
        assert t.logprobs == pytest.approx(a.logprobs, abs=1e-4)  # float32 GEMMs differ with the batch shape


async def test_pause_modes(model, tok, prompt):
    config = ServeConfig(pause_wait_s=0.5)
    async with open_policy_server(model, tok, config) as server, trio.open_nursery() as nursery:
        results = {}

        async def sample(name, max_tokens=400):
            try:
                results[name] = await server.complete(prompt, max_tokens=max_tokens, seed=1, ignore_eos=True)
            except ServerBusy as exc:
                results[name] = exc

        # abort: in-flight requests end now with their partial tokens
        nursery.start_soon(sample, "aborted")
        while server.stats.tokens < 3:
            await trio.sleep(0.001)
        await server.pause("abort")
        assert server.is_paused
        await trio.sleep(0.01)
        assert results["aborted"].finish_reason == "abort" and 0 < len(results["aborted"].token_ids) < 400
        # requests arriving during a pause wait for resume...
        nursery.start_soon(sample, "waited", 5)
        await trio.sleep(0.1)
        assert "waited" not in results
        await server.resume()
        while "waited" not in results:
            await trio.sleep(0.001)
        assert results["waited"].finish_reason == "length"
        # ...but at most pause_wait_s
        await server.pause("keep")
        nursery.start_soon(sample, "expired", 5)
        with trio.fail_after(5):
            while "expired" not in results:
                await trio.sleep(0.01)
        assert isinstance(results["expired"], ServerBusy)
        await server.resume()
        # keep: in-flight requests freeze and finish after resume; wait: pause returns once they are done
        base = server.stats.tokens
        nursery.start_soon(sample, "kept", 100)
        while server.stats.tokens < base + 3:
            await trio.sleep(0.001)
        await server.pause("keep")
        frozen_at = server.stats.tokens
        await trio.sleep(0.05)
        assert server.stats.tokens == frozen_at and "kept" not in results
        await server.resume()
        await server.pause("wait")
        assert results["kept"].finish_reason == "length" and len(results["kept"].token_ids) == 100
        await server.resume()


async def test_cancelled_request_leaves_the_server_serving(model, tok, prompt):
    async with open_policy_server(model, tok) as server:
        with trio.move_on_after(0.02):
            await server.complete(prompt, max_tokens=2000, seed=1, ignore_eos=True)
        c = await server.complete(prompt, max_tokens=4, seed=1)
        assert len(c.token_ids) <= 4
        assert not server._batch.rows


async def test_load_state_dict_changes_outputs_and_version(model, tok, prompt):
    other = tiny_model(tok, seed=1, init_std=INIT_STD)
    async with open_policy_server(model, tok) as server:
        before = await server.complete(prompt, max_tokens=12, temperature=0.0, ignore_eos=True)
        await server.load_state_dict(dict(other.named_parameters()), version=9)
        after = await server.complete(prompt, max_tokens=12, temperature=0.0, ignore_eos=True)
    assert server.policy_version == after.policy_version == 9 and before.policy_version == 0
    assert after.token_ids != before.token_ids
    assert after.logprobs == pytest.approx(teacher_forced(other, prompt, after.token_ids), abs=1e-4)


async def test_complete_requires_a_running_server(model, tok, prompt):
    server = PolicyServer(model, tok)
    with pytest.raises(RuntimeError, match="not running"):
        await server.complete(prompt, max_tokens=2)


async def test_next_turn_reuses_the_previous_turns_cache(model, tok, prompt):
    observation = tok.encode("\n<|im_start|>user\nok<|im_end|>\n<|im_start|>assistant\n")
    async with open_policy_server(model, tok) as cached, \
            open_policy_server(model, tok, ServeConfig(prefix_cache_tokens=0)) as uncached:
        turn1 = await cached.complete(prompt, max_tokens=12, seed=1, ignore_eos=True)
        turn2_prompt = prompt + turn1.token_ids + observation
        turn2 = await cached.complete(turn2_prompt, max_tokens=12, seed=2, ignore_eos=True)
        plain = await uncached.complete(turn2_prompt, max_tokens=12, seed=2, ignore_eos=True)
    assert cached.stats.prefix_tokens_reused == len(prompt) + len(turn1.token_ids) - 1
    assert cached.stats.prefill_tokens == len(prompt) + len(observation) + 1
    assert turn2.token_ids == plain.token_ids
    assert turn2.logprobs == pytest.approx(teacher_forced(model, turn2_prompt, turn2.token_ids), abs=1e-4)


async def test_weight_update_invalidates_the_prefix_cache(model, tok, prompt):
    other = tiny_model(tok, seed=1, init_std=INIT_STD)
    async with open_policy_server(model, tok) as server:
        turn1 = await server.complete(prompt, max_tokens=8, seed=1, ignore_eos=True)
        await server.load_state_dict(dict(other.named_parameters()), version=1)
        turn2_prompt = prompt + turn1.token_ids + tok.encode("ok")
        turn2 = await server.complete(turn2_prompt, max_tokens=8, seed=2, ignore_eos=True)
    assert server.stats.prefix_tokens_reused == 0
    assert turn2.logprobs == pytest.approx(teacher_forced(other, turn2_prompt, turn2.token_ids), abs=1e-4)


async def test_failed_step_fails_its_requests_and_the_server_serves_on(model, tok, prompt, monkeypatch):
    async with open_policy_server(model, tok) as server:
        real_step = server._batch.step

        def broken(admitted=()):
            raise RuntimeError("CUDA out of memory (simulated)")

        monkeypatch.setattr(server._batch, "step", broken)
        with pytest.raises(ServeError, match="out of memory"):
            await server.complete(prompt, max_tokens=4)
        monkeypatch.setattr(server._batch, "step", real_step)
        c = await server.complete(prompt, max_tokens=4, ignore_eos=True)
        assert len(c.token_ids) == 4
