"""agent.patch: unified diffs parsed into files and hunks, malformed ones rejected, round trips."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.patch import FilePatch, Hunk, PatchParseError, format_patch, parse_patch, touched_files

GIT_DIFF = """\
diff --git a/pkg/calc.py b/pkg/calc.py
index 3b18e51..a4c2d2b 100644
--- a/pkg/calc.py
+++ b/pkg/calc.py
@@ -1,3 +1,3 @@ import os
 def add(a, b):
-    return a - b
+    return a + b
 
@@ -10 +10,2 @@ def mul(a, b):
-    pass
+    x = 1
+    return x
\\ No newline at end of file
diff --git a/docs/new.md b/docs/new.md
new file mode 100644
index 0000000..e69de29
--- /dev/null
+++ b/docs/new.md
@@ -0,0 +1,2 @@
+# New
+text
diff --git a/old.txt b/old.txt
deleted file mode 100755
index e69de29..0000000
--- a/old.txt
+++ /dev/null
@@ -1 +0,0 @@
-gone
diff --git a/src/a.py b/src/b.py
similarity index 90%
rename from src/a.py
rename to src/b.py
index 1111111..2222222 100644
--- a/src/a.py
+++ b/src/b.py
@@ -1,2 +1,2 @@
-x = 1
+x = 2
 y = 3
diff --git a/img.png b/img.png
index 87ae6b6..22f6b3b 100644
GIT binary patch
literal 8
PcmYew%wtF_sx$%s42c4`

literal 7
OcmYew%wtF_sssQD(E^45

diff --git a/run.sh b/run.sh
old mode 100644
new mode 100755
"""


def test_git_diff_files_hunks_and_flags():
    files = parse_patch(GIT_DIFF)
    assert [f.path for f in files] == ["pkg/calc.py", "docs/new.md", "old.txt", "src/b.py", "img.png", "run.sh"]
    calc, new, old, renamed, image, script = files
    assert calc.old_path == calc.new_path == "pkg/calc.py" and not (calc.is_new or calc.is_deleted or calc.is_rename)
    assert calc.hunks[0] == Hunk(1, 3, 1, 3, (" def add(a, b):", "-    return a - b", "+    return a + b", " "), "import os")
    assert calc.hunks[1].old_len == 1 and calc.hunks[1].new_len == 2  # "-10" means one line
    assert calc.hunks[1].lines[-1] == "\\ No newline at end of file"
    assert calc.removed_lines == ["    return a - b", "    pass"]
    assert calc.added_lines == ["    return a + b", "    x = 1", "    return x"]
    assert (new.old_path, new.new_path, new.is_new, new.new_mode) == (None, "docs/new.md", True, "100644")
    assert (old.old_path, old.new_path, old.is_deleted, old.old_mode) == ("old.txt", None, True, "100755")
    assert renamed.is_rename and (renamed.old_path, renamed.new_path) == ("src/a.py", "src/b.py")
    assert image.is_binary and image.hunks == ()
    assert (script.old_mode, script.new_mode, script.hunks) == ("100644", "100755", ())


def test_touched_files_lists_both_sides_of_a_rename_once():
    assert touched_files(GIT_DIFF) == ["pkg/calc.py", "docs/new.md", "old.txt", "src/a.py", "src/b.py",
                                       "img.png", "run.sh"]
    assert touched_files(GIT_DIFF + GIT_DIFF.split("diff --git a/docs")[0]) == touched_files(GIT_DIFF)


def test_plain_unified_diff_with_timestamps_and_prefixless_paths():
    text = ("--- setup.py\t2024-01-01 10:00:00.000000000 +0000\n"
            "+++ setup.py\t2024-01-02 10:00:00.000000000 +0000\n"
            "@@ -1 +1 @@\n-a\n+b\n"
            "--- /dev/null\n+++ b/new.py\n@@ -0,0 +1 @@\n+x\n")
    first, second = parse_patch(text)
    assert (first.old_path, first.new_path, first.hunks[0].lines) == ("setup.py", "setup.py", ("-a", "+b"))
    assert second.is_new and second.new_path == "new.py"


def test_quoted_names_and_names_with_spaces():
    text = ('diff --git "a/\\303\\274n\\303\\257.txt" "b/\\303\\274n\\303\\257.txt"\n'
            '--- "a/\\303\\274n\\303\\257.txt"\n+++ "b/\\303\\274n\\303\\257.txt"\n@@ -1 +1 @@\n-q\n+r\n'
            "diff --git a/my file.txt b/my file.txt\n--- a/my file.txt\t\n+++ b/my file.txt\t\n@@ -1 +1 @@\n-x\n+y\n"
            "diff --git a/two words b/two words\nold mode 100644\nnew mode 100755\n")
    assert [f.path for f in parse_patch(text)] == ["ünï.txt", "my file.txt", "two words"]


def test_text_around_diffs_is_ignored_like_git_format_patch():
    text = ("From 1234 Mon Sep 17 00:00:00 2001\nSubject: [PATCH] fix\n\n- a bullet\n---\n pkg/x.py | 2 +-\n\n"
            "diff --git a/pkg/x.py b/pkg/x.py\n--- a/pkg/x.py\n+++ b/pkg/x.py\n@@ -1 +1 @@\n-a\n+b\n"
            "-- \n2.39.2\n\n")
    (fp,) = parse_patch(text)
    assert fp.hunks[0].lines == ("-a", "+b")


def test_blank_text_is_an_empty_patch():
    assert parse_patch("") == [] and parse_patch("\n  \n") == [] and touched_files("") == []


def test_crlf_patch_keeps_carriage_returns_in_lines():
    text = "--- a/w.txt\n+++ b/w.txt\n@@ -1,2 +1,2 @@\r\n-a\r\n+b\r\n\r\n"
    (fp,) = parse_patch(text)
    assert fp.hunks[0].lines == ("-a\r", "+b\r", " \r")


@pytest.mark.parametrize("text, message", [
    ("this is not a patch\n", "no file diff found"),
    ("--- a/x\n+++ b/x\n@@ -1,2 +1,2 @@\n-a\n+b\n", "ends early"),  # truncated: one old line missing
    ("--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n*b\n", "expected a ' ', '+', '-'"),
    ("--- a/x\n+++ b/x\n@@ -1,1 +1,1 @\n-a\n+b\n", "malformed hunk header"),
    ("--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n-b\n", "longer than its header"),
    ("@@ -1 +1 @@\n-a\n+b\n", "hunk before any"),
    ("diff --git a/x b/x\n@@ -1 +1 @@\n-a\n+b\n", "hunk before any"),
    ("diff --git a/x b/x\n--- a/x\n@@ -1 +1 @@\n-a\n+b\n", "must come as a pair"),
    ("diff --git a/x b/x\nindex 1111111..2222222 100644\n", "no hunks and no other change"),
    ("--- a/x\n+++ b/x\n", "no hunks and no other change"),
    ("diff --git a/x b/x\nnew file mode 10064\n", "malformed file mode"),
    ("--- /dev/null\n+++ /dev/null\n@@ -0,0 +1 @@\n+a\n", "names no path"),
])
def test_malformed_patches_are_rejected_with_the_reason(text, message):
    with pytest.raises(PatchParseError, match=re.escape(message)):
        parse_patch(text)


def test_error_carries_the_line_number():
    with pytest.raises(PatchParseError) as info:
        parse_patch("--- a/x\n+++ b/x\n@@ -1,3 +1,3 @@\n a\n-b\n+c\n!d\n")
    assert info.value.line_no == 7 and str(info.value).startswith("line 7: ")


def test_parse_patch_refuses_non_text():
    with pytest.raises(TypeError):
        parse_patch(b"--- a/x\n")  # type: ignore[arg-type]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize("text", [
    GIT_DIFF,
    "--- a/x\n+++ b/x\n@@ -1,2 +1,2 @@\n-a\n+b\n",  # truncated
    "--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n*b\n",
    "--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n+extra after the counted lines\n",
    "diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n-- \n2.39\n",
])
def test_accepts_and_rejects_what_git_apply_does(text, tmp_path):
    """git apply --stat parses a patch without applying it: we agree on what is well formed."""
    git = subprocess.run(["git", "apply", "--stat"], input=text.encode(), cwd=tmp_path, capture_output=True)
    try:
        parse_patch(text)
        ours = True
    except PatchParseError:
        ours = False
    assert ours == (git.returncode == 0), git.stderr.decode()


# --- round trip ------------------------------------------------------------------------------------

_path = st.builds(
    "/".join,
    st.lists(st.text(alphabet=st.sampled_from("abcxyz019_-.ü \"\\\t"), min_size=1, max_size=6)
             .filter(lambda s: s.strip() == s and s not in (".", "..")), min_size=1, max_size=3),
).filter(lambda p: p != "dev/null")
_line_text = st.text(alphabet=st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=12)


@st.composite
def _hunks(draw):
    hunks = []
    for _ in range(draw(st.integers(1, 3))):
        body = draw(st.lists(st.tuples(st.sampled_from(" -+"), _line_text), max_size=6))
        lines = [kind + text for kind, text in body]
        if lines and draw(st.booleans()):
            lines.append("\\ No newline at end of file")
        old_len = sum(1 for kind, _ in body if kind in " -")
        new_len = sum(1 for kind, _ in body if kind in " +")
        section = draw(st.text(alphabet=st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)),
                               max_size=10))
        hunks.append(Hunk(draw(st.integers(0, 500)), old_len, draw(st.integers(0, 500)), new_len,
                          tuple(lines), section))
    return tuple(hunks)


_MODES = st.sampled_from(["100644", "100755"])


@st.composite
def _file_patches(draw):
    kind = draw(st.sampled_from(["modify", "new", "delete", "rename", "binary", "mode"]))
    path = draw(_path)
    if kind == "new":
        hunks = draw(st.one_of(st.just(()), _hunks()))
        return FilePatch(None, path, hunks, is_new=True, new_mode=draw(_MODES))
    if kind == "delete":
        hunks = draw(st.one_of(st.just(()), _hunks()))
        return FilePatch(path, None, hunks, is_deleted=True, old_mode=draw(_MODES))
    if kind == "rename":
        new_path = draw(_path.filter(lambda p: p != path))
        return FilePatch(path, new_path, draw(st.one_of(st.just(()), _hunks())))
    if kind == "binary":
        return FilePatch(path, path, (), is_binary=True, old_mode="100644", new_mode="100644")
    if kind == "mode":
        return FilePatch(path, path, draw(st.one_of(st.just(()), _hunks())), old_mode="100644", new_mode="100755")
    mode = draw(st.one_of(st.none(), _MODES))
    return FilePatch(path, path, draw(_hunks()), old_mode=mode, new_mode=mode)


@settings(max_examples=150, deadline=None)
@given(st.lists(_file_patches(), max_size=4))
def test_parse_of_format_is_the_identity(files):
    assert parse_patch(format_patch(files)) == files


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_formatted_patch_applies_with_git(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    files = [FilePatch("calc.py", "calc.py", (Hunk(1, 2, 1, 2, (" def add(a, b):", "-    return a - b",
                                                                "+    return a + b")),)),
             FilePatch(None, "my notes.txt", (Hunk(0, 0, 1, 1, ("+hello",)),), is_new=True)]
    subprocess.run(["git", "apply", "-"], input=format_patch(files).encode(), cwd=tmp_path, check=True)
    assert (tmp_path / "calc.py").read_text() == "def add(a, b):\n    return a + b\n"
    assert (tmp_path / "my notes.txt").read_text() == "hello\n"
