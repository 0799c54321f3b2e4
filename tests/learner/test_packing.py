"""Packing: alignment of every per-token field, boundaries, isolation, and the trajectory filters."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.ops import token_logprobs
from learner.packing import (
    PackedRow,
    additive_mask,
    Sample,
    block_causal_mask,
    dapo_samples,
    pack,
    rft_samples,
    total_loss_tokens,
    unpack,
    unpack_rows,
)
from runtime.records import FinishReason
from tests.learner.helpers import tiny_lm, trajectory


def test_row_fields_are_shifted_and_aligned():
    a = Sample([1, 2, 3, 4], [0, 0, 1, 1], [0.0, 0.0, -0.5, -0.25], advantage=2.0)
    b = Sample([5, 6, 7], [0, 1, 0], [0.0, -1.5, 0.0], advantage=-1.0)
    (row,) = pack([a, b], max_tokens=16, pad_id=9)

    assert row.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert row.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert row.targets.tolist() == [2, 3, 4, 9, 6, 7, 9]  # never a target across the boundary
    assert row.loss_mask.tolist() == [0, 1, 1, 0, 1, 0, 0]
    assert row.advantages.tolist() == [0.0, 2.0, 2.0, 0.0, -1.0, 0.0, 0.0]
    assert row.sampler_logprobs.tolist() == [0.0, -0.5, -0.25, 0.0, -1.5, 0.0, 0.0]
    assert row.cu_seqlens.tolist() == [0, 4, 7]
    assert row.sample_indices == (0, 1)
    assert (row.num_loss_tokens, row.max_seqlen) == (3, 4)


def test_block_causal_mask_by_hand():
    mask = block_causal_mask([0, 2, 3], length=5)  # sequences [0, 2), [2, 3), padding [3, 5)
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 0, 1, 0],
            [0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    with pytest.raises(ValueError):
        block_causal_mask([0, 4], length=3)


samples_st = st.lists(
    st.integers(1, 9).flatmap(
        lambda n: st.builds(
            Sample,
            st.lists(st.integers(0, 99), min_size=n, max_size=n),
            st.lists(st.integers(0, 1), min_size=n, max_size=n),
            st.lists(st.floats(-5, 0), min_size=n, max_size=n),
            st.floats(-2, 2),
        )
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=40, deadline=None)
@given(samples=samples_st, max_tokens=st.integers(9, 20))
def test_pack_round_trip(samples, max_tokens):
    rows = pack(samples, max_tokens=max_tokens)
    assert all(row.num_tokens <= max_tokens for row in rows)
    assert sorted(i for row in rows for i in row.sample_indices) == list(range(len(samples)))

    ids = unpack_rows([row.input_ids for row in rows], rows)
    pos = unpack_rows([row.position_ids for row in rows], rows)
    tgt = unpack_rows([row.targets for row in rows], rows)
    mask = unpack_rows([row.loss_mask for row in rows], rows)
    for s, i, p, t, m in zip(samples, ids, pos, tgt, mask):
        assert i.tolist() == s.token_ids
        assert p.tolist() == list(range(len(s.token_ids)))
        assert t[:-1].tolist() == s.token_ids[1:]
        assert m.tolist() == s.loss_mask[1:] + [0]
    assert total_loss_tokens(rows) == sum(sum(s.loss_mask[1:]) for s in samples)


def test_pack_first_fit_decreasing_and_limits():
    lengths = [5, 3, 4, 2, 6]
    samples = [Sample([1] * n, [0] * n, [0.0] * n, 0.0) for n in lengths]
    rows = pack(samples, max_tokens=8)
    # longest first: 6 -> row 0; 5 -> row 1; 4 -> row 2; 3 -> row 1; 2 -> row 0
    assert [row.sample_indices for row in rows] == [(4, 3), (0, 1), (2,)]
    with pytest.raises(ValueError, match="sample 4 has 6 tokens"):
        pack(samples, max_tokens=5)


def test_packed_forward_equals_separate_forwards():
    # the block mask and restarting positions make a packed row compute what each sequence alone would
    model = tiny_lm()
    samples = [
        Sample([1, 2, 3, 4, 5], [0, 0, 1, 1, 1], [0.0] * 5, 1.0),
        Sample([6, 7, 8], [0, 1, 1], [0.0] * 3, 1.0),
        Sample([9, 10, 11, 12], [0, 0, 1, 0], [0.0] * 4, 1.0),
    ]
    (packed,) = pack(samples, max_tokens=64)
    packed_lp = unpack(model.row_logprobs(packed)[0], packed)
    for i, s in zip(packed.sample_indices, packed_lp):
        (alone,) = pack([samples[i]], max_tokens=64)
        torch.testing.assert_close(s, model.row_logprobs(alone)[0], rtol=1e-12, atol=1e-12)

    # and a row with a plain causal mask (no isolation) does not
    leaky = PackedRow(**{**packed.__dict__, "cu_seqlens": torch.tensor([0, packed.num_tokens], dtype=torch.int32)})
    assert not torch.allclose(model.row_logprobs(leaky)[0], model.row_logprobs(packed)[0])


def test_sample_from_trajectory_masks_prompt_and_observations():
    traj = trajectory([1, 2], [([3, 4], [5]), ([6], [])], logprob=-0.5)
    s = Sample.from_trajectory(traj, 0.5)
    assert s.token_ids == [1, 2, 3, 4, 5, 6]
    assert s.loss_mask == [0, 0, 1, 1, 0, 1]
    assert s.sampler_logprobs == [0.0, 0.0, -0.5, -0.5, 0.0, -0.5]
    assert s.num_loss_tokens == 3


def test_overlong_filter_drops_truncated_trajectories():
    done = trajectory([1], [([2, 3], [])], reward=1.0)
    cut = trajectory([1], [([4, 5, 6], [7])], finish_reason=FinishReason.CONTEXT_OVERFLOW)
    out_of_turns = trajectory([1], [([8], [])], finish_reason=FinishReason.MAX_TURNS)

    kept = dapo_samples([done, cut, out_of_turns], [1.0, -1.0, -1.0])
    assert [s.token_ids for s in kept] == [[1, 2, 3], [1, 8]]
    assert [s.advantage for s in kept] == [1.0, -1.0]
    assert total_loss_tokens(pack(kept, max_tokens=16)) == 3

    unfiltered = dapo_samples([done, cut, out_of_turns], [1.0, -1.0, -1.0], overlong_filter=False)
    assert len(unfiltered) == 3
    custom = dapo_samples(
        [done, cut, out_of_turns], [1.0, -1.0, -1.0],
        truncated={FinishReason.CONTEXT_OVERFLOW, FinishReason.MAX_TURNS},
    )
    assert [s.token_ids for s in custom] == [[1, 2, 3]]


def test_rft_keeps_only_resolved_trajectories():
    trajs = [
        trajectory([1], [([2], [])], resolved=True),
        trajectory([1], [([3], [])], resolved=False),
        trajectory([1], [([4], [])], resolved=None),
        trajectory([1], [([5], [9])], resolved=True),
    ]
    assert [s.token_ids for s in rft_samples(trajs)] == [[1, 2], [1, 5, 9]]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_are_isolated_in_a_hugging_face_qwen2(attention):
    # how the learner feeds a packed row to a real HF model on CPU: position ids + a 4D mask
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.Qwen2ForCausalLM(cfg).double().eval()
    model.set_attn_implementation(attention)

    def logprobs(row: PackedRow) -> torch.Tensor:
        mask = row.attention_mask()
        mask = mask if attention == "sdpa" else additive_mask(mask, torch.float64)
        h = model.model(input_ids=row.input_ids[None], position_ids=row.position_ids[None],
                        attention_mask=mask[None, None]).last_hidden_state[0]  # (T, H)
        return token_logprobs(h, model.lm_head.weight, row.targets, chunk_size=4)[0]

    samples = [Sample(list(range(3, 3 + n)), [0] + [1] * (n - 1), [0.0] * n, 1.0) for n in (5, 3, 4)]
    (row,) = pack(samples, max_tokens=64)
    for i, lp in zip(row.sample_indices, unpack(logprobs(row), row)):
        torch.testing.assert_close(lp, logprobs(pack([samples[i]], max_tokens=64)[0]), rtol=1e-10, atol=1e-10)


def test_rft_masks_the_turns_whose_tool_call_did_not_parse():
    import dataclasses

    traj = trajectory([1, 1], [([2, 3], [7]), ([4], [8, 8]), ([5, 6], [])], resolved=True)
    bad = dataclasses.replace(traj, turns=[traj.turns[0], dataclasses.replace(traj.turns[1], format_error=True),
                                           traj.turns[2]])
    (sample,) = rft_samples([bad])
    assert sample.token_ids == [1, 1, 2, 3, 7, 4, 8, 8, 5, 6]
    assert sample.loss_mask == [0, 0, 1, 1, 0, 0, 0, 0, 1, 1]  # the malformed turn [4] carries no loss
    assert [lp for lp, m in zip(sample.sampler_logprobs, sample.loss_mask) if not m] == [0.0] * 6
    (unmasked,) = rft_samples([bad], mask_format_errors=False)
    assert unmasked.loss_mask == [0, 0, 1, 1, 0, 1, 0, 0, 1, 1]
    (clean,) = rft_samples([traj])
    assert clean.loss_mask == unmasked.loss_mask


def test_sequence_mean_turns_the_token_level_loss_into_the_mean_of_per_episode_means():
    from learner.losses import dapo_loss
    from learner.packing import sequence_mean

    torch.manual_seed(0)
    samples = [Sample([1, 2, 3, 4, 5], [0, 1, 1, 1, 1], [-1.0] * 5, 1.5),  # 4 loss tokens
               Sample([1, 6, 7], [0, 1, 1], [-1.0] * 3, -0.5),  # 2
               Sample([1, 8], [0, 0], [0.0] * 2, 0.7)]  # none: left as is
    scaled = sequence_mean(samples)
    assert [s.advantage for s in scaled] == pytest.approx([1.5 * 6 / (2 * 4), -0.5 * 6 / (2 * 2), 0.7])
    assert [s.token_ids for s in scaled] == [s.token_ids for s in samples]
    # the token-level loss on the scaled samples equals the per-episode mean averaged over episodes
    logp = [torch.randn(len(s.token_ids)) for s in samples[:2]]
    old = [lp + 0.3 * torch.randn_like(lp) for lp in logp]  # off-policy, so clipping takes part

    def token_level(ss):
        adv = torch.cat([torch.full((len(s.token_ids),), s.advantage) for s in ss])
        mask = torch.cat([torch.tensor(s.loss_mask, dtype=torch.float32) for s in ss])
        return dapo_loss(torch.cat(logp), torch.cat(old), adv * mask, mask)[0]

    per_episode = [dapo_loss(lp, o, torch.full_like(lp, s.advantage) * torch.tensor(s.loss_mask, dtype=torch.float32),
                             torch.tensor(s.loss_mask, dtype=torch.float32))[0]
                   for lp, o, s in zip(logp, old, samples[:2])]
    assert token_level(scaled[:2]).item() == pytest.approx((sum(per_episode) / 2).item(), rel=1e-5)
    assert token_level(samples[:2]).item() != pytest.approx((sum(per_episode) / 2).item(), rel=1e-3)


def test_dapo_masks_malformed_calls_only_where_the_advantage_is_positive():
    import dataclasses

    traj = trajectory([1, 1], [([2, 3], [7]), ([4], [8, 8]), ([5, 6], [])])
    bad = dataclasses.replace(traj, turns=[traj.turns[0], dataclasses.replace(traj.turns[1], format_error=True),
                                           traj.turns[2]])
    win, lose, zero = dapo_samples([bad, bad, bad], [0.5, -0.5, 0.0], mask_positive_format_errors=True)
    assert win.loss_mask == [0, 0, 1, 1, 0, 0, 0, 0, 1, 1]  # a success does not reinforce the malformed turn
    assert lose.loss_mask == [0, 0, 1, 1, 0, 1, 0, 0, 1, 1]  # a failure still pushes it down
    assert zero.loss_mask == lose.loss_mask
    plain = dapo_samples([bad], [0.5])  # off by default in the function (DAPO as published)
    assert plain[0].loss_mask == lose.loss_mask
