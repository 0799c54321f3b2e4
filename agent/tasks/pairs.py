"""Issue/patch pairs without tests, for the SWE-RL similarity reward.

SWE-RL (arXiv 2502.18449) trains on pull requests that have an issue, a repository snapshot and
the merged change, but no runnable tests: the reward compares the policy's patch with the oracle
patch (`agent.rewards.similarity_reward`). Such a pair is not a `runtime.records.Task`:

- `Task.FAIL_TO_PASS` must be non-empty, and a Task also promises a test command, a log parser and
  an image that holds the environment. A sentinel test name would let an ungradable task reach the
  grader, which would then score every episode 0 (a missing test never passes) and quietly
  poison the execution reward and pass@k instead of failing loudly.
- A separate type keeps the two reward paths apart where it matters: the grader accepts Task
  only, the similarity reward needs only `problem_statement` and `oracle_patch`.

Row schema (JSONL, JSON, parquet or `save_to_disk`, like tasks): ``instance_id`` (or ``id``),
``repo``, ``base_commit``, ``problem_statement`` (the issue text), ``patch`` (the oracle change).
An optional ``image`` ("host", "podman:<name>", "dir:<path>"), or ``image_name`` /
``docker_image`` (as in SWE-rebench), says where the repository lives; without one the pair has
``image=None`` and the caller provides the checkout. Other columns go to `metadata`. Rows of
SWE-bench, SWE-Gym and SWE-rebench datasets are valid pairs too (their tests then stay in metadata).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import LoadResult
from .formats import RawRow, read_rows
from .loaders import Fields, load_rows

__all__ = ["PatchPair", "load_patch_pairs", "patch_pairs_from_rows"]

_IMAGE_KINDS = ("podman:", "dir:")


@dataclass(frozen=True, kw_only=True)
class PatchPair:
    """An issue and the change that resolved it; `oracle_patch` is never shown to the policy."""

    id: str
    repo: str
    base_commit: str
    problem_statement: str
    oracle_patch: str = field(repr=False)
    image: str | None = None  # "host", "podman:<name>" or "dir:<path>"; None: the caller provides it
    metadata: dict[str, Any] = field(default_factory=dict)
    split: str | None = None

    def __post_init__(self) -> None:
        for name in ("id", "repo", "base_commit", "problem_statement", "oracle_patch"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"PatchPair.{name}: expected a non-empty str, got {value!r:.60}")
        if self.image is not None and not (
                self.image == "host" or (self.image.startswith(_IMAGE_KINDS) and self.image.partition(":")[2])):
            raise ValueError(f"PatchPair.image: expected 'host', 'podman:<name>' or 'dir:<path>', got {self.image!r}")


def _pair(data: Mapping[str, Any], where: str, split: str | None) -> PatchPair:
    f = Fields(data, where)
    id_key = "instance_id" if f.present("instance_id") or not f.present("id") else "id"
    pair_id = f.instance_id(key=id_key)
    repo = f.repo()
    base_commit = f.commit("base_commit")
    problem = f.text("problem_statement", nonempty=True)
    oracle = f.patch("patch")
    image = None
    if f.present("image"):
        image = f.text("image", nonempty=True)
        if not (image == "host" or (image.startswith(_IMAGE_KINDS) and image.partition(":")[2])):  # type: ignore[union-attr]
            f.fail("image", f"expected 'host', 'podman:<name>' or 'dir:<path>', got {image!r}")
    else:
        for key in ("image_name", "docker_image"):
            if f.present(key):
                image = "podman:" + f.text(key, nonempty=True)  # type: ignore[operator]
                break
    consumed = ("instance_id", "id", "repo", "base_commit", "problem_statement", "patch", "image",
                "image_name", "docker_image")
    return PatchPair(id=pair_id, repo=repo, base_commit=base_commit, problem_statement=problem,  # type: ignore[arg-type]
                     oracle_patch=oracle, image=image, metadata=f.metadata(consumed), split=split)  # type: ignore[arg-type]


def load_patch_pairs(path: str | os.PathLike[str], *, format: str = "auto", on_error: str = "raise",
                     split: str | None = None) -> LoadResult[PatchPair]:
    """Load issue/patch pairs; `format`, `on_error` and `split` work as in `load_tasks`."""
    return load_rows(read_rows(path, format), _pair, on_error=on_error, split=split, source=str(path))


def patch_pairs_from_rows(rows: Iterable[Mapping[str, Any]], *, on_error: str = "raise",
                          split: str | None = None, source: str = "rows") -> LoadResult[PatchPair]:
    raw = []
    for i, r in enumerate(rows, 1):
        if isinstance(r, Mapping):
            raw.append(RawRow(f"{source} row {i}", dict(r)))
        else:
            raw.append(RawRow(f"{source} row {i}", None, error=f"expected an object, got {type(r).__name__}"))
    return load_rows(raw, _pair, on_error=on_error, split=split, source=source)
