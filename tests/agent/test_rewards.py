"""agent.rewards: execution reward, SWE-RL similarity against hand-computed values, format penalty."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import pytest

from agent.rewards import (
    apply_format_penalty,
    count_format_errors,
    execution_reward,
    file_level_changes,
    similarity_details,
    similarity_reward,
)
from runtime.records import Turn

FIXTURES = Path(__file__).parent / "fixtures"

ORACLE = """\
diff --git a/app.py b/app.py
index 83db48f..f73504f 100644
--- a/app.py
+++ b/app.py
@@ -1 +1 @@
-a = 1
+a = 2
"""


def _one_line_patch(path: str, new: str) -> str:
    return f"diff --git a/{path} b/{path}\n--- a/{path}\n+++ b/{path}\n@@ -1 +1 @@\n-a = 1\n+{new}\n"


def test_execution_reward_is_one_only_when_resolved():
    assert (execution_reward(True), execution_reward(False), execution_reward(None)) == (1.0, 0.0, 0.0)


def test_identical_patches_score_one():
    assert similarity_reward(ORACLE, ORACLE) == 1.0


def test_normalised_change_text_matches_the_reference_rendering():
    # unidiff renders "@@ -1 +1 @@" with explicit lengths; index lines and file headers are dropped.
    assert file_level_changes(ORACLE) == {"app.py": "@@ -1,1 +1,1 @@\n-a = 1\n+a = 2"}


def test_one_character_off_by_hand():
    # "@@ -1,1 +1,1 @@\n-a = 1\n+a = 2" has 29 characters; the prediction differs in the last one:
    # 28 matching characters, ratio = 2 * 28 / (29 + 29).
    assert similarity_reward(_one_line_patch("app.py", "a = 3"), ORACLE) == pytest.approx(56 / 58)


def test_unrelated_file_scores_zero_and_a_different_change_scores_low():
    assert similarity_reward(_one_line_patch("other.py", "a = 2"), ORACLE) == 0.0  # two paths, each 0
    different = ("--- a/app.py\n+++ b/app.py\n@@ -40,2 +40,3 @@ class Server:\n     def run(self):\n"
                 "-        self.loop()\n+        while True:\n+            self.poll(timeout_s=30)\n")
    score = similarity_reward(different, ORACLE)
    expected = difflib.SequenceMatcher(None, file_level_changes(different)["app.py"],
                                       file_level_changes(ORACLE)["app.py"], autojunk=False).ratio()
    assert score == pytest.approx(expected) and 0.0 < score < 0.4


def test_long_changes_are_compared_without_autojunk():
    # difflib's autojunk heuristic ignores characters frequent in sequences of 200+ items; the
    # reference turns it off, so long, repetitive changes still score by what they share.
    def new_file(lines):
        return f"--- /dev/null\n+++ b/data.py\n@@ -0,0 +1,{len(lines)} @@\n" + "".join(f"+{l}\n" for l in lines)

    oracle = new_file([f"value_{i} = {i} * scale" for i in range(40)])
    predicted = new_file([f"value_{i} = {i} * factor" for i in range(40)])
    a, b = file_level_changes(predicted)["data.py"], file_level_changes(oracle)["data.py"]
    exact = difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()
    assert similarity_reward(predicted, oracle) == pytest.approx(exact)
    assert exact > difflib.SequenceMatcher(None, a, b).ratio() + 0.2  # autojunk would change the reward


def test_mean_over_the_union_of_files():
    two_files = ORACLE + _one_line_patch("lib.py", "b = 1")
    assert similarity_reward(ORACLE, two_files) == 0.5  # lib.py missed
    assert similarity_reward(two_files, ORACLE) == 0.5  # lib.py touched for nothing
    details = similarity_details(two_files, two_files)
    assert details.reward == 1.0 and [f.path for f in details.files] == ["app.py", "lib.py"]


def test_rename_is_keyed_by_the_old_path_with_a_rename_header():
    renamed = ("diff --git a/app.py b/main.py\nsimilarity index 90%\nrename from app.py\nrename to main.py\n"
               "--- a/app.py\n+++ b/main.py\n@@ -1 +1 @@\n-a = 1\n+a = 2\n")
    assert file_level_changes(renamed) == {"app.py": "rename from app.py to main.py\n@@ -1,1 +1,1 @@\n-a = 1\n+a = 2"}
    expected = difflib.SequenceMatcher(None, "rename from app.py to main.py\n@@ -1,1 +1,1 @@\n-a = 1\n+a = 2",
                                       "@@ -1,1 +1,1 @@\n-a = 1\n+a = 2", autojunk=False).ratio()
    assert similarity_reward(renamed, ORACLE) == pytest.approx(expected)


@pytest.mark.parametrize("predicted", [
    "I fixed it!",
    "--- a/app.py\n+++ b/app.py\n@@ -1,2 +1,2 @@\n-a = 1\n+a = 2\n",  # truncated hunk
    "--- a/app.py\n+++ b/app.py\n@@ -1 +1 @@\n-a = 1\n>a = 2\n",
])
def test_malformed_prediction_scores_minus_one(predicted):
    result = similarity_details(predicted, ORACLE)
    assert result.reward == -1.0 and result.error.startswith("malformed patch")


def test_empty_prediction_follows_the_papers_format_rule_unless_configured():
    assert similarity_reward("", ORACLE) == -1.0  # no edit: a format error in the paper's setting
    assert similarity_reward("  \n", ORACLE, empty_reward=0.0) == 0.0  # the reference's unidiff reading


def test_binary_only_prediction_is_well_formed_but_matches_nothing():
    binary = "diff --git a/logo.png b/logo.png\nindex 1111111..2222222 100644\nBinary files a/logo.png and b/logo.png differ\n"
    assert file_level_changes(binary) == {} and similarity_reward(binary, ORACLE) == 0.0


def test_bad_oracle_is_a_data_error_not_a_reward():
    with pytest.raises(ValueError, match="oracle_patch"):
        similarity_reward(ORACLE, "")
    with pytest.raises(ValueError, match="oracle_patch: not a valid patch"):
        similarity_reward(ORACLE, "--- a/x\n+++ b/x\n@@ -1,2 +1,2 @@\n-a\n")


def _reference_changes(patch_text: str) -> dict[str, str]:
    """facebookresearch/swe-rl src/swerl/core/reward.py `get_filelevel_diff`, through unidiff."""
    from unidiff import PatchSet

    result = {}
    for patched in PatchSet(patch_text):
        if patched.is_binary_file:
            continue
        header, path = "", patched.path
        if patched.is_rename:
            source, target = patched.source_file, patched.target_file
            source = source[2:] if source.startswith("a/") else source
            target = target[2:] if target.startswith("b/") else target
            header, path = f"rename from {source} to {target}", source
        result[path] = (header + "\n" + "\n".join(str(h).strip() for h in patched)).strip()
    return result


def test_same_changes_as_the_reference_implementation_on_dataset_patches():
    pytest.importorskip("unidiff")
    patches = [ORACLE]
    for name in ("swebench", "swegym", "swerebench", "swerebench_v1", "patch_pairs"):
        for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines():
            row = json.loads(line)
            patches += [row["patch"], row.get("test_patch", "")]
    patches = [p for p in patches if p]
    assert len(patches) > 15
    for patch in patches:
        assert file_level_changes(patch) == _reference_changes(patch)


# --- format penalty --------------------------------------------------------------------------------


def test_format_penalty_subtracts_per_error_down_to_the_floor():
    assert apply_format_penalty(1.0, 0) == 1.0
    assert apply_format_penalty(1.0, 2, penalty=0.1) == pytest.approx(0.8)
    assert apply_format_penalty(0.0, 50, penalty=0.1, floor=-0.5) == -0.5
    assert apply_format_penalty(-1.0, 3, penalty=0.1, floor=-0.5) == -1.0  # already below: unchanged
    assert apply_format_penalty(0.7, 4, penalty=0.0) == 0.7
    with pytest.raises(ValueError, match="num_format_errors"):
        apply_format_penalty(1.0, -1)
    with pytest.raises(ValueError, match="penalty"):
        apply_format_penalty(1.0, 1, penalty=-0.1)


def test_count_format_errors_over_turns():
    turns = [Turn(action_ids=[1], action_logprobs=[-0.1], format_error=flag) for flag in (True, False, True)]
    assert count_format_errors(turns) == 2
