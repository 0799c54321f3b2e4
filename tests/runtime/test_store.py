"""Trajectory store: atomic records, live readers in other processes, torn tails, corruption."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest

from runtime.records import Task, Trajectory, Turn
from runtime.store import (
    MAGIC,
    CorruptRecordError,
    Cursor,
    RecordDecodeError,
    StoreLockedError,
    StoreReader,
    TrajectoryStore,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_trajectory(i: int, tokens: int = 8) -> Trajectory:
    """Trajectory number `i`, deterministic and (for large `tokens`) incompressible."""
    rng = random.Random(i)
    action = [rng.randrange(150_000) for _ in range(tokens)]
    return Trajectory(
        episode_id=f"ep-{i}",
        task_id="task",
        group_id="grp",
        prompt_ids=[rng.randrange(150_000) for _ in range(tokens)],
        turns=[Turn(action_ids=action, action_logprobs=[-rng.random() for _ in action], observation_ids=[1, 2])],
        reward=float(i % 2),
        finish_reason="submitted",
        policy_version=i,
        created_at=1.0,
    )


def shard_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("shard-"))


def run_python(script: str, *args: str) -> subprocess.Popen[str]:
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def frame(kind: int, payload: bytes, flags: int = 0) -> bytes:
    """A frame built from the documented format, independently of the store's code."""
    head = struct.pack("<IBBHI", len(payload), kind, flags, 0, zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def test_records_of_every_kind_read_back_in_order(tmp_path: Path) -> None:
    task = Task(id="t", repo="r", base_commit="c", problem_statement="p", image="host", test_patch="",
                FAIL_TO_PASS=["a"], PASS_TO_PASS=[], test_command="pytest", log_parser="pytest")
    records = [make_trajectory(0), {"event": "eval", "pass@1": 0.25, 3: [b"x"]}, task, make_trajectory(1)]
    with TrajectoryStore.open_writer(tmp_path) as writer:
        positions = [writer.append(record) for record in records]
    assert positions == sorted(positions) and positions[0] == Cursor(0, len(MAGIC))
    assert list(TrajectoryStore.read(tmp_path)) == records
    # Reading from a record's position starts at that record.
    assert list(TrajectoryStore.read(tmp_path, positions[2])) == records[2:]


def test_unserialisable_record_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    with TrajectoryStore.open_writer(tmp_path) as writer:
        writer.append({"ok": 1})
        with pytest.raises(TypeError, match="not msgpack-serialisable"):
            writer.append({"when": object()})
        with pytest.raises(TypeError, match="Trajectory, Task or dict"):
            writer.append([1, 2])  # type: ignore[arg-type]
        writer.append({"ok": 2})
    assert list(TrajectoryStore.read(tmp_path)) == [{"ok": 1}, {"ok": 2}]


def test_shards_rotate_at_the_size_bound_and_seal(tmp_path: Path) -> None:
    bound = 64 * 1024
    with TrajectoryStore.open_writer(tmp_path, max_shard_bytes=bound) as writer:
        for i in range(40):
            writer.append(make_trajectory(i, tokens=2000))  # ~16 KB each, incompressible
    names = shard_files(tmp_path)
    assert len(names) >= 8
    assert all(name.endswith(".rec") for name in names[:-1]) and names[-1].endswith(".rec.open")
    assert all((tmp_path / name).stat().st_size <= bound for name in names)
    assert [t.episode_id for t in TrajectoryStore.read(tmp_path)] == [f"ep-{i}" for i in range(40)]


def test_rotate_seals_now_and_a_reopened_writer_continues_the_open_shard(tmp_path: Path) -> None:
    with TrajectoryStore.open_writer(tmp_path) as writer:
        writer.append({"n": 0})
        writer.rotate()
        writer.append({"n": 1})
    with TrajectoryStore.open_writer(tmp_path) as writer:
        assert writer.append({"n": 2}).shard == 1
    assert shard_files(tmp_path) == ["shard-00000000.rec", "shard-00000001.rec.open"]
    assert [r["n"] for r in TrajectoryStore.read(tmp_path)] == [0, 1, 2]


def test_reader_cursor_resumes_without_loss_or_duplicates(tmp_path: Path) -> None:
    with TrajectoryStore.open_writer(tmp_path, max_shard_bytes=4096) as writer:
        for i in range(30):
            writer.append({"n": i, "pad": "x" * 200})
        reader = StoreReader(tmp_path)
        first = reader.poll(max_records=7)
        saved = reader.cursor
        for i in range(30, 50):
            writer.append({"n": i, "pad": "x" * 200})
    resumed = StoreReader(tmp_path, saved).poll()
    assert [r["n"] for r in first] == list(range(7))
    assert [r["n"] for r in resumed] == list(range(7, 50))
    assert reader.poll(max_records=5)[0]["n"] == 7


def test_follow_yields_new_records_and_stops_when_idle(tmp_path: Path) -> None:
    reader = StoreReader(tmp_path)  # the store need not exist yet
    assert reader.poll() == []
    with TrajectoryStore.open_writer(tmp_path) as writer:
        for i in range(3):
            writer.append({"n": i})
        start = time.monotonic()
        seen = [r["n"] for r in reader.follow(poll_interval_s=0.01, idle_timeout_s=0.1)]
        assert seen == [0, 1, 2] and time.monotonic() - start < 5
        writer.append({"n": 3})
        assert [r["n"] for r in reader.follow(poll_interval_s=0.01, idle_timeout_s=0.05)] == [3]


def test_reader_in_another_process_sees_only_complete_records_while_writing(tmp_path: Path) -> None:
    # The writer writes half, waits until the reader has seen it (proving records are readable
    # while the shard is still being written), then writes the rest as fast as it can, rotating
    # often, while this process polls as fast as it can.
    n, go = 60, tmp_path / "go"
    writer = run_python(
        """
        import sys, time
        from pathlib import Path
        from tests.runtime.test_store import make_trajectory
        from runtime.store import TrajectoryStore
        root, n, go = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
        with TrajectoryStore.open_writer(root, max_shard_bytes=256 * 1024, fsync_every=0) as w:
            for i in range(n):
                if i == n // 2:
                    deadline = time.monotonic() + 20
                    while not go.exists() and time.monotonic() < deadline:
                        time.sleep(0.005)
                w.append(make_trajectory(i, tokens=6000))
        """,
        str(tmp_path / "store"), str(n), str(go),
    )
    reader = StoreReader(tmp_path / "store")
    seen: list[Trajectory] = []
    deadline = time.monotonic() + 30
    try:
        while len(seen) < n and time.monotonic() < deadline:
            batch = reader.poll()
            seen += batch
            if len(seen) >= n // 2 and not go.exists():
                assert writer.poll() is None, "the writer should be waiting for the reader"
                go.touch()
    finally:
        out, err = writer.communicate(timeout=30)
    assert writer.returncode == 0, err
    assert [t.episode_id for t in seen] == [f"ep-{i}" for i in range(n)]
    assert all(t == make_trajectory(i, tokens=6000) for i, t in enumerate(seen))


def test_partial_frame_is_invisible_until_complete(tmp_path: Path) -> None:
    with TrajectoryStore.open_writer(tmp_path) as writer:
        writer.append({"n": 0})
    shard = tmp_path / "shard-00000000.rec.open"
    data = frame(0, b"\x81\xa1n\x01")  # msgpack {"n": 1}, uncompressed
    reader = StoreReader(tmp_path)
    assert reader.poll() == [{"n": 0}]
    for cut in (3, 16, len(data) - 1):  # inside the header, at its end, inside the payload
        with open(shard, "ab") as f:
            f.write(data[:cut])
        assert reader.poll() == []
        with open(shard, "r+b") as f:
            f.truncate(f.seek(0, os.SEEK_END) - cut)
    with open(shard, "ab") as f:
        f.write(data)
    assert reader.poll() == [{"n": 1}]


def test_torn_tail_is_skipped_by_readers_and_truncated_by_the_next_writer(tmp_path: Path) -> None:
    with TrajectoryStore.open_writer(tmp_path) as writer:
        for i in range(5):
            last = writer.append(make_trajectory(i, tokens=500))
    shard = tmp_path / "shard-00000000.rec.open"
    os.truncate(shard, shard.stat().st_size - 100)  # a writer killed mid-record
    assert [t.episode_id for t in TrajectoryStore.read(tmp_path)] == [f"ep-{i}" for i in range(4)]
    with TrajectoryStore.open_writer(tmp_path) as writer:
        assert shard.stat().st_size == last.offset  # the torn record is gone
        assert writer.append(make_trajectory(9)) == last
    assert [t.episode_id for t in TrajectoryStore.read(tmp_path)] == ["ep-0", "ep-1", "ep-2", "ep-3", "ep-9"]


def test_zero_filled_tail_after_power_loss_is_a_torn_tail(tmp_path: Path) -> None:
    with TrajectoryStore.open_writer(tmp_path) as writer:
        writer.append({"n": 0})
    shard = tmp_path / "shard-00000000.rec.open"
    size = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(bytes(4096))
    assert list(TrajectoryStore.read(tmp_path)) == [{"n": 0}]
    with TrajectoryStore.open_writer(tmp_path) as writer:
        writer.append({"n": 1})
    assert list(TrajectoryStore.read(tmp_path)) == [{"n": 0}, {"n": 1}]
    assert shard.stat().st_size < size + 4096


@pytest.mark.parametrize("where", ["payload", "length"])
def test_flipped_byte_is_reported_with_shard_and_offset(tmp_path: Path, where: str) -> None:
    with TrajectoryStore.open_writer(tmp_path) as writer:
        writer.rotate()
        positions = [writer.append(make_trajectory(i, tokens=300)) for i in range(3)]
        writer.rotate()  # corruption in a sealed shard
    shard = tmp_path / "shard-00000000.rec"
    bad = positions[1] if where == "payload" else positions[2]
    # Byte 0 of a frame is its length: a flip there must not pass for a record being written.
    flip_at = bad.offset + (40 if where == "payload" else 0)
    data = bytearray(shard.read_bytes())
    data[flip_at] ^= 0x10
    shard.write_bytes(bytes(data))
    good = positions.index(bad)
    records = TrajectoryStore.read(tmp_path)
    assert [next(records).episode_id for _ in range(good)] == [f"ep-{i}" for i in range(good)]
    with pytest.raises(CorruptRecordError) as info:
        next(records)
    assert info.value.shard == str(shard) and info.value.offset == bad.offset
    assert f"shard-00000000.rec at offset {bad.offset}" in str(info.value)
    # A reader's cursor stays on the bad record: it is reported again, never skipped.
    reader = StoreReader(tmp_path, bad)
    for _ in range(2):
        with pytest.raises(CorruptRecordError):
            reader.poll()
    assert reader.cursor == bad


def test_writer_refuses_to_extend_a_corrupt_open_shard(tmp_path: Path) -> None:
    with TrajectoryStore.open_writer(tmp_path) as writer:
        first = writer.append({"n": 0})
        writer.append({"n": 1})
    shard = tmp_path / "shard-00000000.rec.open"
    original = shard.read_bytes()
    data = bytearray(original)
    data[first.offset + 20] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptRecordError, match=f"offset {first.offset}: payload checksum"):
        TrajectoryStore.open_writer(tmp_path)
    assert shard.read_bytes() == bytes(data)  # nothing truncated
    shard.write_bytes(original)
    TrajectoryStore.open_writer(tmp_path).close()  # the failed open released its lock


def test_intact_frame_of_unknown_kind_is_a_decode_error(tmp_path: Path) -> None:
    with TrajectoryStore.open_writer(tmp_path) as writer:
        writer.append({"n": 0})
    shard = tmp_path / "shard-00000000.rec.open"
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(frame(9, b"\x80"))
    with pytest.raises(RecordDecodeError, match=f"offset {offset}: unknown record kind 9"):
        list(TrajectoryStore.read(tmp_path))


def test_second_writer_is_refused_in_this_and_another_process(tmp_path: Path) -> None:
    with TrajectoryStore.open_writer(tmp_path):
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
            TrajectoryStore.open_writer(tmp_path)
        other = run_python(
            """
            import sys
            from runtime.store import TrajectoryStore, StoreLockedError
            try:
                TrajectoryStore.open_writer(sys.argv[1])
            except StoreLockedError as exc:
                print("refused:", exc)
            """,
            str(tmp_path),
        )
        out, err = other.communicate(timeout=30)
        assert out.startswith("refused:") and f"pid {os.getpid()}" in out, (out, err)
    TrajectoryStore.open_writer(tmp_path).close()


def test_crashed_writer_loses_no_appended_record_and_frees_the_lock(tmp_path: Path) -> None:
    crashed = run_python(
        """
        import os, sys
        from runtime.store import TrajectoryStore
        w = TrajectoryStore.open_writer(sys.argv[1], fsync_every=0)
        for i in range(10):
            w.append({"n": i})
        os._exit(3)  # no close, no flush
        """,
        str(tmp_path),
    )
    assert crashed.wait(timeout=30) == 3
    with TrajectoryStore.open_writer(tmp_path) as writer:
        writer.append({"n": 10})
    assert [r["n"] for r in TrajectoryStore.read(tmp_path)] == list(range(11))


def test_closed_writer_refuses_appends_and_read_needs_a_store(tmp_path: Path) -> None:
    writer = TrajectoryStore.open_writer(tmp_path / "s")
    writer.close()
    writer.close()
    with pytest.raises(Exception, match="writer is closed"):
        writer.append({"n": 0})
    with pytest.raises(FileNotFoundError):
        list(TrajectoryStore.read(tmp_path / "missing"))
