"""Weight updates of the embedded server: where tensors come from, and the checks before any is loaded.

Two transfer backends, with vLLM's payload shapes (`vllm/distributed/weight_transfer/`):

- ``ipc`` (`ipc_engine.py`): ``update_info = {"names", "dtype_names", "shapes", "ipc_handles"}``. vLLM's
  handles are CUDA IPC handles; ours are process-local keys of tensors the trainer registered with
  `shared_tensors` (the embedded server runs in the trainer's process, so this is a zero-copy hand-over
  that still goes through the same HTTP routes, over the in-process transport).
- ``disk`` (`disk_engine.py`): ``update_info = {"path": "/abs/dir"}``, a directory of ``*.safetensors``
  files visible to the server (vLLM requires a directory; a single ``.safetensors`` file is accepted too).

`check_update` validates every tensor (known name, same shape, floating dtype, finite values) before
`apply_update` touches the model, so a rejected update leaves the old weights serving.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .protocol import BadRequest, UpdateRejected

__all__ = ["apply_update", "check_update", "read_update", "shared_tensors"]

_MAX_LISTED = 5  # problems listed in one error message

_registry: dict[str, Tensor] = {}
_registry_lock = threading.Lock()
_handle_ids = itertools.count()


@contextlib.contextmanager
def shared_tensors(tensors: Mapping[str, Tensor]) -> Iterator[list[str]]:
    """Register `tensors` for an in-process ``ipc`` update; yields one handle per tensor, in order.

    The handles are valid until the block exits; they resolve only inside this process.
    """
    handles = [f"swe-dapo-ipc:{os.getpid()}:{next(_handle_ids)}" for _ in tensors]
    with _registry_lock:
        _registry.update(zip(handles, tensors.values()))
    try:
        yield handles
    finally:
        with _registry_lock:
            for h in handles:
                _registry.pop(h, None)


def read_update(update_info: Any) -> dict[str, Tensor]:
    """The named tensors an ``update_info`` payload refers to (``ipc`` handles or a ``disk`` path)."""
    if not isinstance(update_info, Mapping):
        raise BadRequest(f"update_info must be a JSON object, got {update_info!r:.80}", param="update_info")
    keys = set(update_info)
    if keys == {"path"}:
        return _read_disk(update_info["path"])
    if {"names", "dtype_names", "shapes", "ipc_handles"} <= keys and keys <= {
            "names", "dtype_names", "shapes", "ipc_handles", "packed"}:
        return _read_ipc(update_info)
    if {"names", "dtype_names", "shapes"} <= keys:
        raise BadRequest("update_info looks like the NCCL backend's (names/dtype_names/shapes without "
                         "ipc_handles); the embedded server takes the 'ipc' or 'disk' backend", param="update_info")
    raise BadRequest(f"update_info must be {{'path': dir}} (disk) or {{'names', 'dtype_names', 'shapes', "
                     f"'ipc_handles'}} (ipc); got keys {sorted(keys)}", param="update_info")


def _read_disk(path: Any) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not isinstance(path, str) or not os.path.isabs(path):
        raise BadRequest(f"update_info.path must be an absolute path, got {path!r}", param="update_info.path")
    p = Path(path)
    if not p.exists():
        raise UpdateRejected(f"update_info.path {path} does not exist", param="update_info.path")
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p] if p.suffix == ".safetensors" else []
    if not files:
        raise UpdateRejected(f"update_info.path {path} holds no .safetensors file", param="update_info.path")
    tensors: dict[str, Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except (SafetensorError, OSError) as exc:
            raise UpdateRejected(f"cannot read {f}: {exc}", param="update_info.path") from exc
    return tensors


def _read_ipc(info: Mapping[str, Any]) -> dict[str, Tensor]:
    names, dtype_names, shapes, handles = info["names"], info["dtype_names"], info["shapes"], info["ipc_handles"]
    for key in ("names", "dtype_names", "shapes", "ipc_handles"):
        if not isinstance(info[key], list) or len(info[key]) != len(names):
            raise BadRequest(f"update_info.{key} must be a list as long as names ({len(names)})",
                             param=f"update_info.{key}")
    tensors: dict[str, Tensor] = {}
    with _registry_lock:
        for name, dtype_name, shape, handle in zip(names, dtype_names, shapes, handles):
            tensor = _registry.get(handle) if isinstance(handle, str) else None
            if tensor is None:
                raise UpdateRejected(f"ipc handle {handle!r} for {name!r} is not registered in this process "
                                     f"(pid {os.getpid()}): the ipc backend works in-process only; use the disk "
                                     f"backend across processes", param="update_info.ipc_handles")
            if str(tensor.dtype).removeprefix("torch.") != dtype_name or list(tensor.shape) != list(shape):
                raise UpdateRejected(f"{name}: declared {dtype_name}{list(shape)} but the handle holds "
                                     f"{tensor.dtype}{list(tensor.shape)}", param="update_info")
            tensors[name] = tensor
    return tensors


def check_update(model: nn.Module, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Validate `tensors` against `model`'s parameters; returns them, or raises `UpdateRejected`.

    Names are the model's Hugging Face parameter names (tied aliases such as ``lm_head.weight``
    included). A subset is allowed, as with vLLM's ``load_weights``; the learner sends all of them.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    problems: list[str] = []
    for name, tensor in tensors.items():
        target = params.get(name)
        if target is None:
            problems.append(f"unknown parameter {name!r}")
        elif not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            problems.append(f"{name}: expected a floating-point tensor, got {getattr(tensor, 'dtype', type(tensor))}")
        elif tuple(tensor.shape) != tuple(target.shape):
            problems.append(f"{name}: shape {list(tensor.shape)} does not match the model's {list(target.shape)}")
        elif not math.isfinite(float(tensor.detach().float().abs().sum())):
            problems.append(f"{name}: holds NaN or inf")
    if not tensors:
        problems.append("no tensors")
    if problems:
        more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        raise UpdateRejected("weight update rejected, old weights kept: " + "; ".join(problems[:_MAX_LISTED]) + more)
    return dict(tensors)


@torch.no_grad()
def apply_update(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copy validated tensors into the model's parameters (cast to their dtype and device)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in tensors.items():
        params[name].copy_(tensor)
