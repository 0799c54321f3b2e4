"""sandboxd: sandboxes for software-engineering agents on a build node.

The `ns` runtime (`sandboxd.ns`): layered overlayfs roots, Linux namespaces, a cgroup per
sandbox; create, exec, files, snapshot, restore, fork, diff, destroy. One exception tree in
`sandboxd.errors`. Names are imported lazily, so that the in-sandbox init (`sandboxd/_init.py`),
which imports `sandboxd.linux`, does not pay for trio.
"""

from __future__ import annotations

__all__ = [
    "NsRuntime",
    "open_ns_runtime",
    "Limits",
    "ExecResult",
    "DirEntry",
    "SandboxError",
    "BadRequest",
    "NotFound",
    "Timeout",
    "LimitExceeded",
    "Unauthorized",
    "Busy",
    "Internal",
]

_FROM = {name: "sandboxd.ns" for name in ("NsRuntime", "open_ns_runtime", "Limits", "ExecResult", "DirEntry")}
_FROM.update({name: "sandboxd.errors" for name in __all__ if name not in _FROM})


def __getattr__(name: str):
    if name in _FROM:
        import importlib

        return getattr(importlib.import_module(_FROM[name]), name)
    raise AttributeError(f"module 'sandboxd' has no attribute {name!r}")
