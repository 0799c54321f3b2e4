"""The tiny policy of the embedded default run: its tokenizer, its pre-training data, its SFT, its check.

RL only sharpens what a policy already does sometimes, so the shipped checkpoint is pre-trained on a
*mixture* of scaffold episodes on TRAIN toy templates: at the decisive step (the edit) the data shows
the correct fix only part of the time and plausible wrong moves otherwise. A group of G rollouts of
the pre-trained model then holds both successes and failures, and RFT/DAPO have something to push.

An episode of the data (three or four model turns, short observations, for CPU sampling speed)::

    locate   grep -rn -A8 "def <function>("     (level 3 issues: the entry function first, then its helper)
    edit     str_replace(path, old=<bug lines>, new=<fixed lines>)      <- the mixture is here
    submit

The mixture at the edit (`MIX`): the correct fix; another mutation of the same line (`<` -> `>`
where `<=` was right); a mutation of another line of the function; no edit at all; and, before it,
a grep of the wrong function. Besides the 32 real (template, bug) pairs of the train templates, the
data has *synthetic* bugs: single-line mutations (comparison, arithmetic, swapped arguments, returned
variable, default value, format spec) of the train templates' functions, whose fix is the inverse
mutation. They teach "copy the line out of the grep output and flip what looks wrong" over many
lines, which is what transfers to the held-out templates; the 32 real sites alone would be memorised.

Episodes are recorded token-exact through the scaffold (`agent.scaffold.run_episode` with real tools
on a `LocalWorkspace`): the prompt rendered by the chat template, each turn's action ids as the
sampler would return them (text + ``<|im_end|>``), each observation's ids as the scaffold appends
them. The SFT loss is on action tokens only, as RFT's.

Parts: tokenizer (`train_tokenizer`), mutations (`line_mutations`), episode plans (`plan_episode`),
data (`generate_data`), SFT (`pretrain`), and the check with real sandboxes and the embedded policy
server (`evaluate_policy`). `scripts/make_tiny_policy.py` drives them.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import random
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "MIX", "WORDS", "Mix", "SFTConfig", "action_accuracy", "copy_samples", "induction_warmup", "rename_site", "Sample", "TinyEpisode", "evaluate_policy", "generate_data", "line_mutations",
    "plan_episode", "pretrain", "summarize", "synthetic_sites", "train_tokenizer",
]

GREP_CONTEXT_LINES = 8  # -A of the locate step: every toy bug line is within 8 lines of its `def`


# ---------------------------------------------------------------------------------------------
# Tokenizer.


def train_tokenizer(corpus: Sequence[str], vocab_size: int = 2048, *, split_words: bool = True) -> Any:
    """A byte-level BPE trained on `corpus`, wrapped as a `PreTrainedTokenizerFast` with ChatML.

    Byte-level: every string round-trips, held-out code included. Deterministic for a corpus.
    `split_words=False` lets merges cross words (`agent.fakes.chatml_bpe`): a code line of the corpus
    becomes 2-7 tokens instead of 10-15, so episodes are about 4x shorter to train on and to sample.
    """
    from agent.fakes import chatml_bpe

    return chatml_bpe(corpus, vocab_size, split_words=split_words)


# ---------------------------------------------------------------------------------------------
# Mutations of one line of code (pure). Each returns variants that differ from `line` by one edit.

_CMP = [  # (pattern, replacement): one comparison operator turned into a near miss
    (r"(?<![<>=!-])<(?![<=])", "<="), (r"<=", "<"), (r"(?<![<>=!-])>(?![>=])", ">="), (r">=", ">"),
    (r"==", "!="), (r"!=", "=="),
]
_ARITH = [(r" \+ ", " - "), (r" - ", " + "), (r" \* ", " + "), (r" // ", " / "), (r"(?<!/) / (?!/)", " // ")]
_RANGE = [(r"range\((\w+)\)", r"range(\1 - 1)"), (r"range\(1, (\w+)\)", r"range(\1)"),
          (r"range\((\w+) - 1\)", r"range(\1)"), (r"range\((\w+)\)", r"range(1, \1)")]
_FORMAT = [(r":,", ":"), (r"(:[<>^]?)0(\d+)d", r"\1\2d"), (r"(\.\{?\w*\}?)f\}", r"\1g}"), (r"(\.\{?\w*\}?)g\}", r"\1f}"),
           (r":>", ":<"), (r":<", ":>"), (r":(\d+)d\}", r":0\1d}")]
_DEFAULT = [(r"=None\b", "=0"), (r"=0\.0\b", "=1.0"), (r"=1\.0\b", "=0.0"), (r"=0\b(?!\.)", "=1"), (r"=1\b(?!\.)", "=0"),
            (r"=True\b", "=False"), (r"=False\b", "=True"), (r'="(\w+)"', r'=""'), (r"=(\d+)\b(?!\.)", r"=\g<1>0")]
_ARG = r"[\w.\[\]]+(?:\([\w., ]*\))?"  # a name, attribute, item or call with simple arguments
_CALL_ARGS = re.compile(rf"\b(\w+)\(({_ARG}), ({_ARG})([,)])")
# Near misses that are never the inverse of a toy bug kind: the wrong edits of the mixture.
_WRONG = [(r"<=", ">="), (r"(?<![<>=!-])<(?![<=])", ">"), (r"(?<![<>=!-])>(?![>=])", "<"), (r">=", "<="),
          (r"==", ">="), (r" \+ ", " * "), (r" - ", " * "), (r" \* ", " - "), (r"(?<!/) / (?!/)", " * "),
          (r"range\((\w+)\)", r"range(\1 + 1)"), (r"^(\s*return ).+$", r"\1None"), (r":[^{}]*\}", "}"),
          (r"=(\w+)\)", r"=None)"), (r"\braise (\w+)\(", r"raise TypeError(")]
_RETURN_NAME = re.compile(r"^(\s*return )(\w+)\s*$")
_IDENT = re.compile(r"\b[a-z_][a-z0-9_]*\b")
_KEYWORDS = frozenset("return if else for in not and or is None True False def class lambda pass raise from "
                      "import with as try except while yield self len range".split())


def _sub_each(line: str, pattern: str, repl: str) -> list[str]:
    """`line` with one match of `pattern` replaced, for each match."""
    out = []
    for m in re.finditer(pattern, line):
        out.append(line[:m.start()] + m.expand(repl) + line[m.end():])
    return out


def _code_part(line: str) -> bool:
    s = line.strip()
    return bool(s) and not s.startswith(("#", '"""', "'''", "@")) and not (s.startswith('"') and s.endswith('"'))


def line_mutations(line: str, names: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(kind, mutated line) for every single-edit mutation of `line` this module knows, no duplicates.

    `names`: identifiers of the enclosing function (parameters, assigned names) that a ``return x``
    may be changed to. Kinds follow `agent.toy.BUG_KINDS` where one fits.
    """
    if not _code_part(line):
        return []
    out: list[tuple[str, str]] = []
    stripped = line.strip()
    if stripped.startswith("def "):
        for pat, repl in _DEFAULT:
            out += [("wrong_default", v) for v in _sub_each(line, pat, repl)]
    else:
        in_string = '"' in line or "'" in line
        for pat, repl in _CMP:
            out += [("off_by_one", v) for v in _sub_each(line, pat, repl) if not in_string or "f\"" not in line]
        for pat, repl in _ARITH:
            out += [("wrong_operator", v) for v in _sub_each(line, pat, repl)]
        for pat, repl in _RANGE:
            out += [("off_by_one", v) for v in _sub_each(line, pat, repl)]
        if "f\"" in line or "f'" in line:
            for pat, repl in _FORMAT:
                out += [("string_formatting", v) for v in _sub_each(line, pat, repl)]
        for m in _CALL_ARGS.finditer(line):
            if m.group(2) != m.group(3):
                out.append(("swapped_arguments",
                            line[:m.start(2)] + m.group(3) + ", " + m.group(2) + line[m.end(3):]))
        m = _RETURN_NAME.match(line)
        if m:
            out += [("wrong_return", m.group(1) + n) for n in names if n != m.group(2)]
    seen, unique = {line}, []
    for kind, variant in out:
        if variant not in seen:
            seen.add(variant)
            unique.append((kind, variant))
    return unique


def wrong_mutations(line: str, names: Sequence[str] = ()) -> list[str]:
    """`line_mutations` plus near misses that no toy bug's fix is: candidates of a wrong edit."""
    out = [v for _, v in line_mutations(line, names)]
    if _code_part(line):
        for pat, repl in _WRONG:
            out += _sub_each(line, pat, repl)
    return [v for v in dict.fromkeys(out) if v != line]


def _function_names(source: str, fn_line: int) -> list[str]:
    """Parameters and assigned names of the function whose `def` is at 0-based line `fn_line`."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.lineno - 1 == fn_line:
            names = [a.arg for a in node.args.args if a.arg != "self"]
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                    names.append(sub.id)
            return list(dict.fromkeys(names))
    return []


# ---------------------------------------------------------------------------------------------
# Sites and episode plans (pure).


@dataclass(frozen=True)
class SiteFiles:
    """One repository state with one bug, as the data generator needs it."""

    files: dict[str, str]  # repository path -> text (buggy)
    buggy_file: str  # e.g. "planegeo/shapes.py"
    function: str  # short name of the buggy function, e.g. "edges"
    entry_function: str  # short name of the public function of a level-3 issue
    old: str  # lines of the buggy file that the correct edit replaces (whole lines, no final newline)
    new: str  # what they become
    issue: str  # the problem statement
    level: int
    task_id: str


def _call(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>{v}</parameter>\n" for k, v in params.items())
    return f"<function={name}>\n{body}</function>"


def _grep(function: str) -> str:
    return f'grep -rn -A{GREP_CONTEXT_LINES} "def {function}("'


def line_edit(buggy: str, fixed: str) -> tuple[str, str]:
    """(old, new): the smallest whole-line str_replace that turns `buggy` into `fixed`, `old` unique."""
    import difflib

    a, b = buggy.split("\n"), fixed.split("\n")
    ops = [op for op in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes() if op[0] != "equal"]
    if not ops:
        raise ValueError("line_edit: the texts are equal")
    i1, i2, j1, j2 = ops[0][1], ops[-1][2], ops[0][3], ops[-1][4]
    lo, hi = i1, i2
    while True:
        if hi == lo:  # a pure insertion: anchor on the next line
            hi += 1
        old = "\n".join(a[lo:hi])
        if old.strip() and buggy.count(old) == 1:
            break
        lo = max(0, lo - 1) if lo > 0 else lo
        hi = min(len(a), hi + 1)
    new = "\n".join(a[lo:i1] + b[j1:j2] + a[i2:hi])
    return old, new


@dataclass(frozen=True)
class Mix:
    """Probabilities of the moves of the pre-training data (the rest of the edit step: the correct fix)."""

    wrong_locate: float = 0.10  # grep another function of the module, then edit in it (always wrong)
    same_line_wrong: float = 0.25  # at the edit: another mutation of the bug line
    other_line_wrong: float = 0.15  # at the edit: a mutation of another line of the function
    no_edit: float = 0.15  # submit without editing

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"Mix.{f.name} must be in [0, 1], got {v}")
        if self.same_line_wrong + self.other_line_wrong + self.no_edit >= 1.0:
            raise ValueError("Mix: same_line_wrong + other_line_wrong + no_edit must be < 1 (room for the fix)")


MIX = Mix()


def _window(text: str, function: str) -> list[tuple[int, str]]:
    """(0-based line, text) of the lines a `grep -A8 "def function("` shows in `text`."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if f"def {function}(" in line:
            return list(enumerate(lines))[i:i + GREP_CONTEXT_LINES + 1]
    return []


def _mutated_edit(text: str, candidates: list[tuple[int, str]], names: Sequence[str],
                  rng: random.Random) -> tuple[str, str] | None:
    """(old, new): one mutation of one of `candidates` lines that is unique in `text`, or None."""
    options = []
    for _, line in candidates:
        if text.count(line) != 1:
            continue
        options += [(line, v) for v in wrong_mutations(line, names)]
    return rng.choice(options) if options else None


def plan_episode(site: SiteFiles, rng: random.Random, mix: Mix = MIX) -> tuple[list[str], str]:
    """The model turns of one pre-training episode of `site`, and the move it makes at the edit
    ("fix", "same_line", "other_line", "no_edit", "wrong_locate")."""
    text = site.files[site.buggy_file]
    turns = []
    if site.level == 3:
        turns.append(f"Find `{site.entry_function}`.\n" + _call("bash", command=_grep(site.entry_function)))
    move = "fix"
    target = site.function
    if rng.random() < mix.wrong_locate:
        others = [m.group(1) for m in re.finditer(r"^\s*def (\w+)\(", text, re.M)
                  if m.group(1) not in (site.function, "__init__")]
        if others:
            target, move = rng.choice(others), "wrong_locate"
    verb = "It calls" if site.level == 3 else "Find"
    turns.append(f"{verb} `{target}`.\n" + _call("bash", command=_grep(target)))
    window = _window(text, target)
    fn_line = window[0][0] if window else 0
    names = _function_names(text, fn_line) if window else []
    edit: tuple[str, str] | None = None
    bug_lines = set(site.old.split("\n"))
    if move == "fix":
        u = rng.random()
        if u < mix.no_edit:
            move = "no_edit"
        elif u < mix.no_edit + mix.same_line_wrong:
            # Another edit of the bug lines: the whole-line `old` of the correct fix, mutated in place.
            options = [site.old.replace(line, v, 1) for line in dict.fromkeys(site.old.split("\n"))
                       for v in wrong_mutations(line, names)]
            options = [o for o in dict.fromkeys(options) if o not in (site.old, site.new)]
            if options:
                edit, move = (site.old, rng.choice(options)), "same_line"
        elif u < mix.no_edit + mix.same_line_wrong + mix.other_line_wrong:
            edit = _mutated_edit(text, [w for w in window if w[1] not in bug_lines], names, rng)
            move = "other_line" if edit is not None else "fix"
        if move in ("same_line", "other_line") and edit is None:
            move = "fix"
        if move == "fix":
            edit = (site.old, site.new)
    elif move == "wrong_locate":  # the window of another function may reach the bug: leave those lines
        edit = _mutated_edit(text, [w for w in window if w[1] not in bug_lines], names, rng)
    if edit is not None:
        turns.append("Fix it.\n" + _call("str_replace", path=site.buggy_file, old=edit[0], new=edit[1]))
    turns.append("Done.\n" + _call("submit"))
    return turns, move


# ---------------------------------------------------------------------------------------------
# Sites of the train templates: the real ones (from `agent.toy`) and synthetic mutations.


def _short(function: str) -> str:
    return function.rsplit(".", 1)[-1]


def real_sites(tasks: Sequence[Any]) -> list[SiteFiles]:
    """One `SiteFiles` per generated toy task (its repository read from disk)."""
    out = []
    for task in tasks:
        meta = task.metadata
        repo = Path(task.repo)
        files = {str(p.relative_to(repo)): p.read_text() for p in repo.rglob("*")
                 if p.is_file() and ".git" not in p.relative_to(repo).parts}
        buggy_file = meta["buggy_file"]
        fixed = _apply_gold(files[buggy_file], task.gold_patch)
        old, new = line_edit(files[buggy_file], fixed)
        out.append(SiteFiles(files, buggy_file, _short(meta["buggy_function"]), _short(meta["entry_function"]),
                             old, new, task.problem_statement, int(meta["difficulty"]), task.id))
    return out


def _apply_gold(text: str, gold_patch: str) -> str:
    from agent.patch import parse_patch

    lines = text.split("\n")
    for fp in parse_patch(gold_patch):
        for hunk in reversed(fp.hunks):
            old = [ln[1:] for ln in hunk.lines if ln[:1] in (" ", "-")]
            new = [ln[1:] for ln in hunk.lines if ln[:1] in (" ", "+")]
            start = hunk.old_start - 1 if old else hunk.old_start
            if lines[start:start + len(old)] != old:
                raise ValueError("gold patch does not apply to the buggy file")
            lines[start:start + len(old)] = new
    return "\n".join(lines)


_SYN_TITLES = ("`{f}()` returns the wrong result", "Wrong result from {f}()", "{f}() is broken",
               "Bug in {f}()", "{f}() gives a wrong answer for simple input")
_SYN_STORIES = ("I called `{f}()` with ordinary input and the result does not match the docstring.",
                "After upgrading, `{f}()` started to give results that look wrong to me.",
                "Our tests caught a wrong value coming out of `{f}()`.")


def synthetic_sites(template_names: Sequence[str], rng: random.Random, *, per_line: int = 2) -> list[Any]:
    """`BugSite`s made by mutating one line of a function of the named templates (levels 1 and 2 only).

    Each returned item is (template, BugSite); at most `per_line` mutations per line, chosen by `rng`.
    """
    from agent.toy import TEMPLATES, BugSite

    out = []
    for name in template_names:
        template = TEMPLATES[name]
        modules = sorted(template.modules)
        for module in modules:
            source = template.modules[module]
            lines = source.split("\n")
            other_module = next(m for m in modules if m != module)
            for i, line in enumerate(lines):
                m = re.match(r"^\s*def (\w+)\(", line)
                if not m or m.group(1).startswith("_"):
                    continue
                fn = m.group(1)
                names = _function_names(source, i)
                for j in range(i, min(i + GREP_CONTEXT_LINES + 1, len(lines))):
                    if j > i and re.match(r"^\s*(def|class) ", lines[j]):
                        break
                    fixed_line = lines[j]
                    if source.count(fixed_line + "\n") != 1:
                        continue
                    muts = line_mutations(fixed_line, names)
                    rng.shuffle(muts)
                    for kind, buggy_line in muts[:per_line]:
                        f = fn
                        site = BugSite(
                            kind=kind, module=module, function=fn, fixed=fixed_line + "\n", buggy=buggy_line + "\n",
                            entry_module=other_module, entry_function=fn, test_file=sorted(template.tests)[0],
                            tests=f"def test_synthetic_{fn}_{j}_zz():\n    pass\n",
                            title=rng.choice(_SYN_TITLES).format(f=f), story=rng.choice(_SYN_STORIES).format(f=f),
                            snippet=f"from __PKG__ import {fn}\n\nprint({fn}(...))\n",
                            expected="the documented result", actual="a different value")
                        out.append((template, site))
    return out


def synthetic_site_files(template: Any, site: Any, rng: random.Random, idx: int) -> SiteFiles:
    from agent.toy import render_task_files
    from agent.toy.generate import VERSION
    from agent.toy.issues import issue_text

    package = rng.choice(template.packages)
    rendered = render_task_files(template, site, package)
    files: dict[str, str] = {}
    for commit in rendered["commits"]:
        files.update(commit)
    level = rng.choice((1, 2))
    issue = issue_text(site, context=template.context, package=package, version=VERSION, level=level, rng=rng)
    buggy_file = f"{package}/{site.module}"
    old, new = site.buggy.rstrip("\n"), site.fixed.rstrip("\n")
    return SiteFiles(files, buggy_file, site.function, site.function, old, new, issue, level, f"synthetic-{idx:05d}")


# ---------------------------------------------------------------------------------------------
# Renaming augmentation: the same site with fresh identifiers, so the model must COPY names and lines.

# Generic programming words (none taken from the held-out templates' code): fresh identifiers are
# 1-2 of these joined by "_", so they tokenize into pieces the tokenizer knows, as held-out names do.
WORDS = tuple("""
add age alpha amount angle area base batch begin best bin block body bound box buffer cache cell
char check chunk city code col color count cursor data date day delta depth diff digit dist doc
edge end entry error event extra factor field file first flag float frame gap grid group head
height hour index info input item key kind label last left len level limit line link list load
low mask max mean mid min mode name next node note num offset order page pair part path peak
point pos prefix price queue rank rate ratio raw record rest result right root row rule scale
score seed shift side size slot source span speed stack start state step store sum tag tail
target text tick time token total track tree unit value view week weight width word year zone
""".split())
_BUILTIN_NAMES = frozenset(dir(__import__("builtins"))) | frozenset(__import__("keyword").kwlist)


def _defined_names(files: dict[str, str]) -> tuple[list[str], list[str]]:
    """(function and class names, other bound names) defined in the .py files of `files`."""
    funcs: list[str] = []
    others: list[str] = []
    for path, text in files.items():
        if not path.endswith(".py"):
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:
            funcs += re.findall(r"^\s*(?:def|class) (\w+)", text, re.M)
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                funcs.append(node.name)
            elif isinstance(node, ast.arg):
                others.append(node.arg)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                others.append(node.id)
    return list(dict.fromkeys(funcs)), [n for n in dict.fromkeys(others) if n not in funcs]


def rename_site(site: SiteFiles, rng: random.Random, *, p_local: float = 0.5) -> SiteFiles:
    """`site` with its package, modules, functions, classes and (each with probability `p_local`)
    other names of 3+ characters replaced by fresh ones, consistently in every file, path, the
    issue and the edit. The code need not run: episodes only grep it and str_replace in it."""
    funcs, others = _defined_names(site.files)
    package = site.buggy_file.split("/")[0]
    modules = [Path(p).stem for p in site.files if p.endswith(".py") and "/" in p]
    chosen = [n for n in dict.fromkeys([package, *modules, *funcs])
              if len(n) >= 3 and not n.startswith("__") and n not in _BUILTIN_NAMES and not n.startswith("test")]
    chosen += [n for n in others if len(n) >= 3 and n not in _BUILTIN_NAMES and n != "self" and n not in chosen
               and rng.random() < p_local]
    texts = [*site.files.values(), site.issue]
    taken = set(re.findall(r"\w+", "\n".join(texts)))
    mapping: dict[str, str] = {}
    for name in chosen:
        for _ in range(50):
            k = 1 if name in others and rng.random() < 0.5 else 2
            new = "_".join(rng.choice(WORDS) for _ in range(k))
            if name == package or name in modules:
                new = new.replace("_", "")
            if new not in taken and new not in mapping.values():
                mapping[name] = new
                break
    if not mapping:
        return site
    pattern = re.compile(r"(?<![\w])(" + "|".join(sorted(map(re.escape, mapping), key=len, reverse=True)) + r")(?![\w])")

    def sub(text: str) -> str:
        return pattern.sub(lambda m: mapping[m.group(1)], text)

    def sub_path(path: str) -> str:
        parts = path.split("/")
        return "/".join([*(mapping.get(q, q) for q in parts[:-1]),
                         mapping.get(Path(parts[-1]).stem, Path(parts[-1]).stem) + Path(parts[-1]).suffix])

    # Local names only in code (the issue's prose keeps its words); the rest everywhere.
    public = {k: v for k, v in mapping.items() if k not in others or k in funcs}
    pattern_public = re.compile(r"(?<![\w])(" + "|".join(sorted(map(re.escape, public), key=len, reverse=True))
                                + r")(?![\w])") if public else None

    def sub_issue(text: str) -> str:
        return pattern_public.sub(lambda m: public[m.group(1)], text) if pattern_public else text

    files = {sub_path(path): sub(text) if path.endswith(".py") else sub_issue(text) for path, text in site.files.items()}
    out = dataclasses.replace(site, files=files, buggy_file=sub_path(site.buggy_file),
                              function=mapping.get(site.function, site.function),
                              entry_function=mapping.get(site.entry_function, site.entry_function),
                              old=sub(site.old), new=sub(site.new), issue=sub_issue(site.issue))
    text = out.files[out.buggy_file]
    if text.count(out.old) != 1 or out.old == out.new or _window(text, out.function) == []:
        return site  # the renaming broke an invariant of the edit: keep the original
    return out


# ---------------------------------------------------------------------------------------------
# Recording episodes token-exact through the scaffold.


@dataclass
class Sample:
    """One pre-training episode: token ids and which of them carry loss (the model's turns)."""

    ids: list[int]
    loss_mask: list[int]
    move: str
    task_id: str
    turns: int


class _Script:
    """A sampler answering each turn with the next text of a plan (ids + the end-of-turn token)."""

    def __init__(self, codec: Any, turns: list[str], end_id: int) -> None:
        self.encoded = [list(codec.encode(t)) + [end_id] for t in turns]
        self.turn = 0

    async def complete(self, prompt_ids: list[int], *, max_tokens: int, stop: Sequence[str],
                       stop_token_ids: Sequence[int]) -> Any:
        from agent.fakes import TurnReply

        ids = self.encoded[min(self.turn, len(self.encoded) - 1)]
        self.turn += 1
        return TurnReply(list(ids), [0.0] * len(ids))


async def _record(site: SiteFiles, turns: list[str], tokenizer: Any, chat: Any, codec: Any, root: Path) -> Any:
    """Run `turns` as an episode on a scratch copy of `site`'s files; returns the trajectory."""
    from agent.workspace import LocalWorkspace
    from runtime.records import Task

    from agent.scaffold import EpisodeConfig, build_prompt_ids, run_episode

    for path, text in site.files.items():
        p = root / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    task = Task(id=site.task_id, repo=str(root), base_commit="0" * 40, problem_statement=site.issue, image="host",
                test_patch="", FAIL_TO_PASS=["t::t"], PASS_TO_PASS=[], test_command="true", log_parser="pytest")
    workspace = LocalWorkspace(root)

    async def no_diff(base_commit: str) -> str:
        return ""

    sampler = _Script(codec, turns, chat.stop_token_ids[0])
    # The prompt names the sandbox's /testbed, as in real rollouts, not this scratch directory.
    prompt_ids = build_prompt_ids(tokenizer, task, "/testbed")
    traj = await run_episode(task, workspace, sampler, tokenizer, chat, EpisodeConfig(max_turns=len(turns)),
                             episode_id=site.task_id, group_id=site.task_id, diff=no_diff, codec=codec,
                             prompt_ids=prompt_ids)
    shutil.rmtree(root)
    return traj


def _sample(traj: Any, move: str) -> Sample:
    ids, mask = list(traj.prompt_ids), [0] * len(traj.prompt_ids)
    for turn in traj.turns:
        ids += turn.action_ids
        mask += [1] * len(turn.action_ids)
        ids += turn.observation_ids
        mask += [0] * len(turn.observation_ids)
    return Sample(ids, mask, move, traj.task_id, len(traj.turns))


def generate_data(sites: Sequence[SiteFiles], tokenizer: Any, *, episodes_per_site: int, seed: int,
                  mix: Mix = MIX, concurrency: int = 8, rename: float = 0.0) -> list[Sample]:
    """`episodes_per_site` mixture episodes of every site, recorded through the scaffold.

    `rename`: the fraction of episodes recorded on a `rename_site` copy of the site (fresh names).
    Deterministic for (sites, tokenizer, episodes_per_site, seed, mix, rename): plans come from per-episode
    seeded generators and every tool is deterministic (grep over one matching file, str_replace).
    """
    import trio

    from agent.scaffold import ChatFormat
    from agent.scaffold.chat import TextCodec

    chat = ChatFormat.from_tokenizer(tokenizer)
    codec = TextCodec(tokenizer)
    jobs = []
    for s_i, site in enumerate(sites):
        for e in range(episodes_per_site):
            rng = random.Random(f"tiny-policy:{seed}:{site.task_id}:{e}")
            if rename > 0 and rng.random() < rename:
                site = rename_site(sites[s_i], rng)
            else:
                site = sites[s_i]
            turns, move = plan_episode(site, rng, mix)
            jobs.append((s_i * episodes_per_site + e, site, turns, move))
    out: list[Sample | None] = [None] * len(jobs)

    async def main() -> None:
        limiter = trio.CapacityLimiter(concurrency)
        with tempfile.TemporaryDirectory(prefix="tiny-policy-data-") as tmp:
            async def one(k: int, site: SiteFiles, turns: list[str], move: str) -> None:
                async with limiter:
                    traj = await _record(site, turns, tokenizer, chat, codec, Path(tmp, str(k)))
                    out[k] = _sample(traj, move)

            async with trio.open_nursery() as nursery:
                for job in jobs:
                    nursery.start_soon(one, *job)

    trio.run(main)
    return [s for s in out if s is not None]


def copy_samples(sites: Sequence[SiteFiles], tokenizer: Any, n: int, *, seed: int, prefix_ids: Sequence[int]) -> list[Sample]:
    """`n` copy warm-up samples: after `prefix_ids` (the episodes' shared system prompt), a user turn
    shows a grep-style window of a renamed site's code and the assistant turn repeats a random run of
    its lines verbatim (loss on the repeat). Pure induction: every name is fresh, only copying works."""
    rng = random.Random(f"tiny-policy-copy:{seed}")
    out = []
    for k in range(n):
        site = rename_site(sites[rng.randrange(len(sites))], rng)
        lines = site.files[site.buggy_file].split("\n")
        i = rng.randrange(max(1, len(lines) - 4))
        window = lines[i:i + rng.randint(4, 12)]
        shown = "\n".join(f"{site.buggy_file}{':' if j == 0 else '-'}{i + j + 1}{':' if j == 0 else '-'}{line}"
                          for j, line in enumerate(window))
        a = rng.randrange(len(window))
        b = rng.randint(a + 1, len(window))
        while a > 0 and not "".join(window[a:b]).strip():
            a -= 1
        copy = "\n".join(window[a:b])
        head = list(prefix_ids) + tokenizer.encode(f"<|im_start|>user\n{shown}<|im_end|>\n<|im_start|>assistant\n"
                                                   f"Lines {i + a + 1}-{i + b}:\n")
        tail = tokenizer.encode(f"{copy}<|im_end|>")
        out.append(Sample(head + tail, [0] * len(head) + [1] * len(tail), "copy", site.task_id, 1))
    return out


# ---------------------------------------------------------------------------------------------
# Supervised pre-training (SFT on the model's turns).


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 600  # optimizer steps
    batch_tokens: int = 8192  # tokens per step (episodes packed by length, padded within a batch)
    lr: float = 3e-3  # AdamW peak learning rate
    warmup_steps: int = 40  # linear warmup, then cosine decay to 10% of lr
    weight_decay: float = 0.01
    clip: float = 1.0  # gradient norm clip
    seed: int = 0
    # Weight of the loss on the other tokens after the shared prefix (issue, observations) relative to
    # the action tokens (1.0). Observations repeat text from earlier in the episode (every grep line
    # repeats the path, the edit's observation repeats the grepped lines): a dense copying signal.
    context_weight: float = 0.0
    # Run the shared prefix through the model once per batch (`hidden_states`): faster, and equal to
    # a plain forward (values and gradients, to rounding at the default init). Off: plain forwards.
    shared_prefix: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"SFTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"SFTConfig.lr must be > 0, got {self.lr}")


def _batches(samples: Sequence[Sample], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Indexes of `samples` grouped into batches of about `batch_tokens` (padded) tokens, shuffled."""
    order = sorted(range(len(samples)), key=lambda i: (len(samples[i].ids), rng.random()))
    batches, cur, longest = [], [], 0
    for i in order:
        n = len(samples[i].ids)
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def common_prefix(samples: Sequence[Sample]) -> int:
    """Tokens every sample starts with (the system prompt and the task prompt's opening)."""
    first = samples[0].ids
    n = min(len(s.ids) for s in samples) - 1
    for s in samples[1:]:
        k = 0
        while k < n and s.ids[k] == first[k]:
            k += 1
        n = k
    return max(0, n)


def _padded(batch: Sequence[Sample]) -> tuple[Any, Any, Any]:
    """(ids, loss mask, attention mask), each (B, T), of `batch` right-padded with id 0."""
    import torch

    width = max(len(s.ids) for s in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.float32)  # 1 on action tokens
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    for r, s in enumerate(batch):
        ids[r, :len(s.ids)] = torch.tensor(s.ids)
        mask[r, :len(s.ids)] = torch.tensor(s.loss_mask, dtype=torch.float32)
        attn[r, :len(s.ids)] = 1
    return ids, mask, attn


def hidden_states(model: Any, ids: Any, attn: Any, prefix: int) -> Any:
    """Last hidden states (B, T, H) of right-padded `ids`, whose first `prefix` tokens are the same in
    every row: that prefix goes through the model once and its KV is shared (a third of an episode
    is the system prompt), instead of once per row. Equal to a plain forward to float rounding."""
    import torch
    from transformers import DynamicCache

    if prefix <= 0:
        return model.model(input_ids=ids, attention_mask=attn).last_hidden_state
    rows, width = ids.shape
    head = model.model(input_ids=ids[:1, :prefix], use_cache=True)
    kv = [(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1))
          for layer in head.past_key_values.layers]
    cache = DynamicCache(ddp_cache_data=kv, config=model.config)
    position_ids = torch.arange(prefix, width)[None, :].expand(rows, -1)  # (B, T - prefix)
    tail = model.model(input_ids=ids[:, prefix:], attention_mask=attn, position_ids=position_ids,
                       past_key_values=cache, use_cache=True).last_hidden_state
    return torch.cat([head.last_hidden_state.expand(rows, -1, -1), tail], dim=1)


def action_accuracy(model: Any, samples: Sequence[Sample], batch: int = 8) -> dict[str, float]:
    """Teacher-forced greedy accuracy on the action tokens of `samples`: per token, and per model
    turn exact (all tokens right), split into short turns (< 40 tokens: grep, submit) and long ones
    (the edit, whose tokens are mostly copied from the grep output)."""
    import torch

    was_training = model.training
    model.eval()
    right = total = 0
    exact = {"short": [0, 0], "long": [0, 0]}
    with torch.inference_mode():
        for k in range(0, len(samples), batch):
            chunk = samples[k:k + batch]
            ids, _, attn = _padded(chunk)
            pred = model.lm_head(hidden_states(model, ids, attn, common_prefix(chunk))).argmax(-1)  # (B, T)
            for r, s in enumerate(chunk):
                ok = [bool(pred[r, t - 1] == s.ids[t]) if s.loss_mask[t] else None for t in range(1, len(s.ids))]
                run: list[bool] = []
                for v in [*ok, None]:
                    if v is None:
                        if run:
                            e = exact["long" if len(run) >= 40 else "short"]
                            e[0] += all(run)
                            e[1] += 1
                        run = []
                    else:
                        run.append(v)
                        right += v
                        total += 1
    if was_training:
        model.train()
    return {"token_acc": right / max(1, total), "short_turn_exact": exact["short"][0] / max(1, exact["short"][1]),
            "long_turn_exact": exact["long"][0] / max(1, exact["long"][1])}


def induction_warmup(model: Any, steps: int, *, lr: float = 2e-3, rows: int = 32, seed: int = 0,
                     log: Any = None) -> dict[str, float]:
    """Pre-train `model` to copy: rows of [random prefix (0-64 tokens), x, x] with x random tokens
    (8-40), loss on the repeat only. Lengths and offsets vary, so only content-based copying
    (induction heads) lowers the loss, not a fixed relative position. Measured on this 1M-parameter
    Qwen2 (hidden 128, 4 layers, vocab 2048, 2 CPU threads, ~0.45 s/step): the loss sits at
    ln(V) for ~1200 steps, then drops: repeat accuracy 0.58 at step 1300, 0.99 at 1500."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(f"tiny-policy-induction:{seed}")
    vocab = model.config.vocab_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    t0 = time.perf_counter()
    acc = 0.0
    for step in range(steps):
        k, p = rng.randint(8, 40), rng.randint(0, 64)
        x = torch.randint(3, vocab, (rows, k), generator=gen)
        ids = torch.cat([torch.randint(3, vocab, (rows, p), generator=gen), x, x], 1)
        logits = model(ids).logits
        pred, gold = logits[:, p + k:-1], ids[:, p + k + 1:]
        loss = torch.nn.functional.cross_entropy(pred.reshape(-1, vocab), gold.reshape(-1))
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 30)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        acc = (pred.argmax(-1) == gold).float().mean().item()
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(f"induction step {step + 1}/{steps} loss {loss.item():.3f} repeat acc {acc:.3f} "
                f"{time.perf_counter() - t0:.0f}s")
    model.eval()
    return {"induction_steps": float(steps), "induction_final_acc": acc, "induction_s": time.perf_counter() - t0}


def pretrain(model: Any, samples: Sequence[Sample], config: SFTConfig = SFTConfig(), *,
             log: Any = None, monitor: Sequence[Sample] = (), monitor_every: int = 100,
             on_monitor: Any = None) -> dict[str, float]:
    """SFT of `model` on `samples` (loss on action tokens, mean over them). Returns loss figures.

    `monitor`: episodes (e.g. of held-out templates, never trained on) whose `action_accuracy` is
    logged every `monitor_every` steps and at the end; `on_monitor(step, accuracy)` is called then
    (e.g. to save a partial checkpoint)."""
    import torch

    if not samples:
        raise ValueError("pretrain: no samples")
    rng = random.Random(f"tiny-policy-sft:{config.seed}")
    torch.manual_seed(config.seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    prefix = common_prefix(samples) if config.shared_prefix else 0
    common = common_prefix(samples)  # the system prompt: no loss on it (every episode has it)
    queue: list[list[int]] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(config.steps):
        if not queue:
            queue = _batches(samples, config.batch_tokens, rng)
        ids, mask, attn = _padded([samples[i] for i in queue.pop()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        if config.context_weight > 0:  # every real token after the shared prompt, actions weighted 1
            weight = torch.where(mask > 0, 1.0, config.context_weight * attn.float())
            weight[:, :common] = 0.0
        else:
            weight = mask
        # The LM head only where the loss is (action tokens: ~13% of an episode), not over [B, T, V].
        hidden = hidden_states(model, ids, attn, prefix)[:, :-1]  # (B, T-1, H)
        where = weight[:, 1:] > 0  # (B, T-1): position t predicts token t+1
        logits = model.lm_head(hidden[where])  # (N, V)
        w = weight[:, 1:][where]
        ce = torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][where], reduction="none")
        loss = (ce * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        opt.step()
        losses.append(loss.item())
        if log is not None and (step % 25 == 0 or step == config.steps - 1):
            recent = losses[-25:]
            log(f"sft step {step + 1}/{config.steps} loss {sum(recent) / len(recent):.4f} "
                f"lr {lr_at(step):.2e} {time.perf_counter() - t0:.0f}s")
        if monitor and log is not None and (step + 1) % monitor_every == 0 and step != config.steps - 1:
            acc = action_accuracy(model, monitor)
            log(f"sft step {step + 1} held-out action accuracy " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
            if on_monitor is not None:
                on_monitor(step + 1, acc)
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    out = {"shared_prefix_tokens": float(prefix), "loss/first": losses[0], "loss/final": sum(tail) / len(tail),
           "sft_s": time.perf_counter() - t0}
    if monitor:
        acc = action_accuracy(model, monitor)
        if log is not None:
            log("final held-out action accuracy " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
        out.update({f"heldout_{k}": v for k, v in acc.items()})
    return out


# ---------------------------------------------------------------------------------------------
# The check: rollouts of a checkpoint with the embedded policy server and real sandboxes.


@dataclass(frozen=True)
class TinyEpisode:
    """The episode limits the tiny policy is trained for (its episodes take 3-4 turns)."""

    max_turns: int = 6
    max_context_tokens: int = 2048
    max_turn_tokens: int = 256

    def episode_config(self) -> Any:
        from agent.scaffold import EpisodeConfig

        return EpisodeConfig(max_turns=self.max_turns, max_context_tokens=self.max_context_tokens,
                             max_turn_tokens=self.max_turn_tokens, bash_timeout_s=30.0, wall_time_s=300.0)


def summarize(groups: Sequence[Sequence[Any]], wall_s: float, sampled_tokens: int) -> dict[str, float]:
    """Solve rate, pass@G, format errors, turns, tokens and speed of graded rollout groups."""
    trajs = [r.trajectory for g in groups for r in g]
    if not trajs:
        raise ValueError("summarize: no rollouts")
    turns = sum(len(t.turns) for t in trajs)
    return {
        "episodes": float(len(trajs)),
        "tasks": float(len(groups)),
        "solve_rate": sum(bool(t.resolved) for t in trajs) / len(trajs),
        "pass_at_group": sum(any(bool(r.trajectory.resolved) for r in g) for g in groups) / len(groups),
        "mixed_groups": sum(len({bool(r.trajectory.resolved) for r in g}) == 2 for g in groups) / len(groups),
        "format_error_rate": sum(t.metrics.get("format_errors", 0.0) for t in trajs) / max(1, turns),
        "mean_turns": turns / len(trajs),
        "mean_tokens": statistics.mean(t.metrics.get("tokens", 0.0) for t in trajs),
        "mean_action_tokens": statistics.mean(sum(len(u.action_ids) for u in t.turns) for t in trajs),
        "submitted": sum(t.finish_reason == "submitted" for t in trajs) / len(trajs),
        "errors": float(sum(t.finish_reason == "error" for t in trajs)),
        "wall_s": wall_s,
        "episodes_per_min": len(trajs) / wall_s * 60,
        "sampled_tokens_per_s": sampled_tokens / wall_s,
    }


async def evaluate_policy(model: Any, tokenizer: Any, tasks: Sequence[Any], *, group: int = 4,
                          temperature: float = 1.0, seed: int = 0, node: Any = None, episode: TinyEpisode = TinyEpisode(),
                          max_num_seqs: int = 32, max_episodes: int = 32) -> tuple[dict[str, float], list[list[Any]]]:
    """G rollouts of every task with `model` behind the embedded policy server, graded SWE-bench style.

    `node`: a sandboxd client (`sandboxd.client.open_local("ns")` or `connect(...)`); None opens an
    in-process ns runtime for the call. Returns (`summarize` figures, the `RolloutResult` groups).
    """
    import trio

    from agent.grading import grade
    from agent.llm import LLMClient
    from agent.scheduler import Scheduler, SchedulerConfig
    from learner.serve import ServeConfig, open_policy_server

    if node is None:
        from sandboxd.client import open_local

        async with open_local("ns") as local:
            return await evaluate_policy(model, tokenizer, tasks, group=group, temperature=temperature, seed=seed,
                                         node=local, episode=episode, max_num_seqs=max_num_seqs,
                                         max_episodes=max_episodes)
    config = ServeConfig(max_num_seqs=max_num_seqs, seed=seed, max_model_len=episode.max_context_tokens)
    async with open_policy_server(model, tokenizer, config) as server:
        async with LLMClient(["http://embedded"], model="policy", transport=server.transport(),
                             temperature=temperature, timeout_s=600.0) as llm:
            sched = Scheduler([node], llm, tokenizer, grade,
                              SchedulerConfig(max_episodes=max_episodes, node_capacity=max_episodes,
                                              grade_timeout_s=120.0, episode=episode.episode_config()))
            tokens0 = server.stats.tokens
            t0 = time.perf_counter()
            groups = await sched.run_groups([(t, group, f"eval/{t.id}") for t in tasks])
            wall = time.perf_counter() - t0
            sampled = server.stats.tokens - tokens0
    return summarize(groups, wall, sampled), groups
