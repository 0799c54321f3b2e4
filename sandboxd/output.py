"""Output capping while streaming: keep the head and the tail, count what was dropped.

Pure logic, no I/O: `feed()` chunks as they arrive, `output()` at the end. Memory is bounded by
`max_bytes` whatever the command writes (an endless `yes` costs CPU, never memory).
"""

from __future__ import annotations

__all__ = ["OutputCap"]


class OutputCap:
    """First `max_bytes // 2` bytes and last `max_bytes - max_bytes // 2` bytes of a stream."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._head_limit = max_bytes // 2
        self._tail_limit = max_bytes - self._head_limit
        self._head = bytearray()
        self._tail = bytearray()
        self.total_bytes = 0

    def feed(self, chunk: bytes) -> None:
        self.total_bytes += len(chunk)
        room = self._head_limit - len(self._head)
        if room > 0:
            self._head += chunk[:room]
            chunk = chunk[room:]
        if not chunk or self._tail_limit == 0:
            return
        if len(chunk) >= self._tail_limit:
            self._tail[:] = chunk[-self._tail_limit:]
        else:
            self._tail += chunk
            excess = len(self._tail) - self._tail_limit
            if excess > 0:
                del self._tail[:excess]

    @property
    def truncated(self) -> bool:
        return self.total_bytes > self.max_bytes

    @property
    def omitted_bytes(self) -> int:
        return self.total_bytes - len(self._head) - len(self._tail)

    def output(self) -> bytes:
        """Head + tail; when bytes were dropped, a one-line marker between them says how many."""
        if not self.truncated:
            return bytes(self._head + self._tail)
        marker = f"\n[... {self.omitted_bytes} bytes omitted ...]\n".encode()
        return bytes(self._head) + marker + bytes(self._tail)
