"""Push the learner's weights to every inference endpoint after a step, and check that they took.

One client for the embedded server and for vLLM, through vLLM's RL routes (dev mode,
`vllm/entrypoints/serve/dev/rlhf/api_router.py`; call order from `examples/rl/rlhf_http_nccl.py`):

    POST /pause?mode=wait              every endpoint, concurrently
    POST /start_weight_update          {"is_checkpoint_format": true}
    POST /update_weights               {"update_info": <backend payload>}
    POST /finish_weight_update         {"weight_version": "<version>"}
    GET  /weight_info                  must answer {"weight_version": "<version>"}
    POST /resume

Backends (the payload of ``update_info``, `vllm/distributed/weight_transfer/*_engine.py`):

- ``ipc``: ``{"names", "dtype_names", "shapes", "ipc_handles"}``. For the embedded server in this
  process the handles are keys of tensors shared in memory (`learner.serve.shared_tensors`); no copy.
- ``disk``: ``{"path": dir}``, a safetensors directory written once per push and read by every endpoint
  (the embedded server over HTTP, or vLLM with ``--weight-transfer-config '{"backend": "disk"}'`` on a
  shared filesystem).
- ``nccl``: ``{"names", "dtype_names", "shapes", "packed": false}`` while the trainer broadcasts each
  tensor from rank 0 of one NCCL group that spans every NCCL endpoint (`init_weight_transfer_engine`
  with ``master_address``, ``master_port``, ``rank_offset``, ``world_size`` once, at the first push;
  `GET /get_world_size` gives each endpoint's ranks). The group is vLLM's `StatelessProcessGroup` +
  `PyNcclCommunicator`: with vllm importable the trainer side is vLLM's own
  `NCCLWeightTransferEngine.trainer_init`; without it, `_NcclRank0` speaks the same rendezvous (a
  `TCPStore` master, the NCCL unique id pickled under key ``broadcast_from/0/0``, a warm-up all-reduce)
  with `torch.cuda.nccl`. Needs CUDA and NCCL; otherwise `BackendUnavailable` before anything is paused.

Assumptions: vLLM recent enough to have `/start_weight_update` and `/weight_info` (older ones only had
`/update_weights`; they fail here with a clear `RouteFailed` 404); `weight_version` is the learner step.

An endpoint that fails any phase is reported, never skipped: `push` raises `WeightSyncError` naming
every failed endpoint and why, after resuming only the endpoints that verifiably serve the new version.
Failed endpoints stay paused, so nothing samples from stale weights under a new version label; their
queued requests time out and the scheduler drains them like dead endpoints.

Exceptions::

    WeightSyncError            push failed somewhere; .failures maps endpoint URL -> EndpointError
     +-- BackendUnavailable    nccl asked for without CUDA/NCCL (raised before pausing anything)
    EndpointError              one endpoint's failure: .url, .route
     +-- RouteFailed           the endpoint answered an error status (.status, server's message)
     +-- EndpointUnreachable   connection error or no answer within the deadline
     +-- VersionMismatch       /weight_info after the push reports another version
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import httpx
import torch
import trio
from torch import Tensor, nn

from .serve import PolicyServer, shared_tensors

__all__ = [
    "BackendUnavailable", "EndpointError", "EndpointUnreachable", "RouteFailed", "VersionMismatch",
    "WeightEndpoint", "WeightSync", "WeightSyncError", "nccl_rank_layout", "push_weights", "vllm_unique_id_pickle",
]

Backend = Literal["ipc", "disk", "nccl"]
PauseMode = Literal["abort", "wait", "keep"]


class EndpointError(Exception):
    def __init__(self, url: str, route: str, message: str) -> None:
        super().__init__(f"{url}{route}: {message}")
        self.url, self.route = url, route


class RouteFailed(EndpointError):
    def __init__(self, url: str, route: str, status: int, message: str) -> None:
        super().__init__(url, route, f"HTTP {status}: {message}")
        self.status = status


class EndpointUnreachable(EndpointError):
    pass


class VersionMismatch(EndpointError):
    pass


class WeightSyncError(Exception):
    def __init__(self, message: str, failures: Mapping[str, BaseException] | None = None,
                 updated: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.failures = dict(failures or {})
        self.updated = list(updated)


class BackendUnavailable(WeightSyncError):
    pass


@dataclass(frozen=True)
class WeightEndpoint:
    """An inference endpoint as the weight sync sees it."""

    url: str  # base URL without /v1, e.g. "http://gpu3:8000"
    backend: Backend = "disk"
    transport: httpx.AsyncBaseTransport | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.backend not in ("ipc", "disk", "nccl"):
            raise ValueError(f"WeightEndpoint.backend must be 'ipc', 'disk' or 'nccl', got {self.backend!r}")

    @classmethod
    def embedded(cls, server: PolicyServer) -> WeightEndpoint:
        """The in-process embedded server: same routes over an in-process transport, ``ipc`` backend."""
        return cls(f"http://embedded-{id(server):x}", "ipc", server.transport())


def _as_endpoint(x: WeightEndpoint | PolicyServer | str) -> WeightEndpoint:
    if isinstance(x, WeightEndpoint):
        return x
    if isinstance(x, PolicyServer):
        return WeightEndpoint.embedded(x)
    if isinstance(x, str):
        return WeightEndpoint(x.rstrip("/"))
    raise TypeError(f"an endpoint must be a WeightEndpoint, PolicyServer or URL string, got {type(x).__name__}")


def nccl_rank_layout(world_sizes: Sequence[int]) -> tuple[int, list[int]]:
    """(group world size, rank offset of each endpoint): the trainer is rank 0, endpoints follow."""
    offsets, next_rank = [], 1
    for size in world_sizes:
        if size < 1:
            raise ValueError(f"an endpoint reported world_size {size}")
        offsets.append(next_rank)
        next_rank += size
    return next_rank, offsets


class WeightSync:
    """Pushes weights to a fixed set of endpoints; keeps HTTP clients and the NCCL group between pushes.

    `pause_mode`: how endpoints pause (``wait``: in-flight requests finish on the old weights first).
    `timeout_s`: deadline of each call (a pause in ``wait`` mode lasts as long as the longest request).
    `disk_dir`: where ``disk`` pushes write (must be visible to those endpoints; default: a temp dir).
    `dtype`: cast before sending (e.g. ``torch.bfloat16`` to halve traffic); None sends as is.
    """

    def __init__(self, endpoints: Iterable[WeightEndpoint | PolicyServer | str], *, pause_mode: PauseMode = "wait",
                 timeout_s: float = 600.0, disk_dir: str | os.PathLike[str] | None = None,
                 dtype: torch.dtype | None = None, nccl_master_address: str | None = None,
                 nccl_master_port: int = 0) -> None:
        self.endpoints = [_as_endpoint(e) for e in endpoints]
        urls = [e.url for e in self.endpoints]
        if not urls or len(set(urls)) != len(urls):
            raise ValueError(f"WeightSync needs distinct endpoints, got {urls}")
        self.pause_mode, self.timeout_s, self.dtype = pause_mode, timeout_s, dtype
        self._own_disk_dir = disk_dir is None
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.nccl_master_address, self.nccl_master_port = nccl_master_address, nccl_master_port
        self._clients = {e.url: httpx.AsyncClient(base_url=e.url, transport=e.transport, timeout=timeout_s)
                         for e in self.endpoints}
        self._nccl: _NcclRank0 | None = None
        self._closed = False

    async def __aenter__(self) -> WeightSync:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            for client in self._clients.values():
                await client.aclose()
        self._nccl = None
        if self._own_disk_dir and self.disk_dir is not None:
            shutil.rmtree(self.disk_dir, ignore_errors=True)

    async def push(self, weights: nn.Module | Mapping[str, Tensor], version: int) -> None:
        """Load `weights` on every endpoint as `version`; raises `WeightSyncError` unless all verify."""
        if self._closed:
            raise RuntimeError("WeightSync is closed")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be a non-negative int, got {version!r}")
        state = _send_state(weights, self.dtype)
        nccl = [e for e in self.endpoints if e.backend == "nccl"]
        if nccl:
            _require_nccl(nccl)
        failures: dict[str, BaseException] = {}
        path = None
        if any(e.backend == "disk" for e in self.endpoints):  # written before pausing: shorter pauses
            path = await trio.to_thread.run_sync(self._write_checkpoint, state, version)
        await self._each(self.endpoints, failures, lambda e: self._call(e, "POST", "/pause",
                                                                       params={"mode": self.pause_mode}))

        def live(backend: Backend) -> list[WeightEndpoint]:
            return [e for e in self.endpoints if e.backend == backend and e.url not in failures]

        if live("ipc"):
            with shared_tensors(state) as handles:
                await self._update(live("ipc"), failures, version, {**_metadata(state), "ipc_handles": handles})
        if live("disk"):
            await self._update(live("disk"), failures, version, {"path": str(path)})
        if live("nccl"):
            try:
                await self._push_nccl(live("nccl"), failures, version, state)
            except Exception as exc:  # init or broadcast failed: every member missed this version
                for e in live("nccl"):
                    failures[e.url] = exc
        await self._each([e for e in self.endpoints if e.url not in failures], failures,
                         lambda e: self._verify(e, version))
        updated = [e for e in self.endpoints if e.url not in failures]
        await self._each(updated, failures, lambda e: self._call(e, "POST", "/resume"))
        if failures:
            lines = "; ".join(str(exc) if isinstance(exc, EndpointError) else f"{url}: {exc!r}"
                              for url, exc in failures.items())
            raise WeightSyncError(f"weight push of version {version} failed on {len(failures)} of "
                                  f"{len(self.endpoints)} endpoint(s); those stay paused: {lines}",
                                  failures, [e.url for e in updated if e.url not in failures])

    async def _update(self, endpoints: Sequence[WeightEndpoint], failures: dict[str, BaseException], version: int,
                      update_info: dict[str, Any]) -> None:
        async def one(e: WeightEndpoint) -> None:
            await self._call(e, "POST", "/start_weight_update", json={"is_checkpoint_format": True})
            await self._call(e, "POST", "/update_weights", json={"update_info": update_info})
            await self._call(e, "POST", "/finish_weight_update", json={"weight_version": str(version)})

        await self._each(endpoints, failures, one)

    async def _verify(self, e: WeightEndpoint, version: int) -> None:
        info = await self._call(e, "GET", "/weight_info")
        if str(info.get("weight_version")) != str(version):
            raise VersionMismatch(e.url, "/weight_info", f"serves weight_version {info.get('weight_version')!r} "
                                                         f"after pushing {version}")

    async def _each(self, endpoints: Sequence[WeightEndpoint], failures: dict[str, BaseException],
                    step: Callable[[WeightEndpoint], Awaitable[Any]]) -> None:
        """Run `step` on every endpoint concurrently; record failures instead of cancelling siblings."""
        async def guarded(e: WeightEndpoint) -> None:
            try:
                await step(e)
            except Exception as exc:  # reported in WeightSyncError.failures, never dropped
                failures.setdefault(e.url, exc)

        async with trio.open_nursery() as nursery:
            for e in endpoints:
                nursery.start_soon(guarded, e)

    async def _call(self, e: WeightEndpoint, method: str, route: str, *, json: Any = None,
                    params: Mapping[str, str] | None = None) -> dict[str, Any]:
        try:
            with trio.fail_after(self.timeout_s):
                response = await self._clients[e.url].request(method, route, json=json, params=params)
        except trio.TooSlowError as exc:
            raise EndpointUnreachable(e.url, route, f"no answer within {self.timeout_s:g} s") from exc
        except httpx.HTTPError as exc:
            raise EndpointUnreachable(e.url, route, f"{type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            raise RouteFailed(e.url, route, response.status_code, _error_message(response))
        try:
            body = response.json() if response.content else {}
        except ValueError:
            body = {}
        return body if isinstance(body, dict) else {}

    def _write_checkpoint(self, state: Mapping[str, Tensor], version: int) -> Path:
        """``<disk_dir>/v<version>/model.safetensors``, written atomically; older versions removed."""
        from safetensors.torch import save_file

        if self.disk_dir is None:
            self.disk_dir = Path(tempfile.mkdtemp(prefix="swe-dapo-weights-"))
            os.chmod(self.disk_dir, 0o755)
        self.disk_dir.mkdir(parents=True, exist_ok=True)
        target = self.disk_dir / f"v{version}"
        tmp = Path(tempfile.mkdtemp(prefix=f".v{version}.", dir=self.disk_dir))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the inference servers must read it
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / "model.safetensors"),
                      metadata={"format": "pt", "weight_version": str(version)})
            with open(tmp / "model.safetensors", "rb") as fh:
                os.fsync(fh.fileno())
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.disk_dir.glob("v*"):
            if old != target and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        return target.resolve()

    # --- NCCL ------------------------------------------------------------------------------------

    async def _push_nccl(self, endpoints: Sequence[WeightEndpoint], failures: dict[str, BaseException], version: int,
                         state: Mapping[str, Tensor]) -> None:
        if self._nccl is None:
            self._nccl = await self._init_nccl(endpoints)
        group = self._nccl
        missing = [e.url for e in endpoints if e.url not in group.members]
        if missing:  # the group spans the endpoints it was built with; a broadcast needs all of them
            raise WeightSyncError(f"NCCL group was built without {missing}; make a new WeightSync")
        await self._each(endpoints, failures, lambda e: self._call(e, "POST", "/start_weight_update",
                                                                   json={"is_checkpoint_format": True}))
        if any(e.url in failures for e in endpoints):
            return  # every member must receive every broadcast, so none can go ahead
        update_info = {**_metadata(state), "packed": False}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._each, endpoints, failures,
                               lambda e: self._call(e, "POST", "/update_weights", json={"update_info": update_info}))
            await trio.to_thread.run_sync(group.send, list(state.values()))
        finish = {"weight_version": str(version)}
        await self._each([e for e in endpoints if e.url not in failures], failures,
                         lambda e: self._call(e, "POST", "/finish_weight_update", json=finish))

    async def _init_nccl(self, endpoints: Sequence[WeightEndpoint]) -> _NcclRank0:
        sizes: dict[str, int] = {}

        async def world_size(e: WeightEndpoint) -> None:
            sizes[e.url] = int((await self._call(e, "GET", "/get_world_size"))["world_size"])

        failures: dict[str, BaseException] = {}
        await self._each(endpoints, failures, world_size)
        if failures:
            raise WeightSyncError("NCCL init failed: " + "; ".join(map(str, failures.values())), failures)
        world, offsets = nccl_rank_layout([sizes[e.url] for e in endpoints])
        address = self.nccl_master_address or _local_address(endpoints[0].url)
        port = self.nccl_master_port or _free_port(address)
        device = torch.cuda.current_device()
        group: list[_NcclRank0] = []

        async def rendezvous() -> None:
            group.append(await trio.to_thread.run_sync(_NcclRank0, address, port, world, device))

        async with trio.open_nursery() as nursery:
            for e, offset in zip(endpoints, offsets):
                info = {"master_address": address, "master_port": port, "rank_offset": offset, "world_size": world}
                nursery.start_soon(self._each, [e], failures,
                                   lambda e, info=info: self._call(e, "POST", "/init_weight_transfer_engine",
                                                                   json={"init_info": info}))
            nursery.start_soon(rendezvous)
        if failures:  # the rendezvous cannot complete without every member
            raise WeightSyncError("NCCL init failed: " + "; ".join(map(str, failures.values())), failures)
        group[0].members = frozenset(e.url for e in endpoints)
        return group[0]


async def push_weights(endpoints: Iterable[WeightEndpoint | PolicyServer | str],
                       weights: nn.Module | Mapping[str, Tensor], version: int, **options: Any) -> None:
    """One-shot `WeightSync.push` (for ``nccl`` keep a `WeightSync` instead: its group is set up once)."""
    async with WeightSync(endpoints, **options) as sync:
        await sync.push(weights, version)


def _send_state(weights: nn.Module | Mapping[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    if isinstance(weights, nn.Module):
        # named_parameters() drops tied duplicates (lm_head.weight = embed_tokens.weight), as vLLM's examples
        state = {name: p.detach() for name, p in weights.named_parameters()}
    else:
        state = {name: t.detach() for name, t in weights.items()}
    return {k: v.to(dtype) for k, v in state.items()} if dtype is not None else state


def _metadata(state: Mapping[str, Tensor]) -> dict[str, list[Any]]:
    return {"names": list(state), "dtype_names": [str(t.dtype).removeprefix("torch.") for t in state.values()],
            "shapes": [list(t.shape) for t in state.values()]}


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        for key in ("error", "detail", "message"):
            if key in body:
                return str(body[key])
    return str(body)[:500]


def _require_nccl(endpoints: Sequence[WeightEndpoint]) -> None:
    urls = ", ".join(e.url for e in endpoints)
    if not torch.cuda.is_available():
        raise BackendUnavailable(f"the nccl backend needs CUDA on the trainer; torch {torch.__version__} sees no "
                                 f"GPU (endpoints: {urls}); use the 'disk' backend instead")
    if not (torch.distributed.is_available() and torch.distributed.is_nccl_available()):
        raise BackendUnavailable(f"this torch build has no NCCL (endpoints: {urls}); use the 'disk' backend")


def _local_address(url: str) -> str:
    """The address of this host on the route to `url` (what the endpoint can connect back to)."""
    host = httpx.URL(url).host or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))  # no packet is sent for UDP connect
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


# The pickle vLLM's workers unpickle from `broadcast_from/0/0`: their own
# `vllm.distributed.device_communicators.pynccl_wrapper.ncclUniqueId` (a ctypes struct of 128 bytes),
# rebuilt with `ncclUniqueId.from_buffer_copy(raw)`, so the trainer needs no vllm to produce it.
_VLLM_UNIQUE_ID_CLASS = ("vllm.distributed.device_communicators.pynccl_wrapper", "ncclUniqueId")


def vllm_unique_id_pickle(raw: bytes) -> bytes:
    """Pickle of vLLM's ``ncclUniqueId`` holding `raw` (the 128 bytes of ``ncclGetUniqueId``)."""
    if len(raw) != 128:
        raise ValueError(f"an NCCL unique id has 128 bytes, got {len(raw)}")
    module, name = _VLLM_UNIQUE_ID_CLASS
    return b"".join([
        pickle.PROTO + bytes([4]),
        pickle.GLOBAL + b"builtins\ngetattr\n",
        pickle.GLOBAL + f"{module}\n{name}\n".encode(),
        pickle.SHORT_BINUNICODE + bytes([len("from_buffer_copy")]) + b"from_buffer_copy",
        pickle.TUPLE2, pickle.REDUCE,  # getattr(ncclUniqueId, "from_buffer_copy")
        pickle.BINBYTES + len(raw).to_bytes(4, "little") + raw,
        pickle.TUPLE1, pickle.REDUCE,  # ncclUniqueId.from_buffer_copy(raw)
        pickle.STOP,
    ])


class _NcclRank0:
    """Rank 0 (the trainer) of vLLM's weight-transfer NCCL group; blocking calls, run them in a thread."""

    def __init__(self, address: str, port: int, world_size: int, device: int) -> None:
        self.device = device
        self.members: frozenset[str] = frozenset()
        with torch.cuda.device(device):
            try:
                from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine
            except ImportError:
                self._vllm = None
                self._init_without_vllm(address, port, world_size)
            else:
                self._vllm = NCCLWeightTransferEngine.trainer_init(
                    {"master_address": address, "master_port": port, "world_size": world_size})

    def _init_without_vllm(self, address: str, port: int, world_size: int) -> None:
        import torch.cuda.nccl as nccl

        # StatelessProcessGroup.create(rank=0): the TCPStore master; returns once every rank connected.
        self._store = torch.distributed.TCPStore(address, port, world_size, is_master=True,
                                                 timeout=timedelta(seconds=300), use_libuv=False)
        raw = nccl.unique_id()
        self._store.set("broadcast_from/0/0", vllm_unique_id_pickle(raw))  # PyNcclCommunicator's broadcast_obj
        self._comm = nccl.init_rank(world_size, raw, 0)
        warmup = torch.zeros(1, device=f"cuda:{self.device}")  # PyNcclCommunicator's warm-up all-reduce
        nccl.all_reduce([warmup], comms=[self._comm])
        torch.cuda.synchronize(self.device)

    def send(self, tensors: Sequence[Tensor]) -> None:
        """Broadcast each tensor from rank 0, in order (vLLM's unpacked `receive_weights`)."""
        with torch.cuda.device(self.device):
            for t in tensors:
                t = t.detach().to(f"cuda:{self.device}").contiguous()
                if self._vllm is not None:
                    self._vllm.broadcast(t, src=0, stream=torch.cuda.current_stream())
                else:
                    import torch.cuda.nccl as nccl

                    nccl.broadcast([t], root=0, comms=[self._comm])
            torch.cuda.synchronize(self.device)

