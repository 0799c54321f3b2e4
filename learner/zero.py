"""`DeepSpeedEngine`: the `learner.engine.Engine` contract on DeepSpeed ZeRO stage 2 or 3.

Built by ``make_engine(model, optim, backend="deepspeed", zero_stage=2|3)``. The optimizer is our own
`torch.optim.AdamW` over `learner.engine.param_groups` (DeepSpeed wraps it; ``zero_allow_untested_optimizer``),
and the LR schedule is the same `LambdaLR` over `lr_factor` as `TorchEngine`'s, stepped by us after
each DeepSpeed step. On CPU (``DS_ACCELERATOR=cpu``) the process group is gloo.

Gradient accumulation is ours, not DeepSpeed's (checked against deepspeed 0.19.8's
``runtime/engine.py``):
- ``managed_gradient_accumulation: false``: `backward` only accumulates and every `step` is an
  accumulation boundary, so the number of micro-batches may change from step to step (packing
  decides it). ``gradient_accumulation_steps`` is 1 and `backward` passes ``scale_wrt_gas=False``:
  DeepSpeed divides the loss by nothing.
- Across ranks DeepSpeed AVERAGES gradients (divides by the data-parallel world size).
  `backward` multiplies the loss by the world size to undo that, so the loss each rank passes must
  be normalised by the token count of the WHOLE batch over all ranks (`global_sum` of the ranks'
  `total_loss_tokens`): the update is then the gradient of the DAPO batch loss, the same as one
  process running every micro-batch.
- ZeRO-2/3 reduce gradients inside each `backward` (collectives): every rank must call `backward`
  the same number of times per step (pad a rank that has fewer rows with a zero-loss micro-batch).
- Forward through `model` (the HF module DeepSpeed wraps), including sub-modules such as
  ``model.model(...)``; `backward` runs DeepSpeed's per-micro-batch prologue itself (what the hooks
  DeepSpeedEngine.forward registers on its outputs would do).

`state_dict` / `load_state_dict` / `full_weights` are collectives under ZeRO (every rank calls them;
rank 0 writes the result). `state_dict` returns the backend-neutral layout of `learner.engine`:
full fp32 master weights under model.state_dict() names, AdamW moments gathered per parameter into
`torch.optim.AdamW.state_dict()` form, the scheduler step. So it loads into a `TorchEngine`, or into
a DeepSpeedEngine of another stage or world size, and resumes exactly.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from datetime import timedelta
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from learner.engine import OptimConfig, check_state, lr_factor, param_groups

__all__ = ["DeepSpeedEngine", "deepspeed_config", "init_distributed"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Initialise torch.distributed for DeepSpeed if it is not already.

    Under a launcher (torchrun, deepspeed) RANK/WORLD_SIZE/MASTER_* are in the environment; without
    them this process is a world of one (tests, the default run). gloo on CPU, nccl on GPUs.
    """
    if dist.is_initialized():
        return
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    backend = "gloo" if get_accelerator().device_name() == "cpu" else get_accelerator().communication_backend_name()
    if "RANK" not in os.environ:  # no launcher: a world of one (DeepSpeed reads these variables)
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())}.items():
            os.environ.setdefault(key, value)
    # The learner's other ranks wait in a broadcast while rank 0 samples and evaluates: a collective
    # may legitimately wait for a whole rollout phase (DeepSpeed's default is 10 minutes).
    timeout_s = float(os.environ.get("SWE_DAPO_DIST_TIMEOUT_S", 6 * 3600))
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))


def deepspeed_config(optim: OptimConfig, zero_stage: int, *, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config for our semantics (see the module docstring)."""
    return {
        "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: our rows are packed, not counted in samples
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,  # step() is the boundary; any number of backward() calls
        "gradient_clipping": optim.grad_clip,  # 0 = off, as in OptimConfig
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW is ours on purpose
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """ZeRO-2/3 engine (see the module docstring)."""

    def __init__(self, model: nn.Module, optim: OptimConfig, *, zero_stage: int) -> None:
        if zero_stage not in (2, 3):
            raise ValueError(f"zero_stage: DeepSpeedEngine supports 2 or 3, got {zero_stage}")
        import deepspeed

        init_distributed()
        self.config = optim
        self.zero_stage = zero_stage
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        groups = param_groups(model, optim.weight_decay)
        self.param_names = [n for g in groups for n in g["names"]]
        self._params = [p for g in groups for p in g["params"]]  # DeepSpeed keeps these objects
        self._group_sizes = [len(g["params"]) for g in groups]
        bf16 = any(p.dtype == torch.bfloat16 for p in self._params)
        self._adamw = torch.optim.AdamW(
            [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
            lr=optim.lr, betas=optim.betas, eps=optim.eps,
        )
        self.ds, _, _, _ = deepspeed.initialize(
            model=model, optimizer=self._adamw, config=deepspeed_config(optim, zero_stage, bf16=bf16)
        )
        self.model = self.ds.module
        self.steps = 0
        self.scheduler = self._make_scheduler(0)

    def _make_scheduler(self, step: int) -> LambdaLR:
        # On the AdamW DeepSpeed steps (its groups now hold DeepSpeed's flat fp32 partitions).
        for group in self._adamw.param_groups:
            group["initial_lr"] = self.config.lr
        sched = LambdaLR(self._adamw, lambda s: lr_factor(self.config, s), last_epoch=step - 1)
        return sched

    # -- training ---------------------------------------------------------------------------------

    def backward(self, loss: Tensor) -> None:
        zero = self.ds.optimizer
        # What DeepSpeedEngine.forward and the backward hooks it puts on its outputs do; we forward
        # through the module. ZeRO-3 needs it: its micro-step counter decides whether a backward
        # copies or adds into the gradient partitions.
        zero.clear_backward_seen_flag()
        self.ds._backward_prologue()
        self.ds.backward(loss * self.world_size, scale_wrt_gas=False)  # undo DeepSpeed's mean over ranks

    def step(self) -> dict[str, float]:
        lr = self._adamw.param_groups[0]["lr"]
        self.ds.step()
        skipped = not self.ds.was_step_applied()  # ZeRO skips a non-finite gradient
        if not skipped:
            self.scheduler.step()
            self.steps += 1
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        return {"optim/grad_norm": norm, "optim/lr": float(lr), "optim/skipped": float(skipped)}

    @contextlib.contextmanager
    def gathered(self, params: Iterable[nn.Parameter]) -> Iterator[None]:
        """Hold the full tensors of `params` (ZeRO-3 partitions them outside their module's forward).

        For a weight used outside its own module, as `token_logprobs` uses ``lm_head.weight``. Enter
        AFTER the base model's forward (with tied embeddings, the embedding's forward would release
        the weight again) and run the logprobs, the loss AND `backward` inside:

            hidden = engine.model.model(...).last_hidden_state
            with engine.gathered([engine.model.lm_head.weight]):
                logp, ent = token_logprobs(hidden, engine.model.lm_head.weight, targets)
                engine.backward(dapo_loss(...)[0])

        ZeRO-2 keeps full weights on every rank: nothing to do.
        """
        if self.zero_stage != 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
            yield

    def global_sum(self, value: float) -> float:
        """Sum of `value` over the ranks (e.g. the batch's loss-token count before normalising)."""
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    # -- full tensors (collectives) ---------------------------------------------------------------

    def _gathered(self, param: nn.Parameter) -> Tensor:
        """The full model-dtype tensor of `param`, on CPU."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                return param.detach().to("cpu", copy=True)
        return param.detach().to("cpu", copy=True)

    def _master(self, param: nn.Parameter) -> Tensor:
        """The full fp32 master weight of `param`, on CPU."""
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(param)
        if full is None:  # frozen: DeepSpeed keeps no master copy
            return self._gathered(param)
        return full.detach().reshape(self._shape(param)).to("cpu", copy=True)

    @staticmethod
    def _shape(param: nn.Parameter) -> torch.Size:
        return getattr(param, "ds_shape", param.shape)

    def full_weights(self) -> dict[str, Tensor]:
        return {name: self._gathered(p) for name, p in self.model.named_parameters()}

    def state_dict(self) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_optimizer_state

        params = dict(self.model.named_parameters(remove_duplicate=False))
        buffers = dict(self.model.named_buffers())
        masters = {id(p): self._master(p) for p in self._params}
        model_state = {}
        for key in self.model.state_dict().keys():
            if key in params:
                p = params[key]
                model_state[key] = masters[id(p)] if id(p) in masters else self._gathered(p)
            else:
                model_state[key] = buffers[key].detach().to("cpu", copy=True)

        inner = self._inner_states()
        opt_state: dict[int, dict[str, Tensor]] = {}
        if inner:  # AdamW state exists after the first step
            self._link_fragments()
            step = float(next(iter(inner.values()))["step"])
            for i, p in enumerate(self._params):
                opt_state[i] = {"step": torch.tensor(step)}
                for key in ("exp_avg", "exp_avg_sq"):
                    full = safe_get_full_optimizer_state(p, key)
                    opt_state[i][key] = full.detach().reshape(self._shape(p)).to("cpu", copy=True)
        groups, start = [], 0
        for size, group in zip(self._group_sizes, self._adamw.param_groups):
            groups.append({k: v for k, v in group.items() if k != "params"} | {"params": list(range(start, start + size))})
            start += size
        return {
            "model": model_state,
            "optimizer": {"state": opt_state, "param_groups": groups},
            "scheduler": {"last_epoch": self.scheduler.last_epoch},
            "step": self.steps,
        }

    def _flat_partitions(self) -> list[Tensor]:
        """The fp32 tensors the inner AdamW steps (this rank's partitions), keys of its state."""
        zero = self.ds.optimizer
        if self.zero_stage == 3:
            return list(zero.fp32_partitioned_groups_flat)
        return list(zero.single_partition_of_fp32_groups)

    def _inner_states(self) -> dict[Tensor, dict[str, Any]]:
        return {p: self._adamw.state[p] for p in self._flat_partitions() if p in self._adamw.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        check_state(state)
        model_state, optim_state = state["model"], state["optimizer"]
        sizes = [len(g["params"]) for g in optim_state["param_groups"]]
        if sizes != self._group_sizes:
            raise ValueError(f"engine state: optimizer groups hold {sizes} parameters, this model {self._group_sizes}")
        missing = [n for n in self.param_names if n not in model_state]
        if missing:
            raise ValueError(f"engine state: model weights missing {missing[:5]}")

        for name, p in zip(self.param_names, self._params):
            value = model_state[name].to(torch.float32)
            safe_set_full_fp32_param(p, value.to(self._device))
            self._set_model_param(p, model_state[name])
        buffers = dict(self.model.named_buffers())
        for key, value in model_state.items():
            if key in buffers:
                buffers[key].data.copy_(value)

        moments = optim_state["state"]
        if moments:
            steps = {float(s["step"]) for s in moments.values()}
            if len(steps) != 1 or len(moments) != len(self._params):
                # ZeRO steps all parameters of a flat partition together: one step count for all
                raise ValueError(f"engine state: AdamW state for {len(moments)} of {len(self._params)} "
                                 f"parameters with step counts {sorted(steps)}; need one count for all")
            self._ensure_inner_state(steps.pop())
            for i, p in enumerate(self._params):
                for key in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(p, moments[i][key].to(self._device, torch.float32), key)
        else:
            for flat in self._flat_partitions():
                self._adamw.state.pop(flat, None)
        self.steps = int(state["step"])
        self.scheduler = self._make_scheduler(int(state["scheduler"]["last_epoch"]))

    @property
    def _device(self) -> torch.device:
        return self._flat_partitions()[0].device

    def _ensure_inner_state(self, step: float) -> None:
        """Create AdamW state for DeepSpeed's flat partitions (it only exists after a first step)."""
        for flat in self._flat_partitions():
            st = self._adamw.state[flat]
            if "exp_avg" not in st:
                st["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            st["step"] = torch.tensor(step, dtype=torch.float32)
        self._link_fragments()

    def _link_fragments(self) -> None:
        """ZeRO-2: point each parameter's optimizer-state views at the current AdamW state.

        DeepSpeed 0.19.8 links them once, right after the optimizer steps the FIRST param group, when
        the later groups have no AdamW state yet; their views then stay empty and
        safe_get_full_optimizer_state fails. Relinking is cheap (views only).
        """
        if self.zero_stage == 2:
            zero = self.ds.optimizer
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _set_model_param(self, param: nn.Parameter, value: Tensor) -> None:
        """Write the full `value` into the model (low-precision) copy of `param`."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if self.rank == 0:
                    param.data.copy_(value.reshape(param.shape))
        else:
            param.data.copy_(value.reshape(param.shape))
