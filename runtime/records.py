"""Shared record types: `Task`, `Turn`, `Trajectory`, and their msgpack encoding.

This module owns the shape of the data that crosses process boundaries: tasks loaded by the
agent, trajectories produced by the scheduler and consumed by the learner, and what the
trajectory store (`runtime.store`) writes to disk. Records are frozen dataclasses validated in
`__post_init__`; a bad field raises `TypeError` (wrong type) or `ValueError` (wrong value) whose
message starts with `Class.field`.

Wire form (`to_dict()` / `from_dict()`, and `to_msgpack()` / `from_msgpack()` on top):

- A msgpack map of the dataclass fields plus ``"version"``, the record type's schema version
  (`SCHEMA_VERSION`). `from_dict` reads every version up to its own and refuses newer ones, so
  stores written by older code stay readable; unknown or missing keys are errors naming the key.
- Token ids (`Trajectory.prompt_ids`, `Turn.action_ids`, `Turn.observation_ids`) are msgpack
  ``bin`` values holding packed little-endian int32 (4 bytes per token, `array('i')`), not lists of
  msgpack ints: about 4x smaller and ~50x faster to encode than per-number msgpack.
- Sampler logprobs (`Turn.action_logprobs`) are packed little-endian IEEE float32 (4 bytes each).
  `Turn` rounds logprobs to float32 when it is constructed, so a record compares equal to its
  decoded copy and the learner sees the same values whether it reads from memory or from disk.
  `from_dict` also accepts plain lists of numbers in place of packed bytes (hand-written fixtures).

A 32k-token trajectory encodes or decodes in a few milliseconds (most of it is the int32 range and
float32 finiteness checks).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import reprlib
import sys
import time
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

__all__ = ["FinishReason", "Task", "Trajectory", "Turn"]

# The packed encodings assume 4-byte C int and float; true on every platform CPython targets.
assert array("i").itemsize == 4 and array("f").itemsize == 4
_BIG_ENDIAN = sys.byteorder == "big"

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = 6


def _describe(value: Any) -> str:
    return f"{_short.repr(value)} ({type(value).__name__})"


# ---------------------------------------------------------------------------------------------
# Field validators. Each returns the normalised value or raises naming `where` ("Class.field").


def _str(where: str, value: Any, *, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{where}: expected str, got {_describe(value)}")
    if not empty and not value:
        raise ValueError(f"{where}: must not be empty")
    return value


def _opt_str(where: str, value: Any) -> str | None:
    return None if value is None else _str(where, value)


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{where}: expected bool, got {_describe(value)}")
    return value


def _int(where: str, value: Any, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: expected int, got {_describe(value)}")
    if value < minimum:
        raise ValueError(f"{where}: must be >= {minimum}, got {value}")
    return value


def _float(where: str, value: Any, *, finite: bool = True, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: expected float, got {_describe(value)}")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{where}: must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}: must be >= {minimum}, got {value}")
    return value


def _str_list(where: str, value: Any) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{where}: expected list[str], got {_describe(value)}")
    return [_str(f"{where}[{i}]", item) for i, item in enumerate(value)]


# The most significant byte of each item of a 32-bit array('I') or array('f'), sliced out of its
# bytes (of a float: the sign and the top 7 exponent bits); None where the type is not 32-bit.
_TOP_BYTES = slice(3, None, 4) if sys.byteorder == "little" else slice(0, None, 4)
_UINT32_HIGH_BYTES = _TOP_BYTES if array("I").itemsize == 4 else None
_FLOAT32_TOP_BYTES = _TOP_BYTES if array("f").itemsize == 4 else None


def _token_ids(where: str, value: Any) -> list[int]:
    """Token ids as a list of ints in [0, 2**31): the int32 range the packed encoding holds."""
    if type(value) is list and _UINT32_HIGH_BYTES is not None:  # the common case, fast: turns and prompts
        try:
            # 'I' (unsigned 32-bit) checks type and sign at a quarter of the cost of 'i' (which
            # parses each item as a format argument); every high byte < 0x80 then bounds it to int32
            # (in C: `max` would box each item, 6 us for a 380-token prompt against 0.2).
            ids = array("I", value)
        except (TypeError, OverflowError):
            pass  # the general path says what is wrong
        else:
            if ids.tobytes()[_UINT32_HIGH_BYTES].isascii():
                return ids.tolist()
    if isinstance(value, array) and value.typecode == "i":
        ids = value
    else:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            raise TypeError(f"{where}: expected a sequence of int token ids, got {_describe(value)}")
        try:
            ids = array("i", value)  # C-speed type and range check of every element
        except TypeError as exc:
            raise TypeError(f"{where}: expected int token ids: {exc}") from None
        except OverflowError:
            bad = next(i for i, v in enumerate(value) if not -(2**31) <= v < 2**31)
            raise ValueError(f"{where}[{bad}]: token id {value[bad]} is outside int32") from None
    if ids and min(ids) < 0:
        bad = next(i for i, v in enumerate(ids) if v < 0)
        raise ValueError(f"{where}[{bad}]: token id must be >= 0, got {ids[bad]}")
    return ids.tolist()


def _logprobs(where: str, value: Any) -> list[float]:
    """Logprobs rounded to float32 (the stored precision) and checked finite."""
    if isinstance(value, array) and value.typecode == "f":
        lps = value
    else:
        # a plain list (a turn's logprobs, the common case) skips the ABC checks
        if type(value) is not list and (isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence)):
            raise TypeError(f"{where}: expected a sequence of float logprobs, got {_describe(value)}")
        try:
            lps = array("f", value)
        except TypeError as exc:
            raise TypeError(f"{where}: expected float logprobs: {exc}") from None
    # A NaN or inf would poison the importance ratio exp(new - old) in the DAPO loss. A float32 is
    # not finite only if its top byte, sign aside, is 0x7f: where no top byte is 0x7f or 0xff all are
    # finite (a check in C; logprobs have top bytes 0x80-0xc4). Else the sum is finite iff every
    # element is (|logprob| * 2**31 cannot overflow a double).
    top = lps.tobytes()[_FLOAT32_TOP_BYTES] if _FLOAT32_TOP_BYTES is not None else b"\x7f"
    if (b"\x7f" in top or b"\xff" in top) and not math.isfinite(sum(lps)):
        bad = next(i for i, v in enumerate(lps) if not math.isfinite(v))
        raise ValueError(f"{where}[{bad}]: logprob must be finite (float32), got {lps[bad]}")
    return lps.tolist()


def _pack(typecode: str, values: list[int] | list[float]) -> bytes:
    packed = array(typecode, values)
    if _BIG_ENDIAN:
        packed.byteswap()
    return packed.tobytes()


def _unpack(where: str, typecode: str, value: Any) -> array | Any:
    """Packed little-endian bytes -> array; lists pass through to the field validator."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return value
    if len(value) % 4:
        raise ValueError(f"{where}: packed length {len(value)} is not a multiple of 4 bytes")
    unpacked = array(typecode)
    unpacked.frombytes(value)
    if _BIG_ENDIAN:
        unpacked.byteswap()
    return unpacked


def _check_msgpackable(where: str, value: Any) -> None:
    try:
        msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"{where}: not msgpack-serialisable: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Serialisation shared by the record classes.


class _Record:
    """to_dict/from_dict/msgpack for a flat dataclass; subclasses override the packed fields."""

    SCHEMA_VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.SCHEMA_VERSION}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, enum.Enum) else value
        return out

    @classmethod
    def _fields_from_dict(cls, data: Any) -> dict[str, Any]:
        name = cls.__name__
        if not isinstance(data, Mapping):
            raise TypeError(f"{name}.from_dict: expected a mapping, got {_describe(data)}")
        data = dict(data)
        version = data.pop("version", None)
        if version is None:
            raise ValueError(f"{name}.from_dict: missing key 'version'")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"{name}.from_dict: 'version' must be a positive int, got {version!r}")
        if version > cls.SCHEMA_VERSION:
            raise ValueError(
                f"{name}.from_dict: schema version {version} is newer than this code reads "
                f"({cls.SCHEMA_VERSION}); upgrade swe-dapo to read it"
            )
        # Older versions are upgraded here, one step at a time, when SCHEMA_VERSION is bumped.
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for key in data:
            if key not in known:
                raise ValueError(f"{name}.from_dict: unknown key {key!r}")
        for key, f in known.items():
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and key not in data:
                raise ValueError(f"{name}.from_dict: missing key {key!r}")
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        return cls(**cls._fields_from_dict(data))

    def to_msgpack(self) -> bytes:
        return msgpack.packb(self.to_dict(), use_bin_type=True)

    @classmethod
    def from_msgpack(cls, data: bytes) -> Any:
        try:
            decoded = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except (msgpack.UnpackException, ValueError) as exc:
            raise ValueError(f"{cls.__name__}.from_msgpack: not valid msgpack: {exc}") from exc
        return cls.from_dict(decoded)


# ---------------------------------------------------------------------------------------------
# Records.

_IMAGE_FORMS = "'host', 'podman:<name>' or 'dir:<path>'"


@dataclass(frozen=True, kw_only=True)
class Task(_Record):
    """One software-engineering task: a repository at a commit, an issue, and the tests that grade it.

    `gold_patch` is the reference fix; it is used for grading and SWE-RL similarity rewards and must
    never be shown to the policy (it is left out of `repr` so it cannot leak through a log line).
    `FAIL_TO_PASS` must be non-empty: a task with no failing test cannot be graded.
    """

    id: str
    repo: str
    base_commit: str
    problem_statement: str
    image: str  # sandbox image: "host", "podman:<name>" or "dir:<path>"
    test_patch: str
    FAIL_TO_PASS: list[str]
    PASS_TO_PASS: list[str]
    test_command: str
    log_parser: str  # name of a parser in agent's grading (pytest, django, sympy, ...)
    gold_patch: str | None = field(default=None, repr=False)
    environment_setup_commit: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    split: str | None = None

    def __post_init__(self) -> None:
        for name in ("id", "repo", "base_commit", "test_command", "log_parser"):
            _str(f"Task.{name}", getattr(self, name), empty=False)
        _str("Task.problem_statement", self.problem_statement)
        _str("Task.test_patch", self.test_patch)
        image = _str("Task.image", self.image, empty=False)
        kind, sep, rest = image.partition(":")
        if not (image == "host" or (sep and kind in ("podman", "dir") and rest)):
            raise ValueError(f"Task.image: expected {_IMAGE_FORMS}, got {image!r}")
        set_ = object.__setattr__  # frozen: normalise copies in place once, here
        set_(self, "FAIL_TO_PASS", _str_list("Task.FAIL_TO_PASS", self.FAIL_TO_PASS))
        if not self.FAIL_TO_PASS:
            raise ValueError("Task.FAIL_TO_PASS: must name at least one test")
        set_(self, "PASS_TO_PASS", _str_list("Task.PASS_TO_PASS", self.PASS_TO_PASS))
        for name in ("gold_patch", "environment_setup_commit", "split"):
            _opt_str(f"Task.{name}", getattr(self, name))
        if not isinstance(self.metadata, Mapping):
            raise TypeError(f"Task.metadata: expected dict[str, ...], got {_describe(self.metadata)}")
        for key, value in self.metadata.items():
            _str(f"Task.metadata key {key!r}", key)
            _check_msgpackable(f"Task.metadata[{key!r}]", value)
        set_(self, "metadata", dict(self.metadata))


class FinishReason(enum.StrEnum):
    """Why an episode ended."""

    SUBMITTED = "submitted"  # the model called `submit`
    MAX_TURNS = "max_turns"
    CONTEXT_OVERFLOW = "context_overflow"  # the next prompt would exceed the model's context
    TIMEOUT = "timeout"  # the episode's wall-clock budget ran out
    ERROR = "error"  # infrastructure failure (sandbox, endpoint); not the model's fault


@dataclass(frozen=True, kw_only=True)
class Turn(_Record):
    """One model turn: the tokens the model sampled (trained) and the tool observation (masked)."""

    action_ids: list[int] = field(repr=False)
    action_logprobs: list[float] = field(repr=False)  # sampler logprobs, float32, one per action id
    observation_ids: list[int] = field(default_factory=list, repr=False)
    tool: str = ""  # tool the model called ("bash", "submit", ...); "" when none parsed
    format_error: bool = False  # the tool call did not parse
    llm_s: float = 0.0  # seconds waiting for the sampler
    tool_s: float = 0.0  # seconds running the tool

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        ids, lps = self.check_action(self.action_ids, self.action_logprobs)
        set_(self, "action_ids", ids)
        set_(self, "action_logprobs", lps)
        set_(self, "observation_ids", _token_ids("Turn.observation_ids", self.observation_ids))
        if type(self.tool) is not str:
            _str("Turn.tool", self.tool)
        if type(self.format_error) is not bool:
            _bool("Turn.format_error", self.format_error)
        # An episode builds a Turn per model turn: plain non-negative finite floats skip the calls.
        llm_s, tool_s = self.llm_s, self.tool_s
        if not (type(llm_s) is float and 0.0 <= llm_s < math.inf):
            set_(self, "llm_s", _float("Turn.llm_s", llm_s, minimum=0.0))
        if not (type(tool_s) is float and 0.0 <= tool_s < math.inf):
            set_(self, "tool_s", _float("Turn.tool_s", tool_s, minimum=0.0))

    @staticmethod
    def check_action(action_ids: Any, action_logprobs: Any) -> tuple[list[int], list[float]]:
        """A sampler's tokens and logprobs checked and normalised as the constructor does it (same
        errors, naming ``Turn.action_ids`` / ``Turn.action_logprobs``): new lists, logprobs rounded
        to float32. With `from_checked`, the episode loop's fast path: it checks what the sampler
        returned as soon as it arrives, and builds the turn later without a second pass."""
        ids = _token_ids("Turn.action_ids", action_ids)
        lps = _logprobs("Turn.action_logprobs", action_logprobs)
        if len(lps) != len(ids):
            raise ValueError(f"Turn.action_logprobs: length {len(lps)} != len(action_ids) {len(ids)}")
        return ids, lps

    @classmethod
    def from_checked(cls, action_ids: list[int], action_logprobs: list[float], observation_ids: list[int],
                     tool: str, format_error: bool, llm_s: float, tool_s: float) -> Turn:
        """A Turn of fields already in the constructor's normal form, not checked again: the action as
        `check_action` returned it, observation ids a new list of ints from the tokenizer, `tool` a
        str, `format_error` a bool, the times non-negative floats. Only for the episode loop, which
        builds one per model turn; anything else uses the constructor."""
        turn = object.__new__(cls)
        turn.__dict__.update(action_ids=action_ids, action_logprobs=action_logprobs, observation_ids=observation_ids,
                             tool=tool, format_error=format_error, llm_s=llm_s, tool_s=tool_s)
        return turn

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["action_ids"] = _pack("i", self.action_ids)
        out["action_logprobs"] = _pack("f", self.action_logprobs)
        out["observation_ids"] = _pack("i", self.observation_ids)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Turn:
        fields = cls._fields_from_dict(data)
        for name, code in (("action_ids", "i"), ("action_logprobs", "f"), ("observation_ids", "i")):
            if name in fields:
                fields[name] = _unpack(f"Turn.{name}", code, fields[name])
        return cls(**fields)


@dataclass(frozen=True, kw_only=True)
class Trajectory(_Record):
    """One episode of one task as the learner trains on it: exact token ids, never re-tokenised.

    The flat sequence is ``prompt_ids + sum(turn.action_ids + turn.observation_ids)``; only action
    tokens carry loss (`loss_mask`). Rollouts of one task for group-normalised advantages share a
    `group_id`.
    """

    episode_id: str
    task_id: str
    group_id: str
    prompt_ids: list[int] = field(repr=False)
    turns: list[Turn] = field(repr=False)
    reward: float
    finish_reason: FinishReason
    policy_version: int  # learner step whose weights sampled this episode
    endpoint: str = ""  # inference endpoint that served the episode
    patch: str = field(default="", repr=False)  # the model's final diff against base_commit
    resolved: bool | None = None  # None: not graded (or grading errored)
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)  # unix seconds

    def __post_init__(self) -> None:
        for name in ("episode_id", "task_id", "group_id"):
            _str(f"Trajectory.{name}", getattr(self, name), empty=False)
        set_ = object.__setattr__
        set_(self, "prompt_ids", self.check_prompt_ids(self.prompt_ids))
        if isinstance(self.turns, (str, bytes)) or not isinstance(self.turns, Sequence):
            raise TypeError(f"Trajectory.turns: expected list[Turn], got {_describe(self.turns)}")
        for i, turn in enumerate(self.turns):
            if not isinstance(turn, Turn):
                raise TypeError(f"Trajectory.turns[{i}]: expected Turn, got {_describe(turn)}")
        set_(self, "turns", list(self.turns))
        self._check_scalars()

    @staticmethod
    def check_prompt_ids(prompt_ids: Any) -> list[int]:
        """`prompt_ids` checked and normalised as the constructor does it (a new list, same errors).
        With `from_checked`: the episode loop checks its prompt before the first sample, not after
        the last one."""
        ids = _token_ids("Trajectory.prompt_ids", prompt_ids)
        if not ids:
            raise ValueError("Trajectory.prompt_ids: must not be empty")
        return ids

    @classmethod
    def from_checked(cls, *, episode_id: str, task_id: str, group_id: str, prompt_ids: list[int], turns: list[Turn],
                     reward: float, finish_reason: FinishReason, policy_version: int, endpoint: str = "",
                     patch: str = "", resolved: bool | None = None, metrics: dict[str, float] | None = None) -> Trajectory:
        """A Trajectory whose `prompt_ids` came from `check_prompt_ids` and whose `turns` are a new list
        of Turns (`Turn.from_checked` or the constructor): those two are taken as they are, every other
        field is checked as the constructor checks it. Only for the episode loop, which ends thousands
        of episodes at once at the end of a batch (the full check cost ~20 us each there)."""
        out = object.__new__(cls)
        out.__dict__.update(episode_id=episode_id, task_id=task_id, group_id=group_id, prompt_ids=prompt_ids,
                            turns=turns, reward=reward, finish_reason=finish_reason, policy_version=policy_version,
                            endpoint=endpoint, patch=patch, resolved=resolved,
                            metrics={} if metrics is None else metrics, created_at=time.time())
        for name in ("episode_id", "task_id", "group_id"):
            _str(f"Trajectory.{name}", getattr(out, name), empty=False)
        out._check_scalars()
        return out

    def _check_scalars(self) -> None:
        """The constructor's checks of every field but `prompt_ids` and `turns` (and the ids above)."""
        set_ = object.__setattr__
        set_(self, "reward", _float("Trajectory.reward", self.reward))
        try:
            set_(self, "finish_reason", FinishReason(self.finish_reason))
        except ValueError:
            allowed = ", ".join(repr(r.value) for r in FinishReason)
            raise ValueError(
                f"Trajectory.finish_reason: expected one of {allowed}, got {_describe(self.finish_reason)}"
            ) from None
        _int("Trajectory.policy_version", self.policy_version)
        _str("Trajectory.endpoint", self.endpoint)
        _str("Trajectory.patch", self.patch)
        if self.resolved is not None:
            _bool("Trajectory.resolved", self.resolved)
        if not isinstance(self.metrics, Mapping):
            raise TypeError(f"Trajectory.metrics: expected dict[str, float], got {_describe(self.metrics)}")
        metrics = {}
        for key, value in self.metrics.items():
            if type(key) is not str or type(value) is not float:  # (plain floats and str keys pass as they are)
                _str(f"Trajectory.metrics key {key!r}", key)
                # Non-finite metrics are kept: losing an episode over a NaN diagnostic loses data.
                value = _float(f"Trajectory.metrics[{key!r}]", value, finite=False)
            metrics[key] = value
        set_(self, "metrics", metrics)
        set_(self, "created_at", _float("Trajectory.created_at", self.created_at, minimum=0.0))

    def graded(self, *, reward: float, resolved: bool | None) -> Trajectory:
        """A copy with `reward` and `resolved` set (checked as the constructor checks them); the other
        fields, checked when this record was built, are not checked again (`dataclasses.replace`
        would re-check every token of the episode)."""
        reward = _float("Trajectory.reward", reward)
        if resolved is not None:
            _bool("Trajectory.resolved", resolved)
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__, prompt_ids=list(self.prompt_ids), turns=list(self.turns),
                            metrics=dict(self.metrics), reward=reward, resolved=resolved)
        return out

    # -- flattening for the learner: three aligned sequences of length num_tokens --------------

    def token_ids(self) -> list[int]:
        ids = list(self.prompt_ids)
        for turn in self.turns:
            ids += turn.action_ids
            ids += turn.observation_ids
        return ids

    def loss_mask(self, *, skip_format_errors: bool = False) -> list[int]:
        """1 on tokens the model sampled, 0 on prompt and observation tokens (and, with
        `skip_format_errors`, on the turns whose tool call did not parse)."""
        mask = [0] * len(self.prompt_ids)
        for turn in self.turns:
            mask += [0 if skip_format_errors and turn.format_error else 1] * len(turn.action_ids)
            mask += [0] * len(turn.observation_ids)
        return mask

    def sampler_logprobs(self, *, skip_format_errors: bool = False) -> list[float]:
        """Sampler logprob of each token of `token_ids()`; 0.0 where `loss_mask()` (with the same
        `skip_format_errors`) is 0."""
        lps = [0.0] * len(self.prompt_ids)
        for turn in self.turns:
            lps += [0.0] * len(turn.action_ids) if skip_format_errors and turn.format_error else turn.action_logprobs
            lps += [0.0] * len(turn.observation_ids)
        return lps

    @property
    def num_model_tokens(self) -> int:
        return sum(len(turn.action_ids) for turn in self.turns)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + sum(
            len(turn.action_ids) + len(turn.observation_ids) for turn in self.turns
        )

    # -- wire form -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["prompt_ids"] = _pack("i", self.prompt_ids)
        out["turns"] = [turn.to_dict() for turn in self.turns]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Trajectory:
        fields = cls._fields_from_dict(data)
        if "prompt_ids" in fields:
            fields["prompt_ids"] = _unpack("Trajectory.prompt_ids", "i", fields["prompt_ids"])
        turns = fields.get("turns")
        if isinstance(turns, list):
            fields["turns"] = [
                _turn_from_dict(f"Trajectory.turns[{i}]", turn) for i, turn in enumerate(turns)
            ]
        return cls(**fields)


def _turn_from_dict(where: str, data: Any) -> Turn:
    try:
        return Turn.from_dict(data)
    except (TypeError, ValueError) as exc:
        # Say which turn of the trajectory was bad, keeping the original type.
        raise type(exc)(f"{where}: {exc}") from exc
