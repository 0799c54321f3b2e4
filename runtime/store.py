"""Trajectory store: append-only shards of checksummed, zstd-compressed msgpack records.

This module owns the on-disk format that the agent's scheduler writes and the learner (or any
other process) reads, live or later. One process writes; any number of processes read.

Directory layout::

    LOCK                       flock'ed by the one writer; holds the writer's pid
    shard-00000000.rec         sealed shards: complete, fsynced, never written again
    shard-00000001.rec.open    the active shard: at most one, always the highest index

A shard starts with the 8-byte magic ``b"SWDREC\\x00\\x01"`` (the last two bytes are the format
version) followed by frames. A frame is a 16-byte little-endian header then the payload::

    u32 payload_len | u8 kind | u8 flags | u16 reserved (0) | u32 crc32(payload) | u32 crc32(header[0:12])

kind: 0 = a msgpack map (any msgpack-able dict), 1 = `Trajectory`, 2 = `Task` (their
`to_msgpack()` form, see `runtime.records`). flags bit 0: payload is zstd-compressed.
The header has its own checksum so that a damaged length is reported as corruption instead of
being mistaken for a record still being written.

Guarantees:

- Atomic records: each frame is written with one `write(2)` on an O_APPEND descriptor, and readers
  return a record only once its whole frame is present and both checksums match. A frame that
  runs past the end of the file (a writer killed mid-write, or still writing) is a *torn tail*:
  readers stop before it (and pick it up once complete); a writer that reopens the store truncates
  it. An all-zero tail (what a power loss can leave) counts as torn too. Anything else that fails
  a checksum raises `CorruptRecordError` naming the shard file and byte offset; it is never
  skipped or returned.
- Durability: every `append` reaches the OS before it returns (a reader in another process sees it
  at once; a crash of the writer process loses nothing). It reaches the disk on `fsync`, which the
  writer does every `fsync_every` records, on `flush()`, on rotation and on `close()`: a power loss
  can lose at most the last `fsync_every - 1` records.
- Rotation: when the next frame would grow the active shard past `max_shard_bytes`, the shard is
  fsynced, renamed ``.rec.open -> .rec`` and the directory fsynced; the next append opens a new
  shard. A reader that finds a shard sealed knows its content is final.
- One writer: `StoreWriter` takes a non-blocking `flock` on ``LOCK``; a second writer (in any
  process) gets `StoreLockedError`. The lock dies with the process, so a crashed writer never
  blocks its successor. Local filesystems only (flock and append visibility on NFS are weaker).

Cost, measured on the 2-core build machine: `append` of a 32k-token trajectory takes ~2 ms (encode
1 ms, zstd 0.6 ms) plus an fsync every `fsync_every` records. Trio code may call it directly for
small records; call it through `trio.to_thread.run_sync` when records are large or the disk is
slow. `StoreWriter` is thread-safe; `StoreReader` is not (one per thread).

Exceptions::

    StoreError
    ├── StoreLockedError          another writer holds the store
    └── BadRecordError            a record that cannot be returned (.shard, .offset)
        ├── CorruptRecordError    bytes on disk changed: checksum, magic or truncated sealed shard
        └── RecordDecodeError     checksums fine, content not understood (unknown kind, newer schema)
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import zstandard

from runtime.records import Task, Trajectory

__all__ = [
    "BadRecordError",
    "CorruptRecordError",
    "Cursor",
    "Record",
    "RecordDecodeError",
    "StoreError",
    "StoreLockedError",
    "StoreReader",
    "StoreWriter",
    "TrajectoryStore",
]

log = logging.getLogger(__name__)

Record = Trajectory | Task | dict[str, Any]

MAGIC = b"SWDREC\x00\x01"
_HEADER = struct.Struct("<IBBHII")  # len, kind, flags, reserved, payload crc, header crc
_FLAG_ZSTD = 0x01
_KIND_MAP, _KIND_TRAJECTORY, _KIND_TASK = 0, 1, 2
MAX_RECORD_BYTES = 1 << 30  # a frame longer than this is refused on write and corrupt on read
DEFAULT_MAX_SHARD_BYTES = 64 << 20
DEFAULT_FSYNC_EVERY = 32
_LOCK_NAME = "LOCK"
_SHARD_RE = re.compile(r"^shard-(\d{8})\.rec(\.open)?$")


class StoreError(Exception):
    """Base of every error raised by the trajectory store."""


class StoreLockedError(StoreError):
    """Another writer (in this or another process) has the store open."""


class BadRecordError(StoreError):
    """A record at `shard` (file path) and byte `offset` that cannot be returned."""

    def __init__(self, shard: str, offset: int, reason: str) -> None:
        super().__init__(f"{shard} at offset {offset}: {reason}")
        self.shard = shard
        self.offset = offset
        self.reason = reason


class CorruptRecordError(BadRecordError):
    """The bytes on disk are not what the writer wrote (checksum or magic mismatch)."""


class RecordDecodeError(BadRecordError):
    """The frame is intact but its content cannot be decoded by this code."""


@dataclass(frozen=True, order=True)
class Cursor:
    """A reader's position: the next record starts at byte `offset` of shard number `shard`.

    Save it (e.g. in a learner checkpoint) and pass it back to `StoreReader` to resume exactly.
    """

    shard: int = 0
    offset: int = 0

    def __post_init__(self) -> None:
        for name in ("shard", "offset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Cursor.{name}: expected an int >= 0, got {value!r}")


def _sealed_path(root: Path, index: int) -> Path:
    return root / f"shard-{index:08d}.rec"


def _open_path(root: Path, index: int) -> Path:
    return root / f"shard-{index:08d}.rec.open"


def _list_shards(root: Path) -> dict[int, bool]:
    """Shard index -> sealed?, for the shard files in `root` (empty if it does not exist)."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return {}
    shards: dict[int, bool] = {}
    for name in names:
        match = _SHARD_RE.match(name)
        if match:
            index = int(match.group(1))
            shards[index] = shards.get(index, False) or match.group(2) is None
    return shards


def _fsync_dir(root: Path) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FrameError(Exception):
    def __init__(self, offset: int, reason: str) -> None:
        self.offset = offset
        self.reason = reason


def _zero_tail(fd: int, offset: int, size: int) -> bool:
    """True if bytes [offset, size) are all zero: what a power loss can leave after a crash."""
    while offset < size:
        data = os.pread(fd, min(1 << 20, size - offset), offset)
        if not data:
            return True  # the file shrank: a writer truncated a torn tail
        if data.count(0) != len(data):
            return False
        offset += len(data)
    return True


def _read_frame(fd: int, offset: int, size: int) -> tuple[int, int, bytes, int] | None:
    """The frame at `offset` as (kind, flags, payload, next_offset); None if not complete.

    None means the end of the complete frames: `offset == size`, or a torn tail after it.
    Raises `_FrameError` on a checksum mismatch.
    """
    if offset >= size:
        return None
    header = os.pread(fd, _HEADER.size, offset)
    if len(header) < _HEADER.size:
        return None
    length, kind, flags, _reserved, payload_crc, header_crc = _HEADER.unpack(header)
    if zlib.crc32(header[:12]) != header_crc:
        if _zero_tail(fd, offset, size):
            return None
        raise _FrameError(offset, "frame header checksum mismatch")
    if length > MAX_RECORD_BYTES:
        raise _FrameError(offset, f"frame length {length} exceeds {MAX_RECORD_BYTES}")
    end = offset + _HEADER.size + length
    if end > size:
        return None
    payload = os.pread(fd, length, offset + _HEADER.size)
    if len(payload) < length:  # the file shrank under us: a writer repaired a torn tail
        return None
    if zlib.crc32(payload) != payload_crc:
        raise _FrameError(offset, "payload checksum mismatch")
    return kind, flags, payload, end


def _encode_frame(record: Record, compressor: zstandard.ZstdCompressor) -> bytes:
    if isinstance(record, Trajectory):
        kind, body = _KIND_TRAJECTORY, record.to_msgpack()
    elif isinstance(record, Task):
        kind, body = _KIND_TASK, record.to_msgpack()
    elif isinstance(record, Mapping):
        try:
            kind, body = _KIND_MAP, msgpack.packb(dict(record), use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"record is not msgpack-serialisable: {exc}") from exc
    else:
        raise TypeError(
            f"record must be a Trajectory, Task or dict, got {type(record).__name__}"
        )
    payload = compressor.compress(body)
    if len(payload) > MAX_RECORD_BYTES:
        raise ValueError(f"record is {len(payload)} bytes compressed; the limit is {MAX_RECORD_BYTES}")
    header = _HEADER.pack(len(payload), kind, _FLAG_ZSTD, 0, zlib.crc32(payload), 0)
    header = header[:12] + struct.pack("<I", zlib.crc32(header[:12]))
    return header + payload


class StoreWriter:
    """The single writer of a store directory. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        fsync_every: int = DEFAULT_FSYNC_EVERY,
        zstd_level: int = 3,
    ) -> None:
        if max_shard_bytes < 4096:
            raise ValueError(f"max_shard_bytes: must be >= 4096, got {max_shard_bytes}")
        if fsync_every < 0:
            raise ValueError(f"fsync_every: must be >= 0 (0: on flush/rotate/close only), got {fsync_every}")
        self.root = Path(path)
        self.max_shard_bytes = max_shard_bytes
        self.fsync_every = fsync_every
        self._compressor = zstandard.ZstdCompressor(level=zstd_level)
        self._mutex = threading.Lock()
        self._fd: int | None = None  # active shard, None until the first append after a seal
        self._size = 0
        self._unsynced = 0
        self._closed = False
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._acquire_lock()
        try:
            self._index = self._recover()
        except BaseException:
            self._release()
            raise

    def _acquire_lock(self) -> int:
        fd = os.open(self.root / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreLockedError(
                f"{self.root} is already open for writing (lock held by pid {holder}); "
                "a store has exactly one writer"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _recover(self) -> int:
        """Reopen the active shard after a previous writer, truncating a torn tail."""
        shards = _list_shards(self.root)
        active = [i for i, sealed in shards.items() if not sealed]
        if not active:
            return max(shards, default=-1) + 1
        index = max(active)
        if len(active) > 1 or index < max(shards):
            raise StoreError(
                f"{self.root}: unexpected active shards {sorted(active)} (sealed up to {max(shards)}); "
                "this store was not written by StoreWriter"
            )
        path = _open_path(self.root, index)
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, len(MAGIC), 0)
            if len(head) < len(MAGIC) and (MAGIC.startswith(head) or head.count(0) == len(head)):
                os.ftruncate(fd, 0)  # killed while creating the shard
                os.write(fd, MAGIC)
                os.fsync(fd)
                size = len(MAGIC)
            elif head != MAGIC:
                raise CorruptRecordError(str(path), 0, "not a swe-dapo store shard (bad magic)")
            offset = len(MAGIC)
            while (frame := self._scan_frame(fd, path, offset, size)) is not None:
                offset = frame
            if offset < size:
                log.warning(
                    "%s: truncating a torn tail of %d bytes at offset %d", path, size - offset, offset
                )
                os.ftruncate(fd, offset)
                os.fsync(fd)
                size = offset
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._size = fd, size
        return index

    @staticmethod
    def _scan_frame(fd: int, path: Path, offset: int, size: int) -> int | None:
        try:
            frame = _read_frame(fd, offset, size)
        except _FrameError as exc:
            raise CorruptRecordError(str(path), exc.offset, exc.reason) from None
        return None if frame is None else frame[3]

    def append(self, record: Record) -> Cursor:
        """Append one record; returns its position. Visible to readers when this returns."""
        frame = _encode_frame(record, self._compressor)
        with self._mutex:
            if self._closed:
                raise StoreError(f"{self.root}: writer is closed")
            full = self._size + len(frame) > self.max_shard_bytes
            if self._fd is not None and full and self._size > len(MAGIC):
                self._seal()  # a record bigger than the bound still gets a shard of its own
            if self._fd is None:
                self._create_shard()
            assert self._fd is not None
            position = Cursor(self._index, self._size)
            self._write_frame(frame)
            self._unsynced += 1
            if self.fsync_every and self._unsynced >= self.fsync_every:
                self._fsync()
            return position

    def _write_frame(self, frame: bytes) -> None:
        assert self._fd is not None
        written = 0
        try:
            while written < len(frame):
                written += os.write(self._fd, frame[written:])
        except BaseException:
            # Never leave a partial frame in front of the next one: that would be mid-shard
            # corruption instead of a torn tail. If even the truncate fails, stop writing.
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                self._closed = True
            raise
        self._size += written

    def _create_shard(self) -> None:
        path = _open_path(self.root, self._index)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        os.write(fd, MAGIC)
        os.fsync(fd)
        _fsync_dir(self.root)  # the new name must survive a power loss too
        self._fd, self._size, self._unsynced = fd, len(MAGIC), 0

    def _fsync(self) -> None:
        if self._fd is not None and self._unsynced:
            os.fsync(self._fd)
        self._unsynced = 0

    def _seal(self) -> None:
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.rename(_open_path(self.root, self._index), _sealed_path(self.root, self._index))
        _fsync_dir(self.root)
        self._index += 1
        self._size = self._unsynced = 0

    def flush(self) -> None:
        """fsync the records appended so far."""
        with self._mutex:
            self._fsync()

    def rotate(self) -> None:
        """Seal the active shard now (if it holds any record); the next append starts a new one."""
        with self._mutex:
            if self._closed:
                raise StoreError(f"{self.root}: writer is closed")
            if self._fd is not None and self._size > len(MAGIC):
                self._seal()

    def close(self) -> None:
        """fsync and release the store. The active shard stays open for the next writer."""
        with self._mutex:
            if self._closed and self._lock_fd < 0:
                return
            try:
                if self._fd is not None:
                    self._fsync()
            finally:
                self._release()

    def _release(self) -> None:
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = -1

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class StoreReader:
    """Reads complete records in order from `cursor` on, while a writer may still be appending.

    `poll()` returns what is there now; `follow()` waits for more. `cursor` always points just
    past the last record returned, so a reader can be recreated from a saved cursor.
    """

    def __init__(self, path: str | os.PathLike[str], cursor: Cursor = Cursor()) -> None:
        self.root = Path(path)
        self._cursor = cursor
        self._fd: int | None = None  # descriptor of shard self._cursor.shard, kept across polls
        self._sealed_size: int | None = None  # size of that shard once it is seen sealed
        self._decompressor = zstandard.ZstdDecompressor()

    @property
    def cursor(self) -> Cursor:
        return self._cursor

    def poll(self, max_records: int = 1024) -> list[Record]:
        """Up to `max_records` complete records written since the last call.

        A bad record is raised (as `BadRecordError`) by the call that reaches it first with no
        record collected before it; the cursor stays on it.
        """
        records: list[Record] = []
        while len(records) < max_records:
            try:
                record = self._next()
            except BadRecordError:
                if records:
                    return records
                raise
            if record is None:
                break
            records.append(record)
        return records

    def follow(
        self, *, poll_interval_s: float = 0.2, idle_timeout_s: float = math.inf
    ) -> Iterator[Record]:
        """Yield records as they are written; stop after `idle_timeout_s` with none new."""
        idle_since = time.monotonic()
        while True:
            record = self._next()
            if record is not None:
                yield record
                idle_since = time.monotonic()
                continue
            if time.monotonic() - idle_since >= idle_timeout_s:
                return
            time.sleep(poll_interval_s)

    def _next(self) -> Record | None:
        while True:
            if self._fd is None and not self._open_current():
                return None
            assert self._fd is not None
            index, offset = self._cursor.shard, self._cursor.offset
            # Check sealed *before* taking the size: once the sealed name exists the content is
            # final, so the size is read once and the name never checked again for this shard.
            if self._sealed_size is None and _sealed_path(self.root, index).exists():
                self._sealed_size = os.fstat(self._fd).st_size
            sealed = self._sealed_size is not None
            size = self._sealed_size if self._sealed_size is not None else os.fstat(self._fd).st_size
            if offset == 0:
                head = os.pread(self._fd, len(MAGIC), 0)
                if len(head) < len(MAGIC):
                    if not sealed:
                        return None  # the writer is creating this shard
                    raise CorruptRecordError(self._shard_name(), 0, "sealed shard shorter than its magic")
                if head != MAGIC:
                    raise CorruptRecordError(self._shard_name(), 0, "not a swe-dapo store shard (bad magic)")
                offset = len(MAGIC)
                self._cursor = Cursor(index, offset)
            try:
                frame = _read_frame(self._fd, offset, size)
            except _FrameError as exc:
                raise CorruptRecordError(self._shard_name(), exc.offset, exc.reason) from None
            if frame is not None:
                kind, flags, payload, end = frame
                record = self._decode(kind, flags, payload, offset)
                self._cursor = Cursor(index, end)
                return record
            if not sealed:
                return None  # the writer may still complete or extend this shard
            if offset < size:
                raise CorruptRecordError(
                    self._shard_name(), offset, f"sealed shard ends inside a record ({size} bytes)"
                )
            later = [i for i in _list_shards(self.root) if i > index]
            if not later:
                return None
            self._close_fd()
            self._cursor = Cursor(min(later), 0)

    def _open_current(self) -> bool:
        index = self._cursor.shard
        # Try sealed, then open, then sealed again: the writer may rename between the first two.
        sealed, active = _sealed_path(self.root, index), _open_path(self.root, index)
        for path in (sealed, active, sealed):
            try:
                self._fd = os.open(path, os.O_RDONLY)
                return True
            except FileNotFoundError:
                continue
        later = [i for i in _list_shards(self.root) if i > index]
        if not later:
            return False
        if self._cursor.offset:
            raise StoreError(f"{self.root}: shard {index} of cursor {self._cursor} no longer exists")
        self._cursor = Cursor(min(later), 0)  # old shards were deleted (retention): skip ahead
        return self._open_current()

    def _shard_name(self) -> str:
        index = self._cursor.shard
        sealed = _sealed_path(self.root, index)
        return str(sealed if sealed.exists() else _open_path(self.root, index))

    def _decode(self, kind: int, flags: int, payload: bytes, offset: int) -> Record:
        try:
            body = self._decompressor.decompress(payload) if flags & _FLAG_ZSTD else payload
            if kind == _KIND_TRAJECTORY:
                return Trajectory.from_msgpack(body)
            if kind == _KIND_TASK:
                return Task.from_msgpack(body)
            if kind == _KIND_MAP:
                record = msgpack.unpackb(body, raw=False, strict_map_key=False)
                if not isinstance(record, dict):
                    raise ValueError(f"expected a msgpack map, got {type(record).__name__}")
                return record
            raise ValueError(f"unknown record kind {kind} (written by a newer swe-dapo?)")
        except (ValueError, TypeError, zstandard.ZstdError, msgpack.UnpackException) as exc:
            raise RecordDecodeError(self._shard_name(), offset, str(exc)) from exc

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._sealed_size = None

    def close(self) -> None:
        self._close_fd()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class TrajectoryStore:
    """Entry points: ``with TrajectoryStore.open_writer(path) as w: w.append(traj)`` and
    ``for record in TrajectoryStore.read(path): ...``."""

    @staticmethod
    def open_writer(
        path: str | os.PathLike[str],
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        fsync_every: int = DEFAULT_FSYNC_EVERY,
    ) -> StoreWriter:
        return StoreWriter(path, max_shard_bytes=max_shard_bytes, fsync_every=fsync_every)

    @staticmethod
    def reader(path: str | os.PathLike[str], cursor: Cursor = Cursor()) -> StoreReader:
        return StoreReader(path, cursor)

    @staticmethod
    def read(path: str | os.PathLike[str], cursor: Cursor = Cursor()) -> Iterator[Record]:
        """Every complete record from `cursor` on, in write order; stops at the current end."""
        if not Path(path).is_dir():
            raise FileNotFoundError(f"no trajectory store at {path}")
        with StoreReader(path, cursor) as reader:
            while (record := reader._next()) is not None:
                yield record
