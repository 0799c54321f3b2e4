"""The config of `python -m learner.run`: one dataclass per TOML table, a comment per field.

Loaded with `runtime.config.load_config` (unknown keys and wrong types are errors naming the dotted
key), then checked as a whole by `check_config` (impossible shapes, missing paths), which raises
`ConfigError` naming the field too. With no file, the defaults are the embedded default run: the
toy suite, the tiny policy shipped in ``learner/assets/tiny-policy``, the embedded policy server in
this process and `ns` sandboxes on this machine.

    [run]       where output goes, seed, which stages run and whether to resume
    [model]     the checkpoint trained and served
    [tasks]     train tasks and held-out evaluation tasks
    [sandbox]   sandboxd nodes (none: sandboxes in this process)
    [rollout]   inference endpoints (none: the embedded server), group size, episode limits
    [reward]    execution (SWE-bench resolved) or SWE-RL similarity, format penalty
    [train]     packing, micro-batches, backend (torch or DeepSpeed ZeRO)
    [optim]     AdamW and its schedule (shared by both stages unless a stage overrides lr)
    [rft]       rejection fine-tuning stage
    [dapo]      DAPO stage
    [eval]      held-out evaluation before, during and after training
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from runtime.config import ConfigError, dump_config, load_config

__all__ = [
    "DEFAULT_MODEL",
    "ConfigError",
    "DapoConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimSection",
    "RewardConfig",
    "RftConfig",
    "RolloutConfig",
    "RunConfig",
    "RunSection",
    "SandboxConfig",
    "TasksConfig",
    "TrainConfig",
    "check_config",
    "dump_config",
    "load_run_config",
]

DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "tiny-policy"
# The embedded default run: what `python -m learner.run` (no config file) and `make demo` run.
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.toml"


@dataclass(frozen=True)
class RunSection:
    out_dir: Path = Path("runs/default")  # checkpoints, metrics.jsonl, tensorboard/, plots, viewer/
    seed: int = 0  # seeds tasks order, sampling seeds, torch; the same seed gives the same run
    stages: list[str] = field(default_factory=lambda: ["rft", "dapo"])  # run in this order
    resume: Literal["auto", "never", "must"] = "auto"  # auto: resume when out_dir has a checkpoint
    checkpoint_every: int = 1  # steps between checkpoints (the last step of a stage always saves)
    keep_checkpoints: int = 2  # older ones are deleted after a newer one is complete
    log_level: str = "WARNING"


@dataclass(frozen=True)
class ModelConfig:
    path: Path = DEFAULT_MODEL  # a Hugging Face checkpoint directory (config.json, safetensors, tokenizer)
    dtype: Literal["float32", "bfloat16"] = "float32"
    torch_threads: int = 0  # 0: torch's default


@dataclass(frozen=True)
class TasksConfig:
    # "toy": the generated toy suite (train templates for training, held-out templates for eval);
    # otherwise a task file (jsonl/json/parquet/save_to_disk dir) read by agent.tasks.load_tasks.
    source: str = "toy"
    toy_seed: int = 2026  # the toy suite's generator seed
    toy_train: int = 48  # toy train tasks generated
    toy_heldout: int = 24  # toy held-out tasks generated
    # What the toy held-out tasks are. "templates": tasks of the held-out templates, whose code no
    # training task has (the strict split, for models that can read and edit unseen code).
    # "instances": unseen instances of the train templates' bugs, from another generator seed: other
    # package names, issue texts and difficulty levels, never a training task's issue text.
    toy_heldout_from: Literal["templates", "instances"] = "templates"
    eval_source: str = ""  # task file for evaluation when source is a file ("" : no evaluation)
    workdir: Path | None = None  # where toy repositories are written (None: <out_dir>/tasks)


@dataclass(frozen=True)
class SandboxConfig:
    nodes: list[str] = field(default_factory=list)  # sandboxd addresses; empty: in-process sandboxes
    token_file: Path | None = None  # token for tcp nodes
    runtime: Literal["ns", "podman", "dir"] = "ns"  # in-process runtime when nodes is empty
    node_capacity: int = 32  # sandboxes in flight per node
    grade_timeout_s: float = 120.0


@dataclass(frozen=True)
class RolloutConfig:
    endpoints: list[str] = field(default_factory=list)  # OpenAI-compatible servers; empty: embedded
    model_name: str = ""  # the model id the endpoints serve ("": send none; vLLM then serves its only model)
    push_backend: Literal["ipc", "disk", "nccl"] = "ipc"  # weight push to the endpoints (ipc: embedded)
    push_attempts: int = 3  # a failed weight push is retried (backoff) before the run gives up
    group_size: int = 4  # G rollouts per task (one DAPO group)
    temperature: float = 1.0
    max_turns: int = 8
    max_context_tokens: int = 2048  # per episode: prompt plus every turn
    max_turn_tokens: int = 256  # one model turn
    max_episodes: int = 64  # episodes in flight
    max_num_seqs: int = 64  # embedded server: rows decoded together
    episode_wall_s: float = 600.0
    request_timeout_s: float = 300.0


@dataclass(frozen=True)
class RewardConfig:
    kind: Literal["execution", "similarity"] = "execution"  # 1/0 resolved, or SWE-RL difflib similarity
    format_penalty: float = 0.0  # subtracted per malformed tool call
    format_floor: float = -1.0  # ... down to this


@dataclass(frozen=True)
class TrainConfig:
    micro_batch_tokens: int = 4096  # tokens per packed row (one micro-batch)
    logprob_chunk: int = 1024  # positions per chunk of the LM head (never a full [T, V] tensor)
    gradient_checkpointing: bool = False
    backend: Literal["torch", "deepspeed"] = "torch"
    zero_stage: int = 0  # DeepSpeed ZeRO stage (2 or 3) when backend = "deepspeed"


@dataclass(frozen=True)
class OptimSection:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0


@dataclass(frozen=True)
class RftConfig:
    steps: int = 4  # optimizer steps
    batch_tasks: int = 16  # tasks sampled per step
    group_size: int = 0  # rollouts per task (0: rollout.group_size)
    epochs: int = 1  # passes over each step's resolved trajectories (each pass one optimizer step)
    lr: float = 0.0  # 0: optim.lr


@dataclass(frozen=True)
class DapoConfig:
    steps: int = 8
    batch_groups: int = 8  # B informative groups per step
    sample_groups: int = 0  # groups sampled per round (0: batch_groups); more rounds until B are kept
    max_sample_rounds: int = 4  # then train on what was kept (logged), never loop forever
    eps_low: float = 0.2
    eps_high: float = 0.28
    updates: int = 1  # optimizer steps per batch (mini-batches); > 1 makes clipping bite
    overlong_filter: bool = True  # drop context-overflow trajectories from the loss
    overlong_max_tokens: int = 0  # soft overlong punishment L_max in model tokens (0: off)
    overlong_cache_tokens: int = 0  # ... its L_cache
    tis_cap: float = 0.0  # truncated importance sampling cap against sampler logprobs (0: off)
    # How the loss averages: "token", DAPO's token-level mean over the batch (a long episode weighs
    # as many tokens as it has); "sequence", each episode's token mean, then the mean over episodes
    # (GRPO's), so long failed episodes (malformed calls, retries) do not outweigh short successes.
    loss_agg: Literal["token", "sequence"] = "token"
    # Scale of negative advantages (1: DAPO as published). Below 1 the failures of a group push their
    # tokens down less than the successes pull theirs up (asymmetric REINFORCE): a small policy's
    # failed episodes, sampled at temperature 1, are full of low-probability tokens whose gradients
    # dominate the batch and wreck it (the shipped tiny policy collapses with 1).
    negative_weight: float = 1.0
    # A trajectory with a positive advantage carries no loss on its malformed tool calls (RFT's rule):
    # without it a success with a bad call teaches the bad call too (format errors then grow step by step).
    mask_format_errors: bool = True
    lr: float = 0.0  # 0: optim.lr


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0  # steps between evaluations (0: only before and after training)
    samples: int = 2  # rollouts per held-out task
    max_tasks: int = 0  # 0: every held-out task
    temperature: float = 1.0
    before: bool = True  # evaluate the starting checkpoint
    viewer_episodes: int = 6  # held-out episodes written to the HTML viewer before and after


@dataclass(frozen=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    rft: RftConfig = field(default_factory=RftConfig)
    dapo: DapoConfig = field(default_factory=DapoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def stage_steps(self, stage: str) -> int:
        return {"rft": self.rft.steps, "dapo": self.dapo.steps}[stage]

    @property
    def total_steps(self) -> int:
        return sum(self.stage_steps(s) for s in self.run.stages)


def _positive(cfg: object, section: str, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"{section}.{name}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_config(cfg: RunConfig) -> RunConfig:
    """Whole-config checks that types alone cannot express; raises `ConfigError` naming the field."""
    if not cfg.run.stages:
        raise ConfigError("run.stages: needs at least one of 'rft', 'dapo'")
    for i, stage in enumerate(cfg.run.stages):
        if stage not in ("rft", "dapo"):
            raise ConfigError(f"run.stages[{i}]: unknown stage {stage!r} (known: 'rft', 'dapo')")
    if len(set(cfg.run.stages)) != len(cfg.run.stages):
        raise ConfigError(f"run.stages: a stage is listed twice: {cfg.run.stages}")
    _positive(cfg.run, "run", "checkpoint_every", "keep_checkpoints")
    _positive(cfg.rollout, "rollout", "group_size", "push_attempts", "max_turns", "max_context_tokens", "max_turn_tokens",
              "max_episodes", "max_num_seqs", "episode_wall_s", "request_timeout_s")
    if cfg.rollout.max_turn_tokens >= cfg.rollout.max_context_tokens:
        raise ConfigError(f"rollout.max_turn_tokens: must be < rollout.max_context_tokens "
                          f"({cfg.rollout.max_context_tokens}), got {cfg.rollout.max_turn_tokens}")
    if cfg.rollout.temperature <= 0:
        raise ConfigError(f"rollout.temperature: must be > 0 for RL sampling, got {cfg.rollout.temperature}")
    _positive(cfg.sandbox, "sandbox", "node_capacity", "grade_timeout_s")
    _positive(cfg.train, "train", "micro_batch_tokens", "logprob_chunk")
    if cfg.train.micro_batch_tokens < cfg.rollout.max_context_tokens:
        raise ConfigError(f"train.micro_batch_tokens: must hold one whole episode "
                          f"(>= rollout.max_context_tokens = {cfg.rollout.max_context_tokens}), "
                          f"got {cfg.train.micro_batch_tokens}")
    if cfg.train.backend == "deepspeed" and cfg.train.zero_stage not in (2, 3):
        raise ConfigError(f"train.zero_stage: DeepSpeed needs 2 or 3, got {cfg.train.zero_stage}")
    if cfg.train.backend == "torch" and cfg.train.zero_stage != 0:
        raise ConfigError(f"train.zero_stage: only with train.backend = 'deepspeed', got {cfg.train.zero_stage}")
    _positive(cfg.optim, "optim", "lr", "eps")
    _positive(cfg.optim, "optim", "weight_decay", "grad_clip", "warmup_steps", allow_zero=True)
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg.optim, name) < 1:
            raise ConfigError(f"optim.{name}: must be in [0, 1), got {getattr(cfg.optim, name)}")
    _positive(cfg.rft, "rft", "steps", "group_size", "lr", allow_zero=True)
    _positive(cfg.rft, "rft", "batch_tasks", "epochs")
    _positive(cfg.dapo, "dapo", "steps", "sample_groups", "overlong_max_tokens", "overlong_cache_tokens",
              "tis_cap", "lr", allow_zero=True)
    _positive(cfg.dapo, "dapo", "batch_groups", "max_sample_rounds", "updates")
    if cfg.rollout.group_size < 2 and "dapo" in cfg.run.stages:
        raise ConfigError(f"rollout.group_size: DAPO needs groups of >= 2 rollouts, got {cfg.rollout.group_size}")
    if not 0 <= cfg.dapo.eps_low < 1:
        raise ConfigError(f"dapo.eps_low: must be in [0, 1), got {cfg.dapo.eps_low}")
    if cfg.dapo.eps_high < 0:
        raise ConfigError(f"dapo.eps_high: must be >= 0, got {cfg.dapo.eps_high}")
    if (cfg.dapo.overlong_max_tokens > 0) != (cfg.dapo.overlong_cache_tokens > 0):
        raise ConfigError("dapo.overlong_cache_tokens: set both dapo.overlong_max_tokens and "
                          "dapo.overlong_cache_tokens, or neither")
    if cfg.dapo.overlong_cache_tokens > cfg.dapo.overlong_max_tokens:
        raise ConfigError(f"dapo.overlong_cache_tokens: must be <= dapo.overlong_max_tokens "
                          f"({cfg.dapo.overlong_max_tokens}), got {cfg.dapo.overlong_cache_tokens}")
    _positive(cfg.eval, "eval", "every", "max_tasks", "viewer_episodes", allow_zero=True)
    _positive(cfg.eval, "eval", "samples", "temperature")
    if not 0.0 <= cfg.dapo.negative_weight <= 1.0:
        raise ConfigError(f"dapo.negative_weight: must be in [0, 1], got {cfg.dapo.negative_weight}")
    _positive(cfg.tasks, "tasks", "toy_train", "toy_heldout", allow_zero=True)
    if cfg.tasks.source == "toy" and cfg.tasks.toy_train == 0:
        raise ConfigError("tasks.toy_train: must be > 0")
    if cfg.tasks.source != "toy" and not Path(cfg.tasks.source).exists():
        raise ConfigError(f"tasks.source: no such task file {cfg.tasks.source!r}")
    if cfg.tasks.eval_source and not Path(cfg.tasks.eval_source).exists():
        raise ConfigError(f"tasks.eval_source: no such task file {cfg.tasks.eval_source!r}")
    if not (cfg.model.path / "config.json").is_file():
        hint = " (run scripts/make_tiny_policy.py to rebuild the shipped tiny policy)" \
            if cfg.model.path == DEFAULT_MODEL else ""
        raise ConfigError(f"model.path: no Hugging Face checkpoint at {str(cfg.model.path)!r} "
                          f"(config.json missing){hint}")
    if cfg.sandbox.token_file is not None and not cfg.sandbox.token_file.is_file():
        raise ConfigError(f"sandbox.token_file: no such file {str(cfg.sandbox.token_file)!r}")
    if cfg.rollout.endpoints and cfg.rollout.push_backend == "ipc":
        raise ConfigError("rollout.push_backend: 'ipc' only reaches the embedded server; "
                          "use 'disk' or 'nccl' with rollout.endpoints")
    return cfg


def load_run_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The run config from a TOML file (None: the embedded default) plus ``a.b=value`` overrides."""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    return check_config(load_config(RunConfig, {} if path is None else path, list(overrides)))


def section_names() -> list[str]:
    return [f.name for f in fields(RunConfig)]
