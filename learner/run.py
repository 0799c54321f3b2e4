"""`python -m learner.run [config.toml] [section.key=value ...]`: RFT, then synchronous DAPO.

With no config, the embedded default: the toy suite, the tiny policy shipped in
``learner/assets/tiny-policy``, the embedded policy server in this process, `ns` sandboxes on this
machine (see `learner.config` for every field). The loop, top to bottom:

    evaluate the starting policy on held-out tasks                     (eval/solve_rate at step 0)
    for stage in run.stages:                                            ("rft", then "dapo")
        for each step of the stage:
            rft:  sample B tasks x G rollouts -> keep the resolved ones -> SFT on their model tokens
            dapo: sample groups -> drop groups whose rewards are all equal, sample more until B are
                  kept (dynamic sampling) -> group-normalised advantages -> DAPO loss (clip-higher,
                  token-level, no KL, overlong filtering / soft punishment) -> optimizer step
            push the weights to every inference endpoint (policy version + 1, checked)
            log metrics (metrics.jsonl, TensorBoard), checkpoint (atomic)
    evaluate again; write the learning curves (PNG) and the trajectory viewer (before / after)

Resume: a run restarted on the same ``run.out_dir`` continues from its newest complete checkpoint
(``run.resume = "auto"``; ``--fresh`` starts over, keeping the old directory aside, ``--resume``
insists). Sampling seeds derive from the run seed, the step and the prompt (`learner.rollouts`), so
the resumed run samples the same next batch and computes the same loss as a run never stopped.
Ctrl-C (or SIGTERM) stops at the next safe point, saves a checkpoint when the last one is behind,
and prints the command that resumes; a second Ctrl-C stops at once.

Output, under ``run.out_dir``: ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``,
``learning_curves.png``, ``viewer/`` (held-out episodes before and after), ``summary.json``,
``trajectories/`` (every rollout, `runtime.store` format), ``config.toml`` (what ran).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trio

from runtime.config import ConfigError, dump_config
from runtime.records import Task, Trajectory

from . import checkpoint as ckpt
from .advantages import BatchFiller, group_advantages, soft_overlong_penalty
from .config import DEFAULT_CONFIG, RunConfig, load_run_config
from .engine import OptimConfig, make_engine
from .metrics import MetricsLog, plot_learning_curves, read_metrics
from .packing import dapo_samples, rft_samples, sequence_mean
from .rollouts import Environment, TaskCursor, load_task_sets, open_environment
from .trainer import dapo_step, rft_step

__all__ = ["main", "run"]

log = logging.getLogger("swe_dapo.learner")


class Interrupted(Exception):
    """The user asked the run to stop (Ctrl-C / SIGTERM); it stopped at a safe point."""


@dataclasses.dataclass
class Progress:
    """The loop's position: what a checkpoint records besides model and optimizer."""

    step: int = 0  # optimizer batches done, all stages
    stage_index: int = 0  # index into run.stages
    stage_step: int = 0  # steps done in the current stage
    policy_version: int = 0  # the version the endpoints serve
    cursor: dict[str, Any] = dataclasses.field(default_factory=lambda: {"epoch": 0, "index": 0, "swaps": []})
    evaluated_step: int = -1  # the last step whose held-out evaluation was logged
    engine_stage: int = 0  # the stage whose optimizer the checkpoint's trainer state belongs to
    metrics_lines: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Progress:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --- console ---------------------------------------------------------------------------------------


class Console:
    """Progress bars and messages on stderr (rich), quiet when stderr is not a terminal and `quiet`."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.console import Console as RichConsole

        self.rich = RichConsole(stderr=True)
        self.quiet = quiet
        self._progress = None
        self._bar = None

    def print(self, *args: Any) -> None:
        if not self.quiet:
            self.rich.print(*args)

    def start_phase(self, label: str, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bars, TextColumn, TimeElapsedColumn

        self.end_phase()
        if self.quiet:
            return
        self._progress = Bars(TextColumn(f"[bold]{label:<22s}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=self.rich,
                              transient=True)
        self._progress.start()
        self._bar = self._progress.add_task(label, total=total, note="")
        self._done = 0
        self._solved = 0

    def episode_done(self, resolved: bool) -> None:
        if self._progress is None:
            return
        self._done += 1
        self._solved += bool(resolved)
        self._progress.update(self._bar, advance=1, note=f"resolved {self._solved}/{self._done}")

    def end_phase(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


# --- rollout statistics ----------------------------------------------------------------------------


def rollout_metrics(trajectories: list[Trajectory], prefix: str = "rollout") -> dict[str, float]:
    """Reward, solve rate, lengths, turns, finish reasons and format errors of a batch of episodes."""
    n = len(trajectories)
    if n == 0:
        return {f"{prefix}/episodes": 0.0}
    response = [sum(len(t.action_ids) for t in tr.turns) for tr in trajectories]
    context = [len(tr.token_ids()) for tr in trajectories]
    reasons = Counter(str(getattr(tr.finish_reason, "value", tr.finish_reason)) for tr in trajectories)
    out = {
        f"{prefix}/episodes": float(n),
        f"{prefix}/reward_mean": sum(tr.reward for tr in trajectories) / n,
        f"{prefix}/solve_rate": sum(bool(tr.resolved) for tr in trajectories) / n,
        f"{prefix}/response_tokens_mean": sum(response) / n,
        f"{prefix}/response_tokens_max": float(max(response)),
        f"{prefix}/context_tokens_mean": sum(context) / n,
        f"{prefix}/turns_mean": sum(len(tr.turns) for tr in trajectories) / n,
        f"{prefix}/format_errors_mean": sum(sum(1 for t in tr.turns if t.format_error) for tr in trajectories) / n,
    }
    for reason, count in reasons.items():
        out[f"{prefix}/finish_{reason}"] = count / n
    return out


# --- data-parallel ranks ----------------------------------------------------------------------------


class Ranks:
    """The learner's data-parallel ranks under a launcher (``deepspeed`` or ``torchrun``, which set
    RANK and WORLD_SIZE). Rank 0 runs the loop: rollouts, rewards, evaluation, checkpoints, metrics,
    weight pushes. Before each collective step (building a stage's engine, loading a checkpoint, a
    training step on its share of the samples, gathering the state or the weights) it tells the other
    ranks, which wait in `follow` and do the same. One rank: every call is a no-op."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.stopped = False

    def start(self, cfg: RunConfig) -> None:
        if self.world > 1:
            if cfg.train.backend != "deepspeed":
                raise ConfigError(f"train.backend: {self.world} ranks need 'deepspeed', got {cfg.train.backend!r}")
            from .zero import init_distributed

            init_distributed()

    def tell(self, *message: Any) -> None:
        if self.world > 1 and not self.stopped:
            self.stopped = message[0] == "stop"
            import torch.distributed as dist

            dist.broadcast_object_list([message], src=0)

    def listen(self) -> tuple[Any, ...]:
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shard(self, samples: list[Any]) -> list[Any]:
        return samples[self.rank::self.world]

    def close(self) -> None:
        """Leave the process group before exiting: a gloo group still alive when the interpreter tears
        down aborts the process ("terminate called without an active exception")."""
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()


def stage_engine(cfg: RunConfig, model: Any, stage: str) -> Any:
    """The optimizer engine of `stage` (each stage starts with its own optimizer state and LR)."""
    o = cfg.optim
    stage_lr = {"rft": cfg.rft.lr, "dapo": cfg.dapo.lr}[stage] or o.lr
    optim = OptimConfig(lr=stage_lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2), eps=o.eps,
                        grad_clip=o.grad_clip, warmup_steps=o.warmup_steps)
    return make_engine(model, optim, backend=cfg.train.backend, zero_stage=cfg.train.zero_stage,
                       gradient_checkpointing=cfg.train.gradient_checkpointing)


def _checkpoint_state(path: Path, trainer: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Engine state to load: the checkpoint's trainer state plus its model's full weights."""
    from .tiny import load_model

    model, _ = load_model(Path(path) / "model", dtype=dtype)
    return {**trainer, "model": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def follow(cfg: RunConfig, ranks: Ranks) -> None:
    """A rank other than 0: do what rank 0 says until it says stop."""
    from .tiny import load_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
    if cfg.model.torch_threads:
        torch.set_num_threads(cfg.model.torch_threads)
    model, _ = load_model(cfg.model.path, dtype=dtype)
    engine = None
    while True:
        kind, *args = ranks.listen()
        if kind == "engine":
            engine = stage_engine(cfg, model, args[0])
        elif kind == "load":
            engine.load_state_dict(_checkpoint_state(Path(args[0]), ckpt.load(args[0]).trainer, dtype))
        elif kind == "rft":
            rft_step(engine, ranks.shard(args[0]), **args[1])
        elif kind == "dapo":
            dapo_step(engine, ranks.shard(args[0]), **args[1])
        elif kind == "state":
            engine.state_dict()
        elif kind == "weights":
            engine.full_weights()
        elif kind == "stop":
            return
        else:
            raise RuntimeError(f"rank {ranks.rank}: unknown command {kind!r} from rank 0")


# --- the run ---------------------------------------------------------------------------------------


class Run:
    def __init__(self, cfg: RunConfig, console: Console, ranks: Ranks | None = None) -> None:
        self.cfg = cfg
        self.console = console
        self.ranks = ranks or Ranks()
        self.out = Path(cfg.run.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.stop_requested = False
        self.progress = Progress()
        self.last_saved_step = -1
        self.summary: dict[str, Any] = {}
        self.engine: Any = None

    # -- setup ----------------------------------------------------------------------------------

    def _seed_everything(self) -> None:
        seed = self.cfg.run.seed
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        if self.cfg.model.torch_threads:
            torch.set_num_threads(self.cfg.model.torch_threads)

    def _load(self, resume_from: Path | None) -> tuple[Any, Any, dict[str, Any] | None]:
        from .tiny import load_model

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.cfg.model.dtype]
        if resume_from is None:
            try:
                model, tokenizer = load_model(self.cfg.model.path, dtype=dtype)
            except OSError as exc:
                raise ConfigError(f"model.path: cannot load {str(self.cfg.model.path)!r}: {exc}") from exc
            return model, tokenizer, None
        checkpoint = ckpt.load(resume_from)
        model, tokenizer = load_model(checkpoint.model_dir, dtype=dtype)
        self.progress = Progress.from_json(checkpoint.state)
        ckpt.restore_rng(checkpoint.state["rng"])
        self.last_saved_step = self.progress.step
        return model, tokenizer, checkpoint.trainer

    def _engine(self, model: Any, stage: str) -> Any:
        self.ranks.tell("engine", stage)
        return stage_engine(self.cfg, model, stage)

    # -- checkpoints ----------------------------------------------------------------------------

    def save(self, engine: Any, model: Any, tokenizer: Any, cursor: TaskCursor) -> float:
        started = time.perf_counter()
        self.progress.cursor = cursor.state()
        state = {**self.progress.to_json(), "rng": ckpt.capture_rng(),
                 "stage": self.cfg.run.stages[min(self.progress.stage_index, len(self.cfg.run.stages) - 1)]}
        self.ranks.tell("state")
        ckpt.save(self.ckpt_dir, step=self.progress.step, model=model, tokenizer=tokenizer,
                  engine_state=engine.state_dict(), state=state, keep=self.cfg.run.keep_checkpoints)
        self.last_saved_step = self.progress.step
        return time.perf_counter() - started

    # -- phases ---------------------------------------------------------------------------------

    async def rollouts(self, env: Environment, tasks: list[Task], group: int, *, salt: str, label: str,
                       temperature: float | None = None) -> list[list[Any]]:
        self.console.start_phase(label, len(tasks) * group)
        try:
            return await env.rollouts([(t, group, f"{salt}/{i}:{t.id}") for i, t in enumerate(tasks)], salt=salt,
                                      policy_version=self.progress.policy_version,
                                      temperature=self.cfg.rollout.temperature if temperature is None else temperature)
        finally:
            self.console.end_phase()

    async def evaluate(self, env: Environment, heldout: list[Task], tag: str) -> tuple[dict[str, float], list[Any]]:
        cfg = self.cfg.eval
        tasks = heldout[: cfg.max_tasks] if cfg.max_tasks else heldout
        started = time.perf_counter()
        groups = await self.rollouts(env, tasks, cfg.samples, salt=f"eval:{tag}", label=f"eval ({tag})",
                                     temperature=cfg.temperature)
        trajectories = [r.trajectory for g in groups for r in g]
        from agent.evaluate import summarize

        outcomes = {g[0].trajectory.task_id: [bool(r.trajectory.resolved) for r in g] for g in groups if g}
        metrics = {f"eval/{k}": v for k, v in summarize(outcomes, cfg.samples).items()}
        metrics.update({k.replace("eval_rollout/", "eval/"): v
                        for k, v in rollout_metrics(trajectories, "eval_rollout").items()})
        metrics["eval/solve_rate"] = metrics["eval/pass@1"]
        metrics["time/eval_s"] = time.perf_counter() - started
        return metrics, [r for g in groups for r in g]

    async def rft_iteration(self, env: Environment, engine: Any, cursor: TaskCursor) -> dict[str, float]:
        cfg, step = self.cfg.rft, self.progress.step
        group = cfg.group_size or self.cfg.rollout.group_size
        started = time.perf_counter()
        groups = await self.rollouts(env, cursor.take(cfg.batch_tasks), group, salt=f"rft:{step}",
                                     label=f"rft step {step + 1}")
        trajectories = [r.trajectory for g in groups for r in g]
        metrics = rollout_metrics(trajectories)
        metrics["time/rollout_s"] = time.perf_counter() - started
        samples = rft_samples(trajectories)
        metrics["rft/kept_trajectories"] = float(len(samples))
        if not samples or sum(s.num_loss_tokens for s in samples) == 0:
            metrics["rft/skipped"] = 1.0
            return metrics
        options = {"micro_batch_tokens": self.cfg.train.micro_batch_tokens, "chunk_size": self.cfg.train.logprob_chunk}
        for _ in range(cfg.epochs):
            train = await trio.to_thread.run_sync(lambda: self._train(rft_step, "rft", engine, samples, options))
            metrics = {**metrics, **{k: v for k, v in train.items() if k != "time/train_s"},
                       "time/train_s": metrics.get("time/train_s", 0.0) + train["time/train_s"]}
        metrics["rft/skipped"] = 0.0
        return metrics

    async def dapo_iteration(self, env: Environment, engine: Any, cursor: TaskCursor) -> dict[str, float]:
        cfg, step, G = self.cfg.dapo, self.progress.step, self.cfg.rollout.group_size
        started = time.perf_counter()
        filler: BatchFiller[Any] = BatchFiller(cfg.batch_groups)
        everything: list[Trajectory] = []
        rounds = 0
        while not filler.full and rounds < cfg.max_sample_rounds:
            need = cfg.batch_groups - len(filler.groups)
            n = max(need, cfg.sample_groups)
            groups = await self.rollouts(env, cursor.take(n), G, salt=f"dapo:{step}:{rounds}",
                                         label=f"dapo step {step + 1}" + (f" (refill {rounds})" if rounds else ""))
            for group in groups:
                trajectories = [r.trajectory for r in group]
                everything += trajectories
                filler.offer(trajectories, [self._shaped_reward(t) for t in trajectories])
            rounds += 1
        metrics = rollout_metrics(everything)
        metrics.update(filler.metrics())
        metrics["sampling/rounds"] = float(rounds)
        metrics["time/rollout_s"] = time.perf_counter() - started
        if not filler.groups:
            metrics["dapo/skipped"] = 1.0
            return metrics
        trajectories, advantages = [], []
        for group in filler.groups:
            trajectories += group
            advantages += [a if a >= 0 else a * cfg.negative_weight
                           for a in group_advantages([self._shaped_reward(t) for t in group])]
        samples = [s for s in dapo_samples(trajectories, advantages, overlong_filter=cfg.overlong_filter,
                                                mask_positive_format_errors=cfg.mask_format_errors)
                   if s.num_loss_tokens > 0]
        if cfg.loss_agg == "sequence":
            samples = sequence_mean(samples)
        metrics["dapo/samples"] = float(len(samples))
        metrics["dapo/overlong_filtered"] = float(len(trajectories) - len(samples))
        if not samples:
            metrics["dapo/skipped"] = 1.0
            return metrics
        options = {"micro_batch_tokens": self.cfg.train.micro_batch_tokens, "chunk_size": self.cfg.train.logprob_chunk,
                   "eps_low": cfg.eps_low, "eps_high": cfg.eps_high, "updates": cfg.updates,
                   "tis_cap": cfg.tis_cap or None}
        train = await trio.to_thread.run_sync(lambda: self._train(dapo_step, "dapo", engine, samples, options))
        metrics.update(train)
        metrics["dapo/skipped"] = 0.0
        return metrics

    def _train(self, step: Any, kind: str, engine: Any, samples: list[Any], options: dict[str, Any]) -> dict[str, float]:
        """One training step; with several ranks, each takes its share of the samples."""
        self.ranks.tell(kind, samples, options)
        return step(engine, self.ranks.shard(samples), **options)

    def _shaped_reward(self, trajectory: Trajectory) -> float:
        cfg = self.cfg.dapo
        if not cfg.overlong_max_tokens:
            return trajectory.reward
        length = sum(len(t.action_ids) for t in trajectory.turns)
        return trajectory.reward + soft_overlong_penalty(length, cfg.overlong_max_tokens, cfg.overlong_cache_tokens)

    # -- the loop -------------------------------------------------------------------------------

    async def main(self, resume_from: Path | None) -> dict[str, Any]:
        cfg = self.cfg
        self._seed_everything()
        model, tokenizer, trainer_state = self._load(resume_from)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.toml").write_text(dump_config(cfg))
        train_tasks, heldout = load_task_sets(cfg, self.out)
        for name, n in (("rft.batch_tasks", cfg.rft.batch_tasks if "rft" in cfg.run.stages else 0),
                        ("dapo.batch_groups", cfg.dapo.batch_groups if "dapo" in cfg.run.stages else 0),
                        ("dapo.sample_groups", cfg.dapo.sample_groups if "dapo" in cfg.run.stages else 0)):
            if n > len(train_tasks):
                raise ConfigError(f"{name}: {n} distinct tasks per batch, but the train set has {len(train_tasks)}")
        cursor = TaskCursor(train_tasks, cfg.run.seed)
        cursor.load_state(self.progress.cursor)
        metrics = MetricsLog.open(self.out, keep_lines=self.progress.metrics_lines if resume_from else None,
                                  purge_step=self.progress.step + 1 if resume_from else None)
        decode = lambda ids: tokenizer.decode(ids)  # noqa: E731
        from runtime.store import TrajectoryStore

        store = TrajectoryStore.open_writer(self.out / "trajectories")

        def on_result(result: Any) -> None:
            store.append(result.trajectory)
            self.console.episode_done(bool(result.trajectory.resolved))

        stages, p = cfg.run.stages, self.progress
        if p.engine_stage != p.stage_index and p.stage_index < len(stages):
            # the checkpoint closed a stage: the next one starts with a fresh optimizer
            p.engine_stage, trainer_state = p.stage_index, None
        self.engine = engine = self._engine(model, stages[min(p.engine_stage, len(stages) - 1)])
        if trainer_state is not None and p.stage_index < len(stages):
            self.ranks.tell("load", str(resume_from))
            engine.load_state_dict({**trainer_state, "model": {k: v.detach().clone() for k, v in model.state_dict().items()}})
        try:
            async with open_environment(cfg, model, tokenizer, policy_version=self.progress.policy_version,
                                        state_dir=self.out / "sandboxes", on_result=on_result) as env:
                if cfg.rollout.endpoints and resume_from is not None:  # external servers: serve the checkpoint
                    await self._push(env, engine, self.progress.policy_version)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_signals, nursery.cancel_scope)
                    try:
                        await self._loop(env, model, tokenizer, engine, cursor, heldout, metrics, decode)
                    finally:
                        nursery.cancel_scope.cancel()
        finally:
            store.close()
            self.console.end_phase()
            if self.stop_requested:
                if self.progress.step > self.last_saved_step and self.progress.step > 0:
                    self.save(self.engine, model, tokenizer, cursor)
                self.progress.metrics_lines = metrics.lines
            metrics.flush()
            metrics.close()
        if self.stop_requested:
            raise Interrupted()
        return self.summary

    async def _watch_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if self.stop_requested:  # the second one: stop now, nothing saved beyond the last checkpoint
                    self.console.end_phase()
                    os._exit(130)
                self.stop_requested = True
                self.console.end_phase()
                self.console.print(f"[yellow]{signal.Signals(signum).name}: stopping at the next safe point "
                                   "(press Ctrl-C again to stop at once)[/]")
                scope.cancel()

    async def _push(self, env: Environment, engine: Any, version: int) -> int:
        """Push the weights as `version`, retrying with backoff; returns how many endpoints failed.

        An endpoint that still fails after `rollout.push_attempts` stays paused (the weight sync
        leaves it so: nothing samples stale weights under the new version) and the LLM client drains
        it like a dead one. Only when no endpoint took the new weights does the run stop.
        """
        from .weight_sync import BackendUnavailable, WeightSyncError

        self.ranks.tell("weights")
        weights = engine.full_weights()
        for attempt in range(1, self.cfg.rollout.push_attempts + 1):
            try:
                await env.weight_sync.push(weights, version)
                return 0
            except BackendUnavailable:
                raise
            except WeightSyncError as exc:
                if attempt == self.cfg.rollout.push_attempts:
                    if not exc.updated:
                        raise
                    log.error("weight push v%d: %d endpoint(s) left paused after %d attempts: %s", version,
                              len(exc.failures), attempt, exc)
                    return len(exc.failures)
                log.warning("weight push v%d failed (attempt %d): %s; retrying", version, attempt, exc)
                await trio.sleep(min(30.0, 2.0 ** attempt))
        return 0

    def _eval_due(self) -> bool:
        step, cfg = self.progress.step, self.cfg
        if step == 0:
            return cfg.eval.before
        stage_ends, end = set(), 0
        for stage in cfg.run.stages:  # the solve rate after each stage: "RFT alone" vs "RFT + DAPO"
            end += cfg.stage_steps(stage)
            stage_ends.add(end)
        return step in stage_ends or bool(cfg.eval.every and step % cfg.eval.every == 0)

    async def _loop(self, env: Environment, model: Any, tokenizer: Any, engine: Any, cursor: TaskCursor,
                    heldout: list[Task], metrics: MetricsLog, decode: Any) -> None:
        cfg, p = self.cfg, self.progress
        stages = cfg.run.stages
        while True:
            # Evaluation runs after the step's checkpoint; a run resumed before it was logged runs it again.
            if heldout and self._eval_due() and p.evaluated_step < p.step:
                tag = "before" if p.step == 0 else "after" if p.step == cfg.total_steps else f"step {p.step}"
                if tag.startswith("step") and p.stage_index > 0 and p.stage_step == 0:
                    tag = f"after {stages[p.stage_index - 1]}"
                values, results = await self.evaluate(env, heldout, tag)
                metrics.log(p.step, "eval", values)
                p.evaluated_step = p.step
                if tag in ("before", "after"):
                    self._write_viewer(results, heldout, decode, tag)
                self.console.print(f"held-out solve rate ({tag}): {values['eval/solve_rate']:.1%} "
                                   f"({int(values['eval/episodes'])} episodes)")
            if p.stage_index >= len(stages):
                break
            stage = stages[p.stage_index]
            if p.engine_stage != p.stage_index:  # a new stage starts with its own optimizer
                self.engine = engine = self._engine(model, stage)
                p.engine_stage = p.stage_index
            step_started = time.perf_counter()
            if stage == "rft":
                values = await self.rft_iteration(env, engine, cursor)
                trained = not values.get("rft/skipped")
            else:
                values = await self.dapo_iteration(env, engine, cursor)
                trained = not values.get("dapo/skipped")
            with trio.CancelScope(shield=True):  # the step is taken: finish it whatever happens
                if trained:
                    pushed = time.perf_counter()
                    values["push/failed_endpoints"] = float(await self._push(env, engine, p.policy_version + 1))
                    p.policy_version += 1
                    values["time/push_s"] = time.perf_counter() - pushed
                values.update({f"scheduler/{k}": float(v) for k, v in env.scheduler.counters.items()})
                p.step += 1
                p.stage_step += 1
                if p.stage_step == cfg.stage_steps(stage):
                    p.stage_index += 1
                    p.stage_step = 0
                values["policy/version"] = float(p.policy_version)
                values["time/step_s"] = time.perf_counter() - step_started
                self._report(stage, values)
                metrics.log(p.step, stage, values)
                p.metrics_lines = metrics.lines
                if p.step % cfg.run.checkpoint_every == 0 or p.stage_step == 0:
                    took = self.save(engine, model, tokenizer, cursor)
                    log.info("checkpoint of step %d written in %.2f s", p.step, took)
        metrics.flush()
        plot_learning_curves(metrics.path, self.out / "learning_curves.png",
                             title=f"swe-dapo: {' then '.join(stages)} ({self.out.name})")
        records = list(read_metrics(metrics.path))
        self.summary.update(self._summarize(records))
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=1, sort_keys=True))
        os.replace(tmp, self.out / "summary.json")
        self.console.print(final_table(records, cfg.run.stages, cfg.eval.samples))
        self.console.print(f"Results in {self.out}: learning_curves.png, viewer/before and viewer/after (HTML), "
                           f"metrics.jsonl; TensorBoard: tensorboard --logdir {self.out / 'tensorboard'}")

    def _report(self, stage: str, values: dict[str, float]) -> None:
        p = self.progress
        parts = [f"[bold]{stage} step {p.step}[/] (v{p.policy_version})",
                 f"solve {values.get('rollout/solve_rate', math.nan):.0%}",
                 f"reward {values.get('rollout/reward_mean', math.nan):+.2f}"]
        if "loss/policy" in values:
            parts.append(f"loss {values['loss/policy']:+.4f}")
        if "loss/sft" in values:
            parts.append(f"sft {values['loss/sft']:.3f}")
        if "sampling/groups_kept" in values:
            parts.append(f"groups {int(values['sampling/groups_kept'])}/{int(values['sampling/groups_kept'] + values['sampling/groups_dropped'])}")
        if "eval/solve_rate" in values:
            parts.append(f"eval {values['eval/solve_rate']:.0%}")
        parts.append(f"{values['time/step_s']:.0f}s")
        self.console.print("  ".join(parts))

    def _write_viewer(self, results: list[Any], heldout: list[Task], decode: Any, label: str) -> None:
        from agent.viewer import EpisodeView, write_viewer

        n = self.cfg.eval.viewer_episodes
        if n <= 0 or not results:
            return
        by_id = {t.id: t for t in heldout}
        picked = results[:n]
        views = [EpisodeView(r.trajectory, by_id.get(r.trajectory.task_id), r.grade, f"{label} training")
                 for r in picked]
        write_viewer(self.out / "viewer" / label, views, decode, title=f"Held-out episodes {label} training")

    def _summarize(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        evals = [r for r in records if r.get("stage") == "eval"]
        out: dict[str, Any] = {"steps": self.progress.step, "policy_version": self.progress.policy_version,
                               "eval": [{"step": r["step"], "solve_rate": r.get("eval/solve_rate"),
                                         "reward_mean": r.get("eval/reward_mean")} for r in evals],
                               "out_dir": str(self.out)}
        for stage, last in stage_ends(records, self.cfg.run.stages).items():  # held-out solve rate at its end
            at = [r.get("eval/solve_rate") for r in evals if r["step"] == last]
            if at:
                out[f"{stage}_eval_solve_rate"] = at[-1]
        if evals:
            out["before"] = evals[0].get("eval/solve_rate") if evals[0]["step"] == 0 else None
            out["after"] = evals[-1].get("eval/solve_rate")
        return out


def stage_ends(records: list[dict[str, Any]], stages: Sequence[str]) -> dict[str, int]:
    """The last step each stage logged in `records` (the metrics lines), for the stages that have one."""
    ends = {}
    for stage in stages:
        steps = [r["step"] for r in records if r.get("stage") == stage]
        if steps:
            ends[stage] = max(steps)
    return ends


def final_table(records: list[dict[str, Any]], stages: Sequence[str], samples: int) -> Any:
    """The held-out evaluations of a run as a rich table: one row per evaluation, labelled by the stage
    that had just ended ("before", "after rft", ...)."""
    from rich.table import Table

    ends = {step: stage for stage, step in stage_ends(records, stages).items()}
    table = Table(title=f"Held-out evaluation ({samples} samples per task)")
    for name in ("when", "step", "solve rate", f"pass@{samples}", "reward", "format errors", "tokens out"):
        table.add_column(name, justify="left" if name == "when" else "right", no_wrap=True)
    for r in records:
        if r.get("stage") != "eval":
            continue
        label = "before" if r["step"] == 0 else f"after {ends[r['step']].upper()}" if r["step"] in ends \
            else f"during {next((s for e, s in sorted(ends.items()) if e > r['step']), '').upper()}"

        def cell(key: str, fmt: str) -> str:
            v = r.get(key)
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

        table.add_row(label, str(r["step"]), cell("eval/solve_rate", ".1%"), cell(f"eval/pass@{samples}", ".1%"),
                      cell("eval/reward_mean", "+.2f"), cell("eval/format_errors_mean", ".2f"),
                      cell("eval/response_tokens_mean", ".0f"))
    return table


# --- entry point -----------------------------------------------------------------------------------


def _quiet_libraries() -> None:
    """Our own progress bars only: no per-save bars from transformers, no accelerator probe banner
    from DeepSpeed (which transformers imports when saving) on a machine without CUDA."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _choose_resume(cfg: RunConfig, mode: str, console: Console) -> Path | None:
    latest = ckpt.find_latest(Path(cfg.run.out_dir) / "checkpoints")
    if mode == "never":
        if latest is not None or (Path(cfg.run.out_dir) / "metrics.jsonl").exists():
            aside = Path(f"{cfg.run.out_dir}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(str(cfg.run.out_dir), aside)
            console.print(f"starting fresh; the previous run is kept in {aside}")
        return None
    if latest is None:
        if mode == "must":
            raise ConfigError(f"run.resume: 'must', but {cfg.run.out_dir}/checkpoints has no complete checkpoint")
        return None
    if mode == "ask" and sys.stdin.isatty():
        answer = input(f"{cfg.run.out_dir} has a checkpoint ({latest.name}). Resume it? [Y/n] ").strip().lower()
        if answer in ("n", "no"):
            return _choose_resume(cfg, "never", console)
    console.print(f"resuming from {latest}")
    return latest


def run(cfg: RunConfig, *, resume: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run the configured stages (see the module docstring); returns the summary."""
    ranks = Ranks()
    ranks.start(cfg)
    if ranks.rank != 0:
        follow(cfg, ranks)
        ranks.close()
        return {}
    try:
        console = Console(quiet=quiet)
        resume_from = _choose_resume(cfg, resume or cfg.run.resume, console)
        summary = trio.run(Run(cfg, console, ranks).main, resume_from)
    finally:
        ranks.tell("stop")  # whatever happened here, the other ranks stop waiting
    ranks.close()
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m learner.run", description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", help="TOML config (default: the embedded default run, learner/configs/demo.toml)")
    ap.add_argument("overrides", nargs="*", help="section.key=value (e.g. dapo.steps=4)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--fresh", action="store_true", help="start over; an earlier run in out_dir is moved aside")
    group.add_argument("--resume", action="store_true", help="resume; fail when there is no checkpoint")
    group.add_argument("--ask", action="store_true", help="ask whether to resume when a checkpoint exists")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = ap.parse_intermixed_args(argv)  # options may come between overrides
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # only overrides were given
        config, overrides = None, [config, *overrides]
    given = config  # what the user typed, for the resume hint
    if config is None:
        config = str(DEFAULT_CONFIG)
    try:
        cfg = load_run_config(config, overrides)
    except ConfigError as exc:
        raise SystemExit(f"learner.run: bad config: {exc}") from None
    logging.basicConfig(level=cfg.run.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    mode = "never" if args.fresh else "must" if args.resume else "ask" if args.ask else None
    try:
        summary = run(cfg, resume=mode, quiet=args.quiet)
    except (Interrupted, KeyboardInterrupt):
        again = " ".join(["python -m learner.run", *([given] if given else []), *overrides])
        print(f"\nStopped. The run is saved in {cfg.run.out_dir}; resume with:\n    {again}\n"
              f"or start over with:\n    {again} --fresh", file=sys.stderr)
        raise SystemExit(130) from None
    except ConfigError as exc:
        raise SystemExit(f"learner.run: {exc}") from None
    if summary:  # rank 0 (the other ranks have nothing to report)
        print(json.dumps({"run": "learner", **summary}))


if __name__ == "__main__":
    main()
