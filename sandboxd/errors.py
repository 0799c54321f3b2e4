"""The one exception tree of sandboxd.

    SandboxError(code, message, field)      every error a caller of sandboxd can see
     +-- BadRequest       code "bad_request"   the caller's input is wrong (names the field)
     +-- NotFound         code "not_found"     unknown sandbox, snapshot, path, revision
     +-- Timeout          code "timeout"       a deadline passed
     +-- LimitExceeded    code "limit"         a size, depth, disk or count limit was hit
     +-- Unauthorized     code "unauthorized"  (used by the daemon's wire layer)
     +-- Busy             code "busy"          the sandbox is being changed by another call
     +-- Internal         code "internal"      sandboxd itself failed (a bug or the host)

`code` strings are exactly the wire protocol's closed set (DESIGN.md, "Runtime: the wire
protocol"); the wire layer maps them to its own typed exceptions. Lower-level errors (OSError
from a syscall) are translated at the boundary with `raise ... from exc`.
"""

from __future__ import annotations

__all__ = [
    "CODES",
    "SandboxError",
    "BadRequest",
    "NotFound",
    "Timeout",
    "LimitExceeded",
    "Unauthorized",
    "Busy",
    "Internal",
]

CODES = ("bad_request", "not_found", "timeout", "limit", "unauthorized", "busy", "internal")


class SandboxError(Exception):
    """An error with a wire code, a human message and, for bad input, the field at fault."""

    code = "internal"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.message} (field: {self.field})" if self.field else self.message

    def to_dict(self) -> dict:
        """The error as the wire protocol's error object: code, message and data.field."""
        out = {"code": self.code, "message": self.message}
        if self.field:
            out["data"] = {"field": self.field}
        return out


class BadRequest(SandboxError):
    code = "bad_request"


class NotFound(SandboxError):
    code = "not_found"


class Timeout(SandboxError):
    code = "timeout"


class LimitExceeded(SandboxError):
    code = "limit"


class Unauthorized(SandboxError):
    code = "unauthorized"


class Busy(SandboxError):
    code = "busy"


class Internal(SandboxError):
    code = "internal"
