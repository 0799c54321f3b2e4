"""The optimisation engine: what the training loop calls to turn micro-batch losses into an update.

One small interface, `Engine`, with two implementations:

- `TorchEngine` (here): plain PyTorch on one process: AdamW, a warmup + constant/cosine `LambdaLR`,
  `clip_grad_norm_`. The default run and the tests use it.
- `learner.zero.DeepSpeedEngine`: the same contract on DeepSpeed ZeRO-2/3 (many GPUs; CPU + gloo in
  the tests). `make_engine(backend="deepspeed")` builds it.

Contract, per optimizer step (one DAPO/RFT batch):

    for row in rows:                                   # micro-batches (packed rows)
        loss = dapo_loss(..., num_tokens=total_loss_tokens(all rows))   # already batch-normalised
        engine.backward(loss)                          # grads ADD UP, nothing divides by #micro-batches
    metrics = engine.step()                            # clip, AdamW, LR schedule, zero grads

so the accumulated gradient is the gradient of the whole batch's loss whatever the number of
micro-batches (the number may change from step to step, as packing decides it).

Checkpoints (`state_dict`) use one backend-neutral layout, so a ZeRO-3 run on 8 GPUs resumes on a
`TorchEngine` and the other way round:

    {"model":     model.state_dict() keys -> full CPU tensors (fp32 master weights under DeepSpeed),
     "optimizer": torch.optim.AdamW.state_dict() layout, params numbered as `param_groups` orders them,
     "scheduler": {"last_epoch": optimizer steps taken},    # the LR is a pure function of it
     "step":      optimizer steps taken}

Parameter groups (`param_groups`): weight decay on matrices only (dim >= 2); biases and norm gains
decay not (as GPT-2/nanoGPT/HF Trainer do). Both engines build them the same way, so parameter
numbers in "optimizer" agree between backends.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "Engine",
    "OptimConfig",
    "TorchEngine",
    "enable_gradient_checkpointing",
    "lr_factor",
    "make_engine",
    "param_groups",
]

SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5  # peak learning rate, reached at the end of warmup
    weight_decay: float = 0.0  # decoupled (AdamW), on matrices only (see `param_groups`)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global L2 norm of the gradient; 0 turns clipping off (norm still reported)
    warmup_steps: int = 0  # linear warmup: step s < warmup_steps uses lr * (s + 1) / warmup_steps
    schedule: str = "constant"  # after warmup: "constant" or "cosine" (to 0 at total_steps)
    total_steps: int = 0  # optimizer steps in the run; needed by "cosine"

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))  # TOML gives a list
        if not self.lr > 0:
            raise ValueError(f"OptimConfig.lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"OptimConfig.weight_decay: must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"OptimConfig.betas: need two values in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ValueError(f"OptimConfig.eps: must be > 0, got {self.eps}")
        if self.grad_clip < 0:
            raise ValueError(f"OptimConfig.grad_clip: must be >= 0 (0 = off), got {self.grad_clip}")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimConfig.schedule: must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "cosine" and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"OptimConfig.total_steps: cosine needs total_steps > warmup_steps ({self.warmup_steps}), "
                f"got {self.total_steps}"
            )


def lr_factor(config: OptimConfig, step: int) -> float:
    """Multiplier of `config.lr` for optimizer step `step` (0-based: the first `Engine.step()` is 0).

    Warmup is linear and never 0 (step 0 already learns, at lr / warmup_steps); cosine decays from
    1 at step `warmup_steps` to 0 at step `total_steps` and stays at 0 past it.
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / (config.total_steps - config.warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class Engine(Protocol):
    """What the training loop drives; see the module docstring for the per-step contract."""

    model: nn.Module  # forward through this (DeepSpeed: the engine's module)

    def backward(self, loss: Tensor) -> None:
        """Accumulate the gradient of one micro-batch's loss (already batch-normalised; no rescaling)."""

    def step(self) -> dict[str, float]:
        """Clip, optimizer step, LR schedule step, zero grads: {"optim/grad_norm", "optim/lr", "optim/skipped"}.

        "optim/grad_norm" is the global norm before clipping; "optim/lr" the LR this step used;
        "optim/skipped" 1.0 when the norm was not finite and nothing was updated (grads dropped,
        schedule not advanced).
        """

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume exactly, full and on CPU (layout in the module docstring)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    # Additions for multi-rank training; TorchEngine has them too, so the loop is backend-agnostic.
    world_size: int
    rank: int

    def gathered(self, params: Iterable[nn.Parameter]) -> contextlib.AbstractContextManager[None]:
        """Hold full tensors of weights used outside their module (lm_head.weight under ZeRO-3)."""

    def global_sum(self, value: float) -> float:
        """Sum over the data-parallel ranks (the batch-wide loss-token count)."""

    def full_weights(self) -> dict[str, Tensor]:
        """Full HF-named weights for a weight push; tied duplicates dropped (`learner.tiny.sync_state`)."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups [decayed, not decayed] of the trainable parameters, in `named_parameters` order.

    Each group has "names" (HF names, tied duplicates dropped) and "params". Matrices (embeddings,
    projections) decay; 1-D tensors (biases, RMSNorm gains) do not. Empty groups are left out.
    """
    decay: tuple[list[str], list[nn.Parameter]] = ([], [])
    no_decay: tuple[list[str], list[nn.Parameter]] = ([], [])
    for name, p in model.named_parameters():
        if p.requires_grad:
            # ZeRO-3 replaces a partitioned parameter's data with an empty tensor; ds_shape is the real one
            ndim = len(getattr(p, "ds_shape", p.shape))
            target = decay if ndim >= 2 else no_decay
            target[0].append(name)
            target[1].append(p)
    groups = [
        {"names": names, "params": params, "weight_decay": wd}
        for (names, params), wd in ((decay, weight_decay), (no_decay, 0.0))
        if params
    ]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (HF models; non-reentrant checkpoint).

    Hugging Face only checkpoints in train mode; `make_engine` puts the model in train mode.
    """
    kwargs = {"use_reentrant": False}  # reentrant checkpointing drops grads when inputs need none
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(
            f"gradient_checkpointing: {type(model).__name__} is not a Hugging Face model "
            "(no activation_checkpointing_enable/gradient_checkpointing_enable)"
        )


def _cpu_clone(value: Any) -> Any:
    """A deep copy with every tensor on CPU: a state dict that later steps cannot mutate."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_clone(v) for v in value)
    return value


def check_state(state: dict[str, Any]) -> None:
    """Raise a ValueError naming the missing key of a checkpoint from `Engine.state_dict`."""
    for key in ("model", "optimizer", "scheduler", "step"):
        if key not in state:
            raise ValueError(f"engine state: missing {key!r} (have {sorted(state)})")


class TorchEngine:
    """Single-process AdamW engine (see the module docstring)."""

    def __init__(self, model: nn.Module, optim: OptimConfig) -> None:
        self.model = model
        self.config = optim
        groups = param_groups(model, optim.weight_decay)
        self.param_names = [n for g in groups for n in g["names"]]
        self._params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(
            [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
            lr=optim.lr, betas=optim.betas, eps=optim.eps,
        )
        self.scheduler = LambdaLR(self.optimizer, lambda s: lr_factor(optim, s))
        self.steps = 0  # optimizer steps taken

    world_size = 1  # data-parallel ranks (DeepSpeedEngine: the process group's size)
    rank = 0

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def gathered(self, params: Iterable[nn.Parameter]) -> contextlib.AbstractContextManager[None]:
        """Full tensors of `params` inside the block: always the case here (see DeepSpeedEngine.gathered)."""
        return contextlib.nullcontext()

    def global_sum(self, value: float) -> float:
        """Sum of `value` over the ranks: one rank here."""
        return value

    def step(self) -> dict[str, float]:
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, max_norm))  # norm before clipping
        lr = self.optimizer.param_groups[0]["lr"]  # the LR this step uses
        # A non-finite gradient would turn every weight into NaN: skip the update, as ZeRO does
        skipped = not math.isfinite(grad_norm)
        if not skipped:
            self.optimizer.step()
            self.scheduler.step()
            self.steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return {"optim/grad_norm": grad_norm, "optim/lr": float(lr), "optim/skipped": float(skipped)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": _cpu_clone(self.model.state_dict()),
            "optimizer": _cpu_clone(self.optimizer.state_dict()),
            "scheduler": {"last_epoch": self.scheduler.last_epoch},
            "step": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["step"])
        # Rebuild the schedule at the saved step; LambdaLR.load_state_dict would also restore
        # base_lrs, which belong to the saving run's config, not this one's.
        self.scheduler = LambdaLR(self.optimizer, lambda s: lr_factor(self.config, s))
        self.scheduler.last_epoch = int(state["scheduler"]["last_epoch"])
        self.scheduler._step_count = self.scheduler.last_epoch + 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * lr_factor(self.config, self.scheduler.last_epoch)

    def full_weights(self) -> dict[str, Tensor]:
        return {name: p.detach() for name, p in self.model.named_parameters()}


def make_engine(
    model: nn.Module,
    optim: OptimConfig,
    *,
    backend: str = "torch",
    zero_stage: int = 0,
    gradient_checkpointing: bool = False,
) -> Engine:
    """An `Engine` training `model` (put in train mode) with `optim`.

    backend "torch": `TorchEngine` (zero_stage must be 0). backend "deepspeed": ZeRO `zero_stage`
    2 or 3 (`learner.zero.DeepSpeedEngine`; torch.distributed must be initialised or initialisable
    from the launcher's environment).
    """
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    if backend == "torch":
        if zero_stage != 0:
            raise ValueError(f"zero_stage: the torch backend has no ZeRO, got {zero_stage} (use backend='deepspeed')")
        return TorchEngine(model, optim)
    if backend == "deepspeed":
        from learner.zero import DeepSpeedEngine

        return DeepSpeedEngine(model, optim, zero_stage=zero_stage)
    raise ValueError(f"backend: must be 'torch' or 'deepspeed', got {backend!r}")
