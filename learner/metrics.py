"""Training metrics: ``metrics.jsonl`` (the source of truth), TensorBoard, and learning-curve PNGs.

Each line of ``metrics.jsonl`` is one record ``{"step": N, "stage": "dapo", "time": ..., "<name>": value}``
with namespaced names (``rollout/solve_rate``, ``loss/policy``, ``eval/solve_rate``, ``time/rollout_s``).
A line is written and flushed in one ``write``; a resumed run first truncates the file to the lines
its checkpoint had seen (`MetricsLog.open(..., keep_lines=n)`), so the metrics after a resume continue
the ones before it without duplicates or gaps. TensorBoard gets the same scalars (with ``purge_step``
on resume, so its curves are clean too).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "plot_learning_curves", "read_metrics"]


class MetricsLog:
    def __init__(self, path: Path, fh: Any, tensorboard_dir: Path | None, purge_step: int | None) -> None:
        self.path = path
        self._fh = fh
        self.lines = sum(1 for _ in read_metrics(path))
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency; a broken install still trains
                SummaryWriter = None  # noqa: N806
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(tensorboard_dir), purge_step=purge_step, flush_secs=10)

    @classmethod
    def open(cls, out_dir: str | os.PathLike[str], *, keep_lines: int | None = None,
             tensorboard: bool = True, purge_step: int | None = None) -> MetricsLog:
        """Open ``<out_dir>/metrics.jsonl`` for appending; `keep_lines`: truncate to that many records first."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        if keep_lines is not None and path.exists():
            kept = path.read_bytes().splitlines(keepends=True)[:keep_lines]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_bytes(b"".join(line for line in kept if line.endswith(b"\n")))
            os.replace(tmp, path)
        elif keep_lines is None and path.exists():
            path.unlink()  # a fresh run
        fh = open(path, "ab", buffering=0)
        return cls(path, fh, out / "tensorboard" if tensorboard else None, purge_step)

    def log(self, step: int, stage: str, values: Mapping[str, float]) -> dict[str, Any]:
        record: dict[str, Any] = {"step": step, "stage": stage, "time": round(time.time(), 3)}
        for name, value in sorted(values.items()):
            value = float(value)
            record[name] = value if math.isfinite(value) else None
            if self._tb is not None and math.isfinite(value):
                self._tb.add_scalar(name, value, step)
        self._fh.write((json.dumps(record) + "\n").encode())
        self.lines += 1
        return record

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._fh.close()


def read_metrics(path: str | os.PathLike[str]) -> Iterable[dict[str, Any]]:
    """Records of a ``metrics.jsonl``; a torn last line (a kill mid-write) is skipped."""
    p = Path(path)
    if not p.exists():
        return
    with open(p, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                return
            try:
                yield json.loads(line)
            except ValueError:
                return


_CURVES = (
    ("solve rate", ("eval/solve_rate", "rollout/solve_rate")),
    ("reward", ("rollout/reward_mean",)),
    ("response tokens", ("rollout/response_tokens_mean",)),
    ("loss", ("loss/policy", "loss/sft")),
)


def plot_learning_curves(metrics_path: str | os.PathLike[str], png_path: str | os.PathLike[str], *,
                         title: str = "swe-dapo") -> Path:
    """Solve rate (held-out eval and training rollouts), reward, response length and loss per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(read_metrics(metrics_path))
    fig, axes = plt.subplots(1, len(_CURVES), figsize=(4.2 * len(_CURVES), 3.4), constrained_layout=True)
    stage_starts: dict[str, int] = {}
    for r in records:
        stage_starts.setdefault(r.get("stage", ""), r["step"])
    for ax, (label, names) in zip(axes, _CURVES):
        for name in names:
            points = [(r["step"], r[name]) for r in records if r.get(name) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", markersize=3, label=name)
        for stage, start in stage_starts.items():
            if stage in ("rft", "dapo") and start > 0:
                ax.axvline(start - 0.5, color="grey", linestyle=":", linewidth=1)
                ax.text(start - 0.4, ax.get_ylim()[1], stage, fontsize=7, va="top", color="grey")
        if label == "solve rate":
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    out = Path(png_path)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out
