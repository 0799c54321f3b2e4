"""The LLM client against the fake vLLM server: exact tokens, stickiness, retries, deadlines, draining.

In process (FakeTransport, virtual time) except the last tests, which go over a loopback socket.
"""

from __future__ import annotations

import collections

import pytest
import trio

from agent.fake_llm import FakeLLM, FakeTransport, Faults, Generation, RandomPolicy, ScriptedPolicy, open_fake_server
from agent.llm import (
    BadResponse,
    ContextOverflow,
    EndpointDown,
    LeanTransport,
    LLMClient,
    LLMError,
    RequestRejected,
    RequestTimeout,
)

A, B = "http://a:8000", "http://b:8000"
PROMPT = [11, 12, 13, 14]


def client_for(servers: dict[str, FakeLLM], **kwargs) -> LLMClient:
    kwargs.setdefault("model", "fake-model")
    return LLMClient(list(servers), transport=FakeTransport(servers), seed=0, **kwargs)


async def test_token_ids_and_logprobs_come_back_exactly():
    lps = [-0.1, -1e-9, -12.345678901234567, -0.0]
    fake = FakeLLM(ScriptedPolicy([Generation([5, 0, 150000, 7], lps)]))
    async with client_for({A: fake}) as llm:
        c = await llm.complete(PROMPT, max_tokens=16, stop=["</x>"], stop_token_ids=[7], seed=3)
    assert c.token_ids == [5, 0, 150000, 7] and c.logprobs == lps
    assert (c.finish_reason, c.stop_reason, c.endpoint, c.prompt_tokens, c.attempts) == ("stop", 7, A, 4, 1)
    sent = fake.seen[-1].raw  # vLLM's field names, as sent
    assert sent["prompt"] == PROMPT and sent["max_tokens"] == 16 and sent["model"] == "fake-model"
    assert sent["stop"] == ["</x>"] and sent["stop_token_ids"] == [7] and sent["seed"] == 3
    assert sent["logprobs"] == 0 and sent["return_token_ids"] is True and sent["return_tokens_as_token_ids"] is True
    assert sent["temperature"] == 1.0 and sent["top_p"] == 1.0 and sent["include_stop_str_in_output"] is True


async def test_token_ids_from_logprob_tokens_on_older_vllm():
    fake = FakeLLM(ScriptedPolicy([Generation([9, 8], [-1.0, -2.0])]), supports_return_token_ids=False)
    async with client_for({A: fake}) as llm:
        c = await llm.complete(PROMPT, max_tokens=4)
    assert (c.token_ids, c.logprobs, c.finish_reason) == ([9, 8], [-1.0, -2.0], "stop")
    async with client_for({A: FakeLLM(ScriptedPolicy([[1, 2, 3]]))}, return_token_ids=False) as llm:
        c = await llm.complete(PROMPT, max_tokens=2, temperature=0.0)
    assert (c.token_ids, c.finish_reason) == ([1, 2], "length")


async def test_episodes_stick_to_their_endpoint():
    fakes = {A: FakeLLM(), B: FakeLLM()}
    async with client_for(fakes) as llm:
        first, second = llm.assign_endpoint(), llm.assign_endpoint()
        assert {first, second} == {A, B}  # the least loaded first
        sampler = llm.sampler(first)
        for _ in range(5):
            c = await sampler.complete(PROMPT, max_tokens=4, stop=(), stop_token_ids=[])
            assert c.endpoint == first
        assert len(fakes[first].seen) == 5 and len(fakes[second].seen) == 0
        llm.release_endpoint(first)
        assert llm.assign_endpoint() == first  # it has fewer episodes now
        with pytest.raises(ValueError, match="unknown endpoint"):
            await llm.complete(PROMPT, max_tokens=4, endpoint="http://c:1")
        assert (await llm.complete(PROMPT, max_tokens=4, endpoint=B + "/v1/")).endpoint == B


async def test_retries_on_500s_succeed(autojump_clock):
    fake = FakeLLM(faults=Faults(error_rate=0.3), seed=1)
    async with client_for({A: fake}, retries=8, failures_to_drain=100) as llm:
        completions = [await llm.complete(PROMPT, max_tokens=4, endpoint=A) for _ in range(40)]
    assert all(len(c.token_ids) == 4 for c in completions)
    assert max(c.attempts for c in completions) > 1
    assert fake.counts["error"] == sum(c.attempts - 1 for c in completions)


async def test_backoff_grows_and_is_jittered(autojump_clock):
    fake = FakeLLM(faults=Faults(error_rate=1.0))
    async with client_for({A: fake}, retries=4, backoff_base_s=1.0, backoff_max_s=3.0, failures_to_drain=100) as llm:
        t0 = trio.current_time()
        with pytest.raises(EndpointDown, match="5 attempts failed; last: HTTP 500"):
            await llm.complete(PROMPT, max_tokens=4)
        waited = trio.current_time() - t0
    assert (0.5 + 1 + 1.5 + 1.5) <= waited <= (1 + 2 + 3 + 3)  # 1, 2, 3 (capped), 3, each to [50%, 100%]


async def test_a_hanging_endpoint_hits_the_deadline(autojump_clock):
    fake = FakeLLM(faults=Faults(hang_rate=1.0))
    async with client_for({A: fake}, timeout_s=2.0, retries=1, failures_to_drain=100) as llm:
        t0 = trio.current_time()
        with pytest.raises(RequestTimeout, match="2 attempts failed"):
            await llm.complete(PROMPT, max_tokens=4)
        assert trio.current_time() - t0 < 2 * 2.0 + 1.0  # two deadlines and one backoff
        assert llm.stats()[A]["in_flight"] == 0


async def test_error_injection_loses_nothing(autojump_clock):
    """10% faults of every kind over many concurrent requests: each succeeds or raises a typed error."""
    faults = Faults(error_rate=0.025, hang_rate=0.025, disconnect_rate=0.025, malformed_rate=0.025)
    fakes = {A: FakeLLM(faults=faults, seed=1), B: FakeLLM(faults=faults, seed=2)}
    outcomes: collections.Counter[str] = collections.Counter()
    async with client_for(fakes, timeout_s=5.0, retries=4, max_inflight_per_endpoint=32) as llm:

        async def episode(i: int) -> None:
            endpoint = llm.assign_endpoint()
            try:
                c = await llm.complete(PROMPT + [i], max_tokens=8, endpoint=endpoint)
                assert len(c.token_ids) == len(c.logprobs) == 8
                outcomes["ok"] += 1
            except LLMError as exc:
                outcomes[type(exc).__name__] += 1

        with trio.fail_after(600):  # virtual seconds: nothing hangs
            async with trio.open_nursery() as nursery:
                for i in range(1000):
                    nursery.start_soon(episode, i)
    assert sum(outcomes.values()) == 1000
    assert outcomes["ok"] >= 990, outcomes
    assert set(outcomes) <= {"ok", "EndpointDown", "RequestTimeout", "BadResponse"}
    assert sum(f.counts.get(k, 0) for f in fakes.values() for k in ("error", "hang", "disconnect", "malformed")) > 50


async def test_a_dead_endpoint_is_drained_then_readmitted(autojump_clock):
    fakes = {A: FakeLLM(), B: FakeLLM()}
    async with client_for(fakes, failures_to_drain=3, retries=0, probe_interval_s=10.0, timeout_s=100.0) as llm:
        fakes[A].faults = Faults(hang_rate=1.0)
        hung: list[BaseException] = []

        async def in_flight() -> None:
            try:
                await llm.complete(PROMPT, max_tokens=4, endpoint=A)
            except LLMError as exc:
                hung.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(in_flight)
            await trio.sleep(1.0)  # three requests in flight on A, unanswered
            fakes[A].down = True
            for _ in range(3):
                with pytest.raises(EndpointDown):
                    await llm.complete(PROMPT, max_tokens=4, endpoint=A)
        # Drained: the in-flight requests got EndpointDown at once, long before their 100 s deadline.
        assert len(hung) == 3 and all(isinstance(e, EndpointDown) for e in hung)
        assert trio.current_time() < 10.0
        assert llm.healthy_endpoints() == [B]
        assert {llm.assign_endpoint() for _ in range(4)} == {B}
        with pytest.raises(EndpointDown, match="drained"):
            await llm.complete(PROMPT, max_tokens=4, endpoint=A)
        assert len(fakes[A].seen) == 3  # nothing more reached it

        fakes[A].down = False
        fakes[A].faults = Faults()
        await trio.sleep(25.0)  # probed every 10 s: back
        assert llm.healthy_endpoints() == [A, B]
        assert (await llm.complete(PROMPT, max_tokens=4, endpoint=A)).endpoint == A
        stats = llm.stats()[A]
        assert (stats["drains"], stats["readmits"], stats["up"]) == (1, 1, True)
        assert llm.assign_endpoint() == A  # no episode is on it: it is the least loaded


async def test_episode_counts_survive_a_drain(autojump_clock):
    fakes = {A: FakeLLM(), B: FakeLLM()}
    async with client_for(fakes, failures_to_drain=1, retries=0, probe_interval_s=10.0) as llm:
        on_a = [llm.assign_endpoint() for _ in range(4)]  # A, B, A, B
        assert on_a.count(A) == 2
        fakes[A].down = True
        with pytest.raises(EndpointDown):
            await llm.complete(PROMPT, max_tokens=4, endpoint=A)
        assert llm.healthy_endpoints() == [B]
        llm.release_endpoint(A)  # one of A's episodes fails over; the other is in a long tool call
        fakes[A].down = False
        await trio.sleep(15.0)  # probed: back
        assert llm.healthy_endpoints() == [A, B]
        # A still carries the episode that never left it: the count says so, and the release of the
        # episode that left does not take a new episode's place.
        assert llm.stats()[A]["episodes"] == 1 and llm.stats()[B]["episodes"] == 2
        assert llm.assign_endpoint() == A
        assert llm.stats()[A]["episodes"] == 2


async def test_no_healthy_endpoint(autojump_clock):
    fake = FakeLLM()
    async with client_for({A: fake}, failures_to_drain=1, retries=0) as llm:
        fake.down = True
        with pytest.raises(EndpointDown):
            await llm.complete(PROMPT, max_tokens=4)
        with pytest.raises(EndpointDown, match="no healthy endpoint"):
            llm.assign_endpoint()
        with pytest.raises(EndpointDown, match="no healthy endpoint"):
            await llm.complete(PROMPT, max_tokens=4)


async def test_responses_without_token_ids_say_why():
    fake = FakeLLM(faults=Faults(missing_token_ids_rate=1.0))
    async with client_for({A: fake}) as llm:
        with pytest.raises(BadResponse) as info:
            await llm.complete(PROMPT, max_tokens=4)
    message = str(info.value)
    assert "must return token ids" in message and "return_token_ids" in message
    assert "--return-tokens-as-token-ids" in message and "0.10.2" in message
    assert len(fake.seen) == 1  # not retried: it will not get better


async def test_non_json_is_a_bad_response(autojump_clock):
    fake = FakeLLM(faults=Faults(malformed_rate=1.0))
    async with client_for({A: fake}, retries=2, failures_to_drain=100) as llm:
        with pytest.raises(BadResponse, match="not JSON"):
            await llm.complete(PROMPT, max_tokens=4)
    assert len(fake.seen) == 3


async def test_context_overflow():
    fake = FakeLLM(max_model_len=100)
    async with client_for({A: fake}) as llm:
        with pytest.raises(ContextOverflow, match="context length is only 100"):
            await llm.complete(list(range(90)), max_tokens=20)  # the server's 400
        assert len(fake.seen) == 0 and llm.stats()[A]["failures"] == 0
        with pytest.raises(ContextOverflow, match="no room"):
            await llm.complete(PROMPT, max_tokens=0)  # the local check
        assert await llm.check_endpoints() == {A: True}  # learns max_model_len from /v1/models
        c = await llm.complete(list(range(90)), max_tokens=20)
        assert fake.seen[-1].max_tokens == 10 and len(c.token_ids) == 10 and c.finish_reason == "length"
        with pytest.raises(ContextOverflow, match="fills the context"):
            await llm.complete(list(range(100)), max_tokens=5)
    async with client_for({A: FakeLLM()}, max_model_len=50) as llm:
        await llm.complete(list(range(45)), max_tokens=20)
        with pytest.raises(ContextOverflow):
            await llm.complete(list(range(50)), max_tokens=20)


async def test_other_4xx_are_rejected_not_retried():
    fake = FakeLLM(model="served")
    async with client_for({A: fake}, model="not-served") as llm:
        with pytest.raises(RequestRejected, match="does not exist") as info:
            await llm.complete(PROMPT, max_tokens=4)
        assert info.value.status == 404 and fake.counts["requests"] == 1
        assert await llm.check_endpoints() == {A: False}  # /v1/models does not list the model


async def test_aborted_requests_are_sent_again(autojump_clock):
    fake = FakeLLM(faults=Faults(abort_rate=0.5), seed=4)
    async with client_for({A: fake}, retries=10, failures_to_drain=2) as llm:
        completions = [await llm.complete(PROMPT, max_tokens=4) for _ in range(20)]
        assert all(c.finish_reason in ("stop", "length") for c in completions)
        assert fake.counts["abort"] == sum(c.attempts - 1 for c in completions) > 2
        assert llm.stats()[A]["failures"] == 0  # an abort is not the endpoint failing


async def test_lifecycle_and_arguments():
    llm = client_for({A: FakeLLM()})
    with pytest.raises(LLMError, match="not open"):
        await llm.complete(PROMPT, max_tokens=4)
    async with llm:
        with pytest.raises(ValueError, match="empty"):
            await llm.complete([], max_tokens=4)
    with pytest.raises(LLMError, match="closed"):
        await llm.complete(PROMPT, max_tokens=4)
    with pytest.raises(ValueError, match="at least one endpoint"):
        LLMClient([], model=None)
    with pytest.raises(ValueError, match="duplicate"):
        LLMClient([A, A + "/v1"], model=None)
    with pytest.raises(ValueError, match="http://host:port"):
        LLMClient(["a:8000"], model=None)
    with pytest.raises(ValueError, match="retries"):
        LLMClient([A], model=None, retries=-1)
    with pytest.raises(ValueError, match="http:// only"):
        LLMClient(["https://a:443"], model=None)


async def test_a_body_error_propagates_unwrapped():
    with pytest.raises(KeyError):
        async with client_for({A: FakeLLM()}):
            raise KeyError("mine")


# --- over a real loopback socket ---------------------------------------------------------------------


async def test_over_a_socket_lean_and_sharded():
    fake = FakeLLM(ScriptedPolicy([Generation([4, 5, 6], [-0.5, -1.5, -2.5])]))
    async with open_fake_server(fake) as url:
        for pool in ("lean", "sharded"):
            async with LLMClient([url], model="fake-model", pool=pool, max_inflight_per_endpoint=8,
                                 connections_per_shard=2) as llm:
                results = []

                async def call() -> None:
                    results.append(await llm.complete(PROMPT, max_tokens=8))

                async with trio.open_nursery() as nursery:
                    for _ in range(40):
                        nursery.start_soon(call)
                assert all(c.token_ids == [4, 5, 6] and c.logprobs == [-0.5, -1.5, -2.5] for c in results)
                assert len(results) == 40 and await llm.check_endpoints() == {url: True}
        assert fake.counts["connections"] <= 8 + 8  # bounded by max_inflight, reused across requests


async def test_over_a_socket_stale_keep_alive_is_not_a_failure():
    fake = FakeLLM(RandomPolicy(length=3), keep_alive=False)  # closes every connection after answering
    async with open_fake_server(fake) as url:
        async with LLMClient([url], model="fake-model", failures_to_drain=1, retries=0) as llm:
            for _ in range(5):
                await trio.sleep(0.01)  # let the server's close arrive (or not): both must work
                assert len((await llm.complete(PROMPT, max_tokens=3)).token_ids) == 3
            assert llm.stats()[url]["failures"] == 0
    assert fake.counts["connections"] == 5


async def test_over_a_socket_a_dead_server_is_an_endpoint_down():
    # Nothing listens on the port once the server is gone: connection refused, retried, then EndpointDown.
    async with open_fake_server(FakeLLM()) as url:
        pass
    async with LLMClient([url], model="fake-model", retries=1, backoff_base_s=0.01) as llm:
        with pytest.raises(EndpointDown, match="ConnectError"):
            await llm.complete(PROMPT, max_tokens=3)


async def test_a_request_without_an_endpoint_moves_on(autojump_clock):
    fakes = {A: FakeLLM(faults=Faults(hang_rate=1.0)), B: FakeLLM()}
    async with client_for(fakes, timeout_s=1.0, retries=2) as llm:
        t0 = trio.current_time()
        c = await llm.complete(PROMPT, max_tokens=4)  # A first (a tie, in order), then B at once
        assert (c.endpoint, c.attempts) == (B, 2) and trio.current_time() - t0 == pytest.approx(1.0)
        with pytest.raises(RequestTimeout):
            await llm.complete(PROMPT, max_tokens=4, endpoint=A)  # sticky: it stays on A


async def test_lean_transport_reuses_then_expires_idle_connections():
    fake = FakeLLM(RandomPolicy(length=2))
    async with open_fake_server(fake) as url:
        async with LLMClient([url], model="fake-model", transport=LeanTransport(keepalive_expiry_s=0.2)) as llm:
            for _ in range(3):
                await llm.complete(PROMPT, max_tokens=2)
            assert fake.counts["connections"] == 1
            await trio.sleep(0.3)  # idle past its expiry: not reused
            await llm.complete(PROMPT, max_tokens=2)
            assert fake.counts["connections"] == 2
