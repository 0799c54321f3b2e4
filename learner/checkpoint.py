"""Atomic training checkpoints: a killed run resumes exactly from the last complete one.

Layout under ``<out_dir>/checkpoints``::

    step-000012/                 one complete checkpoint (a directory appears only once complete)
        model/                   Hugging Face checkpoint: config.json, model.safetensors, tokenizer
        trainer.pt               optimizer, LR schedule, engine step (`Engine.state_dict` less "model")
        state.json               progress: step, stage, stage step, policy version, data cursor,
                                 metrics lines written, RNG states (python, numpy, torch)
    latest                       the name of the newest complete checkpoint, replaced atomically

Writing: everything goes into ``.tmp-step-000012-<random>/``; every file is fsynced, the directory is
renamed into place and the parent fsynced, then ``latest`` is replaced (write, fsync, rename). A kill at
any instant leaves either the previous checkpoint or the new one as ``latest``, never a torn one;
leftover ``.tmp-*`` directories are removed by the next save. Older checkpoints beyond `keep` are
deleted only after the new one is in place.

Reading: ``latest`` first; if it names a directory that is gone or unreadable, the newest readable
``step-*`` directory. `load` raises `CheckpointError` naming the file when nothing is usable.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["Checkpoint", "CheckpointError", "capture_rng", "find_latest", "load", "restore_rng", "save"]

_NAME = re.compile(r"^step-(\d{6,})$")


class CheckpointError(Exception):
    """No usable checkpoint, or one that does not fit this run."""


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]  # state.json
    trainer: dict[str, Any]  # trainer.pt (engine state less the model)
    model_dir: Path

    @property
    def step(self) -> int:
        return int(self.state["step"])


def capture_rng() -> dict[str, Any]:
    """Every random stream the training step touches, as JSON-able values."""
    out = {
        "python": base64.b64encode(pickle.dumps(random.getstate())).decode(),
        "numpy": base64.b64encode(pickle.dumps(np.random.get_state())).decode(),
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(pickle.loads(base64.b64decode(state["python"])))  # noqa: S301 (our own file)
    np.random.set_state(pickle.loads(base64.b64decode(state["numpy"])))  # noqa: S301
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_latest(root: Path, name: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".latest-", dir=root)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(name + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, root / "latest")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(root)


def save(root: str | os.PathLike[str], *, step: int, model: nn.Module, tokenizer: Any, engine_state: dict[str, Any],
         state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` under `root` atomically (see the module docstring); returns its path.

    `engine_state` is `Engine.state_dict()`; its "model" entry (full weights) is written as the HF
    checkpoint in ``model/``, the rest to ``trainer.pt``. `state` is the loop's progress (JSON-able).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):  # what an earlier kill left mid-write
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        os.chmod(tmp, 0o755)
        trainer = {k: v for k, v in engine_state.items() if k != "model"}
        weights = engine_state.get("model")
        model_dir = tmp / "model"
        if weights is not None:
            # the engine's full weights may differ from `model`'s (ZeRO-3 partitions them)
            model.save_pretrained(model_dir, state_dict=weights, safe_serialization=True)
        else:
            model.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
        torch.save(trainer, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1, sort_keys=True))
        _fsync_tree(tmp)
        target = root / name
        if target.exists():  # the same step saved again after a resume: replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_latest(root, name)
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)))
    for old_step, path in steps[:-keep] if keep > 0 else []:
        if old_step != step:
            shutil.rmtree(path, ignore_errors=True)
    return target


def _readable(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "trainer.pt").is_file() and \
        (path / "model" / "config.json").is_file()


def find_latest(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under `root`, or None when there is none."""
    root = Path(root)
    if not root.is_dir():
        return None
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if _NAME.match(named.name) and _readable(named):
            return named
    candidates = sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and _readable(p)),
                        reverse=True)
    return candidates[0][1] if candidates else None


def load(path: str | os.PathLike[str]) -> Checkpoint:
    """Read the checkpoint directory `path` (trainer state on CPU); the model stays on disk in ``model/``."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / 'state.json'}: unreadable ({exc})") from exc
    try:
        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path / 'trainer.pt'}: unreadable ({exc})") from exc
    if not (path / "model" / "config.json").is_file():
        raise CheckpointError(f"{path / 'model'}: no Hugging Face checkpoint")
    return Checkpoint(path, state, trainer, path / "model")
