"""Episode rewards: execution, SWE-RL patch similarity, and a format penalty. Pure functions.

Execution reward (SWE-bench resolved rule, decided by grading):

    R_exec = 1.0 if the task is resolved else 0.0          (ungraded or grading error -> 0.0)

SWE-RL similarity reward (Wei et al., "SWE-RL", arXiv 2502.18449, eq. 1):

    R(tau) = -1                               if the response is wrongly formatted
             compare(patch_pred, patch_gt)    otherwise

`compare` follows the reference implementation (facebookresearch/swe-rl,
src/swerl/core/reward.py, `calculate_reward_unidiff` + `compute_change_similarities`):

1. each patch becomes a map path -> change text: for every non-binary file, the hunks rendered as
   unidiff renders them (``@@ -a,b +c,d @@ section`` then the prefixed lines), each stripped,
   joined by newlines; a renamed file is keyed by its old path and its text starts with
   ``rename from OLD to NEW``; binary files are left out;
2. over the union of paths of both maps, similarity(path) =
   ``difflib.SequenceMatcher(None, pred, oracle, autojunk=False).ratio()``, and 0.0 when either
   side has no change for that path (a missing or extra file scores 0: no reward for touching
   unrelated files, no reward for empty edits);
3. R = mean of the per-file similarities (1.0 when both maps are empty).

Format errors (-1): a predicted patch that does not parse (`agent.patch.PatchParseError`). An empty
prediction also gets -1 by default (`empty_reward`): in the paper's setting, a response with no
edit is a format error (reference `calculate_search_replace_reward`: "No valid search blocks
found"). The reference's unidiff helper instead scores an empty prediction 0.0 (every oracle file
unmatched); pass ``empty_reward=0.0`` for that reading.

Format penalty (ours, configurable): subtract `penalty` per malformed tool call, floored:

    R' = max(floor, R - penalty * n_format_errors)
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

from agent.patch import FilePatch, Hunk, PatchParseError, parse_patch

__all__ = [
    "FileSimilarity",
    "SimilarityResult",
    "apply_format_penalty",
    "count_format_errors",
    "execution_reward",
    "file_level_changes",
    "similarity_details",
    "similarity_reward",
]


def execution_reward(resolved: bool | None) -> float:
    """1.0 for a resolved task, else 0.0 (None, i.e. ungraded or a grading error, is not resolved)."""
    return 1.0 if resolved is True else 0.0


# ---------------------------------------------------------------------------------------------
# SWE-RL similarity


@dataclass(frozen=True)
class FileSimilarity:
    path: str
    predicted_change: str  # "" when the prediction does not touch `path`
    oracle_change: str  # "" when the oracle does not touch `path`
    similarity: float


@dataclass(frozen=True)
class SimilarityResult:
    reward: float
    files: tuple[FileSimilarity, ...] = ()
    error: str = ""  # why the reward is the format-error value; "" otherwise


def _hunk_text(hunk: Hunk) -> str:
    # unidiff's str(Hunk): the header with both lengths always written, then each line + "\n".
    return hunk.header() + "\n" + "".join(line + "\n" for line in hunk.lines)


def _file_change(fp: FilePatch) -> tuple[str, str]:
    if fp.is_rename:
        header, path = f"rename from {fp.old_path} to {fp.new_path}", fp.old_path
    else:
        header, path = "", fp.old_path if fp.old_path is not None else fp.new_path
    body = "\n".join(_hunk_text(hunk).strip() for hunk in fp.hunks)
    return path, (header + "\n" + body).strip()  # type: ignore[return-value]


def file_level_changes(patch: str) -> dict[str, str]:
    """Path -> normalised change text of every non-binary file (step 1 in the module doc).

    Raises `PatchParseError` for a malformed patch. A file listed twice keeps its last entry, as
    in the reference (a dict update).
    """
    changes: dict[str, str] = {}
    for fp in parse_patch(patch):
        if fp.is_binary:
            continue
        path, text = _file_change(fp)
        changes[path] = text
    return changes


def _compare(predicted: dict[str, str], oracle: dict[str, str]) -> tuple[float, tuple[FileSimilarity, ...]]:
    files = []
    for path in sorted(set(predicted) | set(oracle)):
        pred, gold = predicted.get(path, ""), oracle.get(path, "")
        if pred == "" or gold == "":
            similarity = 0.0
        else:
            similarity = difflib.SequenceMatcher(None, pred, gold, autojunk=False).ratio()
        files.append(FileSimilarity(path, pred, gold, similarity))
    if not files:
        return 1.0, ()
    return sum(f.similarity for f in files) / len(files), tuple(files)


def similarity_details(predicted_patch: str, oracle_patch: str, *, empty_reward: float = -1.0) -> SimilarityResult:
    """The SWE-RL reward of `predicted_patch` against `oracle_patch`, with per-file details.

    `oracle_patch` is data, not model output: a malformed or empty oracle raises ValueError.
    """
    if not oracle_patch.strip():
        raise ValueError("oracle_patch: empty; the similarity reward needs a reference change")
    try:
        oracle = file_level_changes(oracle_patch)
    except PatchParseError as exc:
        raise ValueError(f"oracle_patch: not a valid patch: {exc}") from exc
    if not predicted_patch.strip():
        return SimilarityResult(empty_reward, error="empty patch")
    try:
        predicted = file_level_changes(predicted_patch)
    except PatchParseError as exc:
        return SimilarityResult(-1.0, error=f"malformed patch: {exc}")
    reward, files = _compare(predicted, oracle)
    return SimilarityResult(reward, files)


def similarity_reward(predicted_patch: str, oracle_patch: str, *, empty_reward: float = -1.0) -> float:
    """SWE-RL reward in [0, 1], or -1 for a malformed patch and `empty_reward` for an empty one."""
    return similarity_details(predicted_patch, oracle_patch, empty_reward=empty_reward).reward


# ---------------------------------------------------------------------------------------------
# Format penalty


def count_format_errors(turns: Iterable) -> int:
    """Turns whose tool call did not parse (`runtime.records.Turn.format_error`)."""
    return sum(1 for turn in turns if turn.format_error)


def apply_format_penalty(reward: float, num_format_errors: int, *, penalty: float = 0.1,
                         floor: float = -1.0) -> float:
    """``max(floor, reward - penalty * num_format_errors)``; a reward already below `floor` is kept.

    penalty: reward subtracted per malformed tool call (>= 0; 0 turns the penalty off).
    floor: the penalty never takes the reward below this.
    """
    if num_format_errors < 0:
        raise ValueError(f"num_format_errors: must be >= 0, got {num_format_errors}")
    if penalty < 0:
        raise ValueError(f"penalty: must be >= 0, got {penalty}")
    if num_format_errors == 0 or penalty == 0:
        return reward
    return max(min(floor, reward), reward - penalty * num_format_errors)
