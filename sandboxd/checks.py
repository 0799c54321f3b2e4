"""Input checks shared by the runtime's methods: pure, each failure a BadRequest or LimitExceeded
naming the field."""

from __future__ import annotations

import math

from sandboxd.errors import BadRequest, LimitExceeded

__all__ = ["check_id", "check_env", "check_argv", "check_number", "check_size"]


def check_id(value: object, field_name: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{field_name} must be a non-empty string", field=field_name)
    return value


def check_env(env: object, field_name: str = "env") -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise BadRequest("env must be a mapping of strings to strings", field=field_name)
    for k, v in env.items():
        if not isinstance(k, str) or not k or "=" in k or "\0" in k:
            raise BadRequest(f"bad environment variable name {k!r}", field=f"{field_name}.{k}")
        if not isinstance(v, str) or "\0" in v:
            raise BadRequest(f"environment variable {k} must be a string without NUL", field=f"{field_name}.{k}")
    return dict(env)


def check_argv(argv: object) -> list[str]:
    """A list of strings, or a string for `/bin/sh -c`."""
    if isinstance(argv, str):
        if not argv.strip() or "\0" in argv:
            raise BadRequest("command must be a non-empty string without NUL", field="argv")
        return ["/bin/sh", "-c", argv]
    if not isinstance(argv, (list, tuple)) or not argv:
        raise BadRequest("argv must be a non-empty list of strings or a shell command string", field="argv")
    for i, a in enumerate(argv):
        if not isinstance(a, str) or "\0" in a or (i == 0 and not a):
            raise BadRequest(f"argv[{i}] must be a string without NUL", field=f"argv[{i}]")
    return list(argv)


def check_number(value: object, field_name: str, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise BadRequest(f"{field_name} must be a number", field=field_name)
    if value <= 0:
        raise BadRequest(f"{field_name} must be > 0, got {value}", field=field_name)
    if value > high:
        raise LimitExceeded(f"{field_name} must be <= {high}, got {value}", field=field_name)
    return float(value)


def check_size(value: object, field_name: str, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"{field_name} must be an integer >= 0", field=field_name)
    if value > high:
        raise LimitExceeded(f"{field_name} must be <= {high}, got {value}", field=field_name)
    return value


def check_write(data: object, mode: object, max_bytes: int) -> None:
    """The arguments of a write_file: bytes of at most `max_bytes`, and a permission mode."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadRequest("data must be bytes", field="data")
    if len(data) > max_bytes:
        raise LimitExceeded(f"data must be at most {max_bytes} bytes", field="data")
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise BadRequest("mode must be an integer permission mode, e.g. 0o644", field="mode")
