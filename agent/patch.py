"""Unified diffs as data: parse a patch into per-file changes, and format it back.

    files = parse_patch(text)            # list[FilePatch]; PatchParseError if malformed
    files[0].new_path, files[0].hunks[0].added
    touched_files(text)                  # every path the patch touches, in order
    format_patch(files)                  # git-style text; parse_patch(format_patch(fs)) == fs

Pure functions, no I/O. Used by the SWE-RL similarity reward (`agent.rewards`), by task loading
(`agent.tasks` validates gold and test patches) and by grading.

What is accepted, following `git apply` and the `unidiff` package that SWE-RL uses:

- git diffs (``diff --git`` headers with mode, new/deleted file, rename/copy, similarity and index
  lines) and plain unified diffs (``---``/``+++`` pairs, timestamps after a tab ignored);
- paths: the first component is stripped when it is a diff prefix (``a/``, ``b/``, and git's
  mnemonic ``c/ i/ o/ w/ 1/ 2/``); ``/dev/null`` is the missing side of a new or deleted file
  (its path is None); C-quoted names (``"a/\\303\\274.txt"``) are unquoted;
- text before the first file and between files (commit messages, ``git format-patch`` stats) is
  ignored, as git does;
- binary changes (``Binary files ... differ``, ``GIT binary patch`` with its payload) are flagged
  with `FilePatch.is_binary` and carry no hunks (the payload is not kept);
- an empty line inside a hunk is an empty context line (git and unidiff accept it).

What is rejected with `PatchParseError` (the line number is 1-based), as `git apply` rejects it
("corrupt patch"): a hunk header that does not parse, a hunk before any file header, a hunk whose
body ends before the line counts of its header are met (a truncated or hand-edited patch), a line
inside a hunk that is not `` ``, ``+``, ``-`` or ``\\``, an unpaired ``---``/``+++`` in a git
header, a file entry with no change at all, and non-blank text that holds no file diff. Lines
after a hunk has all its counted lines are text between files, as for git.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["FilePatch", "Hunk", "PatchParseError", "format_patch", "parse_patch", "touched_files"]

NO_NEWLINE_MARKER = "\\ No newline at end of file"

_HUNK_HEADER = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@ ?(.*)$")
_DIFF_PREFIX = re.compile(r"^[abciow12]/")  # git's prefixes, as unidiff strips them
_MODE = re.compile(r"^[0-7]{6}$")
_C_ESCAPES = {"a": "\a", "b": "\b", "t": "\t", "n": "\n", "v": "\v", "f": "\f", "r": "\r",
              '"': '"', "\\": "\\"}


class PatchParseError(ValueError):
    """The text is not a well-formed patch; `line_no` (1-based) points at the offending line."""

    def __init__(self, message: str, line_no: int | None = None) -> None:
        self.line_no = line_no
        super().__init__(f"line {line_no}: {message}" if line_no is not None else message)


@dataclass(frozen=True)
class Hunk:
    """One ``@@ -old_start,old_len +new_start,new_len @@ section`` block.

    `lines` keeps each body line with its one-character prefix (`` ``, ``+``, ``-``, or ``\\``
    for the no-newline marker) and without its line ending.
    """

    old_start: int
    old_len: int
    new_start: int
    new_len: int
    lines: tuple[str, ...] = ()
    section: str = ""  # text after the closing "@@ " (often the enclosing function)

    @property
    def added(self) -> list[str]:
        return [line[1:] for line in self.lines if line.startswith("+")]

    @property
    def removed(self) -> list[str]:
        return [line[1:] for line in self.lines if line.startswith("-")]

    def header(self) -> str:
        return f"@@ -{self.old_start},{self.old_len} +{self.new_start},{self.new_len} @@" + (
            f" {self.section}" if self.section else "")


@dataclass(frozen=True)
class FilePatch:
    """The change to one file. `old_path` is None for a new file, `new_path` for a deleted one."""

    old_path: str | None
    new_path: str | None
    hunks: tuple[Hunk, ...] = ()
    is_binary: bool = False
    is_new: bool = False
    is_deleted: bool = False
    old_mode: str | None = None  # git file modes ("100644"), when the patch gives them
    new_mode: str | None = None

    @property
    def path(self) -> str:
        """The file's path after the patch (before it, for a deleted file)."""
        return self.new_path if self.new_path is not None else self.old_path  # type: ignore[return-value]

    @property
    def is_rename(self) -> bool:
        return self.old_path is not None and self.new_path is not None and self.old_path != self.new_path

    @property
    def added_lines(self) -> list[str]:
        return [line for hunk in self.hunks for line in hunk.added]

    @property
    def removed_lines(self) -> list[str]:
        return [line for hunk in self.hunks for line in hunk.removed]


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_patch(text: str) -> list[FilePatch]:
    """Parse a unified diff (git or plain). Blank text is an empty patch; see the module doc."""
    if not isinstance(text, str):
        raise TypeError(f"parse_patch: expected str, got {type(text).__name__}")
    return _Parser(text).parse()


def touched_files(text: str) -> list[str]:
    """Every path the patch touches, in order of first appearance, without duplicates.

    A rename touches both its old and its new path; a new file its new path; a deleted file its
    old path. Raises `PatchParseError` like `parse_patch`.
    """
    seen: dict[str, None] = {}
    for fp in parse_patch(text):
        for path in (fp.old_path, fp.new_path):
            if path is not None:
                seen.setdefault(path, None)
    return list(seen)


class _FileBuilder:
    """A file entry being parsed; `finish()` validates it and returns the frozen FilePatch."""

    def __init__(self, line_no: int, old: str | None, new: str | None, *, git: bool) -> None:
        self.line_no = line_no
        self.old, self.new, self.git = old, new, git
        self.hunks: list[Hunk] = []
        self.is_binary = self.is_new = self.is_deleted = self.renamed = False
        self.old_mode: str | None = None
        self.new_mode: str | None = None
        self.has_file_lines = not git  # plain diffs start at their ---/+++ pair
        self.in_header = git  # git extended header lines are still allowed

    def finish(self) -> FilePatch:
        if self.is_new:
            self.old = None
        if self.is_deleted:
            self.new = None
        if self.old is None and self.new is None:
            raise PatchParseError("file entry names no path (both sides are /dev/null)", self.line_no)
        mode_change = self.old_mode is not None and self.new_mode is not None and self.old_mode != self.new_mode
        if not (self.hunks or self.is_binary or self.is_new or self.is_deleted or self.renamed or mode_change):
            name = self.new or self.old
            raise PatchParseError(f"file header for {name!r} has no hunks and no other change", self.line_no)
        return FilePatch(old_path=self.old, new_path=self.new, hunks=tuple(self.hunks),
                         is_binary=self.is_binary, is_new=self.is_new, is_deleted=self.is_deleted,
                         old_mode=self.old_mode, new_mode=self.new_mode)


class _Parser:
    def __init__(self, text: str) -> None:
        # Split on "\n" only: str.splitlines() would also split inside lines on \f, \x1c, U+2028...
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        self.lines = lines
        self.blank = not text.strip()
        self.files: list[FilePatch] = []
        self.cur: _FileBuilder | None = None

    def _close(self) -> None:
        if self.cur is not None:
            self.files.append(self.cur.finish())
            self.cur = None

    def parse(self) -> list[FilePatch]:
        lines, i, n = self.lines, 0, len(self.lines)
        while i < n:
            line, line_no = lines[i], i + 1
            cur = self.cur
            if line.startswith("diff --git "):
                self._close()
                old, new = _git_header_paths(line[len("diff --git "):], line_no)
                self.cur = _FileBuilder(line_no, old, new, git=True)
                i += 1
            elif cur is not None and cur.in_header and self._extended_header(cur, line, line_no):
                i += 1
            elif line.startswith("--- ") and i + 1 < n and lines[i + 1].startswith("+++ "):
                i = self._file_lines(i)
            elif line.startswith(("--- ", "+++ ")) and cur is not None and cur.git and cur.in_header:
                raise PatchParseError("'---'/'+++' file headers must come as a pair", line_no)
            elif line.startswith("@@"):
                if cur is None or not cur.has_file_lines:
                    raise PatchParseError("hunk before any ---/+++ file header", line_no)
                cur.in_header = False
                hunk, i = _parse_hunk(lines, i)
                cur.hunks.append(hunk)
            elif line.startswith("Binary files ") and line.endswith(" differ"):
                self._binary_line(line, line_no)
                i += 1
            elif line == "GIT binary patch":
                if cur is None or not cur.git:
                    raise PatchParseError("'GIT binary patch' outside a git file header", line_no)
                cur.is_binary, cur.in_header = True, False
                i += 1
                while i < n and not lines[i].startswith("diff --git "):
                    i += 1  # base85 payload, skipped
            else:
                # Text between files (commit message, diffstat, signature, blank lines) is ignored,
                # as git does; so are lines after a hunk has all the lines its header counts.
                if cur is not None:
                    cur.in_header = False
                i += 1
        self._close()
        if not self.files and not self.blank:
            raise PatchParseError("no file diff found (expected 'diff --git' or '---'/'+++' headers)")
        return self.files

    def _extended_header(self, cur: _FileBuilder, line: str, line_no: int) -> bool:
        """Consume one git extended header line; False if `line` is not one."""
        key, _, value = line.partition(" ")
        if line.startswith("old mode ") or line.startswith("new mode "):
            mode = _mode(line.split(" ", 2)[2], line_no)
            if key == "old":
                cur.old_mode = mode
            else:
                cur.new_mode = mode
        elif line.startswith("new file mode "):
            cur.is_new, cur.new_mode = True, _mode(line[len("new file mode "):], line_no)
        elif line.startswith("deleted file mode "):
            cur.is_deleted, cur.old_mode = True, _mode(line[len("deleted file mode "):], line_no)
        elif line.startswith(("rename from ", "copy from ")):
            cur.old, cur.renamed = _unquote(line.split(" ", 2)[2], line_no), True
        elif line.startswith(("rename to ", "copy to ")):
            cur.new, cur.renamed = _unquote(line.split(" ", 2)[2], line_no), True
        elif line.startswith(("similarity index ", "dissimilarity index ")):
            pass
        elif key == "index" and value:
            # "index abc..def 100644": an unchanged mode applies to both sides.
            parts = value.split()
            if len(parts) == 2:
                mode = _mode(parts[1], line_no)
                cur.old_mode = cur.old_mode or mode
                cur.new_mode = cur.new_mode or mode
        else:
            return False
        return True

    def _file_lines(self, i: int) -> int:
        """A ``---`` line followed by ``+++``: the file's paths (and, outside git, a new file)."""
        lines, line_no = self.lines, i + 1
        old = _header_path(lines[i][4:], line_no)
        new = _header_path(lines[i + 1][4:], line_no + 1)
        cur = self.cur
        if cur is not None and cur.git and not (cur.has_file_lines or cur.hunks or cur.is_binary):
            # The ---/+++ pair of a git entry restates its paths unambiguously (spaces included).
            if old is None:
                cur.is_new = True
            elif not cur.renamed:
                cur.old = old
            if new is None:
                cur.is_deleted = True
            elif not cur.renamed:
                cur.new = new
            cur.has_file_lines, cur.in_header = True, False
        else:
            self._close()
            self.cur = _FileBuilder(line_no, old, new, git=False)
            self.cur.is_new, self.cur.is_deleted = old is None, new is None
        return i + 2

    def _binary_line(self, line: str, line_no: int) -> None:
        cur = self.cur
        if cur is not None and cur.git and not cur.hunks:
            cur.is_binary, cur.in_header = True, False
            return
        # A plain "Binary files X and Y differ" line (diff -r output) is a file entry of its own.
        body = line[len("Binary files "):-len(" differ")]
        old_raw, sep, new_raw = body.partition(" and ")
        if not sep:
            raise PatchParseError("malformed 'Binary files ... differ' line", line_no)
        self._close()
        self.cur = _FileBuilder(line_no, _header_path(old_raw, line_no), _header_path(new_raw, line_no), git=False)
        self.cur.is_binary = True
        self.cur.is_new, self.cur.is_deleted = self.cur.old is None, self.cur.new is None


def _parse_hunk(lines: list[str], i: int) -> tuple[Hunk, int]:
    """Parse the hunk whose header is lines[i]; returns it and the index after its last line."""
    header_no = i + 1
    m = _HUNK_HEADER.match(lines[i])
    if m is None:
        raise PatchParseError(f"malformed hunk header {lines[i][:80]!r}", header_no)
    old_start, new_start = int(m[1]), int(m[3])
    old_len = 1 if m[2] is None else int(m[2])
    new_len = 1 if m[4] is None else int(m[4])
    old_left, new_left = old_len, new_len
    body: list[str] = []
    i += 1
    while old_left > 0 or new_left > 0:
        if i >= len(lines):
            raise PatchParseError(
                f"hunk at line {header_no} ends early: {old_left} old and {new_left} new line(s) "
                "missing (truncated patch?)", i)
        line = lines[i]
        kind = line[:1]
        if kind in ("", " ") or line == "\r":
            # An empty line (or a bare CR in a CRLF patch) is an empty context line, as in git.
            old_left, new_left = old_left - 1, new_left - 1
            line = line if kind == " " else " " + line
        elif kind == "-":
            old_left -= 1
        elif kind == "+":
            new_left -= 1
        elif kind != "\\":
            raise PatchParseError(
                f"hunk at line {header_no} ends early: expected a ' ', '+', '-' or '\\' line, got "
                f"{line[:60]!r} with {old_left} old and {new_left} new line(s) still due", i + 1)
        if old_left < 0 or new_left < 0:
            raise PatchParseError(f"hunk at line {header_no} is longer than its header says", i + 1)
        body.append(line)
        i += 1
    if i < len(lines) and lines[i].startswith("\\"):  # "\ No newline at end of file" after the last line
        body.append(lines[i])
        i += 1
    return Hunk(old_start, old_len, new_start, new_len, tuple(body), m[5]), i


def _mode(text: str, line_no: int) -> str:
    text = text.strip()
    if not _MODE.match(text):
        raise PatchParseError(f"malformed file mode {text!r}", line_no)
    return text


def _unquote(text: str, line_no: int) -> str:
    """Undo git's C-style quoting of a path (octal escapes are UTF-8 bytes)."""
    if not (len(text) >= 2 and text[0] == '"' and text[-1] == '"'):
        return text
    out = bytearray()
    body, k = text[1:-1], 0
    while k < len(body):
        ch = body[k]
        if ch != "\\":
            out += ch.encode("utf-8")
            k += 1
            continue
        nxt = body[k + 1: k + 2]
        if nxt in _C_ESCAPES:
            out += _C_ESCAPES[nxt].encode()
            k += 2
        elif re.match(r"[0-7]{3}", body[k + 1: k + 4]):
            out.append(int(body[k + 1: k + 4], 8))
            k += 4
        else:
            raise PatchParseError(f"bad escape in quoted path {text!r}", line_no)
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        return out.decode("utf-8", "surrogateescape")


def _strip_prefix(path: str) -> str:
    return path[2:] if _DIFF_PREFIX.match(path) else path


def _header_path(text: str, line_no: int) -> str | None:
    """The path of a ``---``/``+++`` line (or a Binary line): timestamp dropped, prefix stripped."""
    if text.startswith('"'):
        end = _closing_quote(text)
        name = _unquote(text[: end + 1], line_no)
    else:
        name = text.split("\t", 1)[0]
    if name == "/dev/null":
        return None
    if not name:
        raise PatchParseError("file header names no path", line_no)
    return _strip_prefix(name)


def _closing_quote(text: str) -> int:
    k = 1
    while k < len(text):
        if text[k] == "\\":
            k += 2
            continue
        if text[k] == '"':
            return k
        k += 1
    return len(text) - 1


def _git_header_paths(rest: str, line_no: int) -> tuple[str, str]:
    """Paths of ``diff --git <old> <new>``; ambiguous with spaces, so later lines may override."""
    if rest.startswith('"'):
        end = _closing_quote(rest)
        old_raw, new_raw = rest[: end + 1], rest[end + 2:]
    else:
        # Unquoted names may hold spaces: prefer the split where both sides name the same file.
        old_raw = new_raw = ""
        for k in range(len(rest)):
            if rest[k] == " " and _strip_prefix(rest[:k]) == _strip_prefix(rest[k + 1:]):
                old_raw, new_raw = rest[:k], rest[k + 1:]
                break
        else:
            k = rest.find(" b/")
            if k < 0:
                k = rest.find(" ")
            if k < 0:
                raise PatchParseError(f"malformed 'diff --git' header {rest[:80]!r}", line_no)
            old_raw, new_raw = rest[:k], rest[k + 1:]
    if not old_raw or not new_raw:
        raise PatchParseError(f"malformed 'diff --git' header {rest[:80]!r}", line_no)
    return _strip_prefix(_unquote(old_raw, line_no)), _strip_prefix(_unquote(new_raw, line_no))


# ---------------------------------------------------------------------------------------------
# Formatting


def _quote(path: str) -> str:
    """Git's C-style quoting, applied only when the path needs it."""
    if not any(ch in path for ch in '"\\\t\n') and path.isprintable():
        return path
    out = []
    for ch in path:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\n":
            out.append("\\n")
        elif ch.isprintable() and ch.isascii():
            out.append(ch)
        else:
            out.extend(f"\\{b:03o}" for b in ch.encode("utf-8", "surrogateescape"))
    return '"' + "".join(out) + '"'


def _side(prefix: str, path: str | None) -> str:
    if path is None:
        return "/dev/null"
    quoted = _quote(prefix + path)
    # git ends a name holding spaces with a tab, so that the name's end is unambiguous.
    return quoted + "\t" if " " in path and not quoted.startswith('"') else quoted


def format_patch(files: list[FilePatch] | tuple[FilePatch, ...]) -> str:
    """Git-style text for `files`; `parse_patch` of it gives `files` back.

    Binary payloads are not kept by the parser, so a binary entry comes out as the
    ``Binary files ... differ`` marker (which `git apply` refuses without ``--binary`` data).
    """
    out: list[str] = []
    for fp in files:
        old = fp.old_path if fp.old_path is not None else fp.new_path
        new = fp.new_path if fp.new_path is not None else fp.old_path
        out.append(f"diff --git {_quote('a/' + old)} {_quote('b/' + new)}")  # type: ignore[operator]
        if fp.is_new:
            out.append(f"new file mode {fp.new_mode or '100644'}")
        elif fp.is_deleted:
            out.append(f"deleted file mode {fp.old_mode or '100644'}")
        elif fp.old_mode is not None and fp.new_mode is not None and fp.old_mode != fp.new_mode:
            out += [f"old mode {fp.old_mode}", f"new mode {fp.new_mode}"]
        if fp.is_rename:
            out += [f"rename from {_quote(fp.old_path)}", f"rename to {_quote(fp.new_path)}"]  # type: ignore[arg-type]
        if not (fp.is_new or fp.is_deleted) and fp.old_mode is not None and fp.old_mode == fp.new_mode:
            out.append(f"index 0000000..0000000 {fp.old_mode}")
        if fp.is_binary:
            out.append(f"Binary files {_side('a/', fp.old_path)} and {_side('b/', fp.new_path)} differ")
            continue
        if fp.hunks:
            out += [f"--- {_side('a/', fp.old_path)}", f"+++ {_side('b/', fp.new_path)}"]
            for hunk in fp.hunks:
                out.append(hunk.header())
                out.extend(hunk.lines)
    return "\n".join(out) + "\n" if out else ""
