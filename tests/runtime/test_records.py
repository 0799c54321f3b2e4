"""Record types: validation names the field, msgpack round trips are exact, flattening aligns."""

from __future__ import annotations

import dataclasses
import math
import struct
from array import array

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.records import FinishReason, Task, Trajectory, Turn

f32 = st.floats(min_value=-1e4, max_value=0.0, width=32, allow_nan=False)
token_ids = st.lists(st.integers(min_value=0, max_value=2**31 - 1), max_size=40)
text = st.text(max_size=30)
nonempty = st.text(min_size=1, max_size=20)
metadata_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def turns(draw: st.DrawFn) -> Turn:
    ids = draw(token_ids)
    return Turn(
        action_ids=ids,
        action_logprobs=draw(st.lists(f32, min_size=len(ids), max_size=len(ids))),
        observation_ids=draw(token_ids),
        tool=draw(text),
        format_error=draw(st.booleans()),
        llm_s=draw(st.floats(0, 1e4)),
        tool_s=draw(st.floats(0, 1e4)),
    )


@st.composite
def trajectories(draw: st.DrawFn) -> Trajectory:
    return Trajectory(
        episode_id=draw(nonempty),
        task_id=draw(nonempty),
        group_id=draw(nonempty),
        prompt_ids=draw(token_ids.filter(bool)),
        turns=draw(st.lists(turns(), max_size=4)),
        reward=draw(st.floats(allow_nan=False, allow_infinity=False)),
        finish_reason=draw(st.sampled_from(FinishReason)),
        policy_version=draw(st.integers(0, 2**40)),
        endpoint=draw(text),
        patch=draw(text),
        resolved=draw(st.none() | st.booleans()),
        metrics=draw(st.dictionaries(text, st.floats(allow_nan=False))),
        created_at=draw(st.floats(0, 4e9)),
    )


@st.composite
def tasks(draw: st.DrawFn) -> Task:
    return Task(
        id=draw(nonempty),
        repo=draw(nonempty),
        base_commit=draw(nonempty),
        problem_statement=draw(text),
        image=draw(st.sampled_from(["host"]) | nonempty.map("podman:{}".format) | nonempty.map("dir:{}".format)),
        test_patch=draw(text),
        FAIL_TO_PASS=draw(st.lists(text, min_size=1, max_size=4)),
        PASS_TO_PASS=draw(st.lists(text, max_size=4)),
        test_command=draw(nonempty),
        log_parser=draw(nonempty),
        gold_patch=draw(st.none() | text),
        environment_setup_commit=draw(st.none() | nonempty),
        metadata=draw(st.dictionaries(text, metadata_values, max_size=3)),
        split=draw(st.none() | nonempty),
    )


def make_turn(**overrides: object) -> Turn:
    fields: dict[str, object] = {"action_ids": [5, 6], "action_logprobs": [-0.5, -1.25], "observation_ids": [7]}
    return Turn(**(fields | overrides))  # type: ignore[arg-type]


def make_trajectory(**overrides: object) -> Trajectory:
    fields: dict[str, object] = {
        "episode_id": "ep-1",
        "task_id": "task-1",
        "group_id": "grp-1",
        "prompt_ids": [1, 2, 3],
        "turns": [make_turn(), make_turn(action_ids=[8], action_logprobs=[-2.0], observation_ids=[])],
        "reward": 1.0,
        "finish_reason": "submitted",
        "policy_version": 4,
    }
    return Trajectory(**(fields | overrides))  # type: ignore[arg-type]


def make_task(**overrides: object) -> Task:
    fields: dict[str, object] = {
        "id": "astropy__astropy-12907",
        "repo": "astropy/astropy",
        "base_commit": "d16bfe05a744909de4b27f5875fe0d4ed41ce607",
        "problem_statement": "separability_matrix is wrong for nested models",
        "image": "podman:sweb.eval.astropy",
        "test_patch": "diff --git a/t.py b/t.py\n",
        "FAIL_TO_PASS": ["tests/test_sep.py::test_nested"],
        "PASS_TO_PASS": [],
        "test_command": "pytest -rA tests/test_sep.py",
        "log_parser": "pytest",
    }
    return Task(**(fields | overrides))  # type: ignore[arg-type]


# -- round trips -------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(trajectories())
def test_trajectory_round_trips_exactly_through_msgpack(traj: Trajectory) -> None:
    decoded = Trajectory.from_msgpack(traj.to_msgpack())
    assert decoded == traj
    assert decoded.token_ids() == traj.token_ids()
    assert decoded.sampler_logprobs() == traj.sampler_logprobs()


@settings(max_examples=100, deadline=None)
@given(tasks())
def test_task_round_trips_exactly_through_msgpack(task: Task) -> None:
    assert Task.from_msgpack(task.to_msgpack()) == task


@settings(deadline=None)
@given(trajectories())
def test_flattened_sequences_are_aligned(traj: Trajectory) -> None:
    ids, mask, lps = traj.token_ids(), traj.loss_mask(), traj.sampler_logprobs()
    assert len(ids) == len(mask) == len(lps) == traj.num_tokens
    assert sum(mask) == traj.num_model_tokens
    model_ids = [token for token, m in zip(ids, mask) if m]
    assert model_ids == [t for turn in traj.turns for t in turn.action_ids]
    assert [lp for lp, m in zip(lps, mask) if m] == [lp for turn in traj.turns for lp in turn.action_logprobs]
    assert all(lp == 0.0 for lp, m in zip(lps, mask) if not m)
    assert ids[: len(traj.prompt_ids)] == traj.prompt_ids and not any(mask[: len(traj.prompt_ids)])


def test_flattening_of_a_known_trajectory() -> None:
    traj = make_trajectory()
    assert traj.token_ids() == [1, 2, 3, 5, 6, 7, 8]
    assert traj.loss_mask() == [0, 0, 0, 1, 1, 0, 1]
    assert traj.sampler_logprobs() == [0.0, 0.0, 0.0, -0.5, -1.25, 0.0, -2.0]
    assert (traj.num_tokens, traj.num_model_tokens) == (7, 3)


def test_token_ids_are_packed_little_endian_int32_and_logprobs_float32() -> None:
    traj = make_trajectory(prompt_ids=[1, 2**31 - 1, 0])
    wire = msgpack.unpackb(traj.to_msgpack(), raw=False)
    assert wire["version"] == Trajectory.SCHEMA_VERSION
    assert wire["prompt_ids"] == struct.pack("<3i", 1, 2**31 - 1, 0)
    assert wire["turns"][0]["action_logprobs"] == struct.pack("<2f", -0.5, -1.25)
    assert wire["finish_reason"] == "submitted"


def test_logprobs_are_rounded_to_float32_on_construction() -> None:
    turn = make_turn(action_ids=[1], action_logprobs=[-0.1])
    (stored,) = struct.unpack("<f", struct.pack("<f", -0.1))
    assert turn.action_logprobs == [stored] != [-0.1]
    assert Turn.from_msgpack(turn.to_msgpack()) == turn


def test_from_dict_accepts_plain_lists_for_hand_written_records() -> None:
    data = make_trajectory(created_at=100.0).to_dict()
    data["prompt_ids"] = [1, 2, 3]
    data["turns"][0]["action_ids"] = [5, 6]
    data["turns"][0]["action_logprobs"] = [-0.5, -1.25]
    assert Trajectory.from_dict(data) == make_trajectory(created_at=100.0)


def test_gold_patch_is_not_in_repr() -> None:
    assert "SECRET" not in repr(make_task(gold_patch="SECRET fix"))


# -- validation names the field ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "error", "field"),
    [
        ({"episode_id": ""}, ValueError, "Trajectory.episode_id"),
        ({"task_id": 3}, TypeError, "Trajectory.task_id"),
        ({"prompt_ids": []}, ValueError, "Trajectory.prompt_ids"),
        ({"prompt_ids": [1, -2]}, ValueError, "Trajectory.prompt_ids[1]"),
        ({"prompt_ids": [1, 2**31]}, ValueError, "Trajectory.prompt_ids[1]"),
        ({"prompt_ids": [1.5]}, TypeError, "Trajectory.prompt_ids"),
        ({"prompt_ids": "abc"}, TypeError, "Trajectory.prompt_ids"),
        ({"turns": [{"action_ids": []}]}, TypeError, "Trajectory.turns[0]"),
        ({"reward": math.nan}, ValueError, "Trajectory.reward"),
        ({"reward": "1"}, TypeError, "Trajectory.reward"),
        ({"finish_reason": "gave_up"}, ValueError, "Trajectory.finish_reason"),
        ({"policy_version": -1}, ValueError, "Trajectory.policy_version"),
        ({"policy_version": True}, TypeError, "Trajectory.policy_version"),
        ({"resolved": 1}, TypeError, "Trajectory.resolved"),
        ({"metrics": {"a": "x"}}, TypeError, "Trajectory.metrics['a']"),
        ({"created_at": -5.0}, ValueError, "Trajectory.created_at"),
    ],
)
def test_trajectory_validation_names_the_field(overrides: dict, error: type, field: str) -> None:
    with pytest.raises(error) as info:
        make_trajectory(**overrides)
    assert str(info.value).startswith(field), str(info.value)


@pytest.mark.parametrize(
    ("overrides", "error", "field"),
    [
        ({"action_logprobs": [-0.5]}, ValueError, "Turn.action_logprobs"),
        ({"action_logprobs": [-0.5, math.nan]}, ValueError, "Turn.action_logprobs[1]"),
        ({"action_logprobs": [-0.5, -math.inf]}, ValueError, "Turn.action_logprobs[1]"),
        ({"action_logprobs": [-0.5, 1e300]}, ValueError, "Turn.action_logprobs[1]"),  # inf in float32
        ({"action_logprobs": [-0.5, "x"]}, TypeError, "Turn.action_logprobs"),
        ({"observation_ids": [-1]}, ValueError, "Turn.observation_ids[0]"),
        ({"action_ids": [5, 2**31], "action_logprobs": [-0.5, -0.5]}, ValueError, "Turn.action_ids[1]"),
        ({"action_ids": [5, 2**32], "action_logprobs": [-0.5, -0.5]}, ValueError, "Turn.action_ids[1]"),
        ({"action_ids": [5, 1.0], "action_logprobs": [-0.5, -0.5]}, TypeError, "Turn.action_ids"),
        ({"action_ids": (5, -2), "action_logprobs": [-0.5, -0.5]}, ValueError, "Turn.action_ids[1]"),
        ({"llm_s": math.inf}, ValueError, "Turn.llm_s"),
        ({"tool_s": "1"}, TypeError, "Turn.tool_s"),
        ({"format_error": "no"}, TypeError, "Turn.format_error"),
        ({"llm_s": -1.0}, ValueError, "Turn.llm_s"),
        ({"tool": None}, TypeError, "Turn.tool"),
    ],
)
def test_turn_validation_names_the_field(overrides: dict, error: type, field: str) -> None:
    with pytest.raises(error) as info:
        make_turn(**overrides)
    assert str(info.value).startswith(field), str(info.value)


def test_check_action_and_from_checked_make_the_constructors_turn() -> None:
    ids, lps = Turn.check_action([5, 2**31 - 1, True], (-0.1, 0, -2.5))
    assert ids == [5, 2**31 - 1, 1] and lps == make_turn(action_logprobs=[-0.1, 0, -2.5], action_ids=[1, 2, 3]).action_logprobs
    assert all(type(v) is int for v in ids) and all(type(v) is float for v in lps)
    turn = Turn.from_checked(ids, lps, [7], "bash", False, 0.5, 0.25)
    assert turn == Turn(action_ids=[5, 2**31 - 1, 1], action_logprobs=[-0.1, 0.0, -2.5], observation_ids=[7], tool="bash",
                        llm_s=0.5, tool_s=0.25)
    assert Turn.from_msgpack(turn.to_msgpack()) == turn
    with pytest.raises(ValueError, match=r"^Turn\.action_logprobs: length 1 != len\(action_ids\) 2"):
        Turn.check_action([1, 2], [-0.5])
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match=r"^Turn\.action_logprobs\[1\]: logprob must be finite"):
            Turn.check_action([1, 2], [-0.5, bad])
    # Finite float32s whose top byte is 0x7f or 0xff (|x| >= 2**127) are checked the slow way, and pass.
    assert Turn.check_action([1, 2, 3], [3e38, -3e38, -0.0])[1] == array("f", [3e38, -3e38, -0.0]).tolist()


def test_trajectory_from_checked_makes_the_constructors_record_and_checks_the_other_fields() -> None:
    ref = make_trajectory(endpoint="e0", patch="diff", metrics={"turns": 2, "odd": math.nan})
    prompt = Trajectory.check_prompt_ids([1, 2, True])
    assert prompt == [1, 2, 1] and all(type(v) is int for v in prompt)
    edges = [0x80, 0x8000 + 1, 0x800000 + 5, 0x7F000000, 2**31 - 1]  # bytes >= 0x80 below the top one are fine
    assert Trajectory.check_prompt_ids(edges) == edges
    for bad in (2**31, 2**31 + 0x7F, 2**32 - 1):
        with pytest.raises(ValueError, match=r"^Trajectory\.prompt_ids\[1\]: token id .* outside int32"):
            Trajectory.check_prompt_ids([1, bad])
    made = Trajectory.from_checked(episode_id="ep-1", task_id="task-1", group_id="grp-1", prompt_ids=prompt,
                                   turns=list(ref.turns), reward=1, finish_reason="submitted", policy_version=4,
                                   endpoint="e0", patch="diff", metrics={"turns": 2, "odd": math.nan})
    assert dataclasses.replace(made, prompt_ids=[1, 2, 3], metrics={}, created_at=0.0) == dataclasses.replace(
        ref, metrics={}, created_at=0.0)
    assert made.finish_reason is FinishReason.SUBMITTED and type(made.reward) is float
    assert made.metrics["turns"] == 2.0 and type(made.metrics["turns"]) is float and math.isnan(made.metrics["odd"])
    assert Trajectory.from_msgpack(made.to_msgpack()).turns == ref.turns
    base = dict(episode_id="e", task_id="t", group_id="g", prompt_ids=[1], turns=[], reward=0.0,
                finish_reason=FinishReason.ERROR, policy_version=0)
    for overrides, error, field in [({"episode_id": ""}, ValueError, "Trajectory.episode_id"),
                                    ({"reward": math.inf}, ValueError, "Trajectory.reward"),
                                    ({"finish_reason": "done"}, ValueError, "Trajectory.finish_reason"),
                                    ({"policy_version": "1"}, TypeError, "Trajectory.policy_version"),
                                    ({"patch": b"diff"}, TypeError, "Trajectory.patch"),
                                    ({"metrics": {"x": "1"}}, TypeError, "Trajectory.metrics")]:
        with pytest.raises(error, match=rf"^{field}"):
            Trajectory.from_checked(**(base | overrides))
    with pytest.raises(ValueError, match=r"^Trajectory\.prompt_ids: must not be empty"):
        Trajectory.check_prompt_ids([])
    with pytest.raises(ValueError, match=r"^Trajectory\.prompt_ids\[1\]: token id must be >= 0"):
        Trajectory.check_prompt_ids([1, -2])


def test_graded_sets_reward_and_resolved_only() -> None:
    traj = make_trajectory(reward=0.0, resolved=None)
    graded = traj.graded(reward=1, resolved=True)
    assert graded == make_trajectory(reward=1.0, resolved=True, created_at=traj.created_at)
    assert type(graded.reward) is float and traj.reward == 0.0 and traj.resolved is None
    assert graded.prompt_ids is not traj.prompt_ids and graded.turns is not traj.turns
    with pytest.raises(ValueError, match=r"^Trajectory\.reward"):
        traj.graded(reward=math.nan, resolved=False)
    with pytest.raises(TypeError, match=r"^Trajectory\.resolved"):
        traj.graded(reward=0.0, resolved=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "error", "field"),
    [
        ({"id": ""}, ValueError, "Task.id"),
        ({"image": "docker:foo"}, ValueError, "Task.image"),
        ({"image": "podman:"}, ValueError, "Task.image"),
        ({"FAIL_TO_PASS": []}, ValueError, "Task.FAIL_TO_PASS"),
        ({"FAIL_TO_PASS": "test_a"}, TypeError, "Task.FAIL_TO_PASS"),
        ({"PASS_TO_PASS": ["ok", 3]}, TypeError, "Task.PASS_TO_PASS[1]"),
        ({"gold_patch": b"diff"}, TypeError, "Task.gold_patch"),
        ({"metadata": {"when": object()}}, TypeError, "Task.metadata['when']"),
        ({"metadata": {1: "x"}}, TypeError, "Task.metadata key 1"),
    ],
)
def test_task_validation_names_the_field(overrides: dict, error: type, field: str) -> None:
    with pytest.raises(error) as info:
        make_task(**overrides)
    assert str(info.value).startswith(field), str(info.value)


def test_from_dict_rejects_unknown_and_missing_keys_by_name() -> None:
    data = make_task().to_dict()
    with pytest.raises(ValueError, match="unknown key 'hints_text'"):
        Task.from_dict(data | {"hints_text": "..."})
    del data["repo"]
    with pytest.raises(ValueError, match="missing key 'repo'"):
        Task.from_dict(data)


def test_from_dict_names_the_bad_turn() -> None:
    data = make_trajectory().to_dict()
    data["turns"][1]["action_ids"] = b"\x01\x02\x03"  # not a multiple of 4 bytes
    with pytest.raises(ValueError, match=r"^Trajectory\.turns\[1\]: Turn\.action_ids: packed length 3"):
        Trajectory.from_dict(data)


def test_schema_version_is_required_and_newer_ones_refused() -> None:
    data = make_trajectory().to_dict()
    with pytest.raises(ValueError, match="schema version 2 is newer"):
        Trajectory.from_dict(data | {"version": 2})
    with pytest.raises(ValueError, match="missing key 'version'"):
        Trajectory.from_dict({k: v for k, v in data.items() if k != "version"})
    assert Trajectory.from_dict(data) == make_trajectory(created_at=data["created_at"])


def test_from_msgpack_rejects_garbage_with_value_error() -> None:
    with pytest.raises(ValueError, match="Trajectory.from_msgpack"):
        Trajectory.from_msgpack(b"\xc1garbage")
    with pytest.raises(TypeError, match="expected a mapping"):
        Trajectory.from_msgpack(msgpack.packb([1, 2]))


def test_records_are_frozen_and_copy_their_inputs() -> None:
    prompt = [1, 2, 3]
    traj = make_trajectory(prompt_ids=prompt)
    prompt.append(4)
    assert traj.prompt_ids == [1, 2, 3]
    with pytest.raises(dataclasses.FrozenInstanceError):
        traj.reward = 0.0  # type: ignore[misc]
    graded = dataclasses.replace(traj, reward=0.0, resolved=False)
    assert (graded.reward, graded.resolved, graded.turns) == (0.0, False, traj.turns)
